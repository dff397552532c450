"""Prices: what a request's tokens cost, in USD.

Rates come from ``[pricing]`` in the config (self-hosted and fine-tuned models, or corrections),
else from the ``genai-prices`` data set (maintained by the pydantic team; prices for every major
provider with cache-read / cache-write rates, long-context tiers, service tiers and dated changes).
A ``calc_price`` call there costs ~170 µs, so each (provider, model, service tier) is resolved to
plain integer rates once and cached; pricing a request is then a few integer multiplications.
The package's own corrections (``proxy/price_corrections.toml``, each with its provider's page and
the date it was read there) replace genai-prices' rates they name at that resolution step.

Rates are held as integer pico-dollars per million tokens, so the cost of a request is one exact
integer sum divided once by 10**18: the float that reaches the event is the correctly rounded
value of the exact cost, never an accumulation of float errors.

Beyond text tokens (issue 16.1, 16.2): audio, image and video tokens, in and out, cached or not,
take their own genai-prices rates (``input_audio_mtok``, ``cache_audio_read_mtok``,
``output_image_mtok``, ...; a modality without one pays its text kind's rate, as genai-prices
falls back to the nearest priced unit); provider-run tools add a fee per call
(``web_searches_kcount``: Anthropic and OpenAI web search, Gemini grounding;
``storage_searches_kcount``: OpenAI file search); and audio billed by its length (whisper-1) is
priced per hour (``input_audio_hours`` / ``audio_hours``), a model without that rate being
unpriced rather than free. Per-character (TTS), per-image and per-page prices are not metered.

Tiered prices follow the industry's "cliff" rule (as genai-prices does): when the request's total
input tokens pass a tier's start, that tier's rates apply to all its tokens.

A model with no known price costs 0, is marked unpriced, is counted, and is warned about once per
(provider, model): never silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .adapters.base import Usage
from .config import PriceOverride, ProviderConfig
from .price_corrections import Correction, packaged
from .text import inert

log = logging.getLogger(__name__)

PICO = 10**12  # rates are pico-USD per million tokens
_COST_DIVISOR = 10**18  # tokens * pico-USD/MTok -> USD

# genai-prices provider ids for a provider whose base URL matches none of its API patterns.
KIND_CATALOG = {"openai": "openai", "anthropic": "anthropic", "gemini": "google", "azure": "azure"}
# Models a wire format cannot carry though its catalog provider prices them, by model-name
# prefix: Google's catalog prices Claude as Vertex AI serves it (Anthropic's wire format, at
# ``:rawPredict``) and falls back to Anthropic's catalog, but the Gemini API's
# ``generateContent`` carries Google's own models only. Such a model is not priced (and not
# listed by ``prices``) on a provider of that kind.
NOT_CARRIED: dict[str, tuple[str, ...]] = {"gemini": ("claude-",)}
DEFAULT_TIER = "default"

# How long a resolved rate stays cached: prices with a time-of-day condition (off-peak discounts)
# are re-resolved every minute, all others every hour (dated price changes land within the hour).
_TTL_TIME_OF_DAY = 60.0
_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class RateSet:
    """Rates in integer pico-USD per million tokens (per million calls for the per-call fees,
    per hour for ``audio_hour``).

    A token of another modality takes its modality's rate (``input_audio``, ``cached_audio``,
    ...); where the model has none it was resolved to the rate a text token of its kind pays,
    as genai-prices falls back to the nearest priced unit."""

    input: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    output: int
    reasoning: int
    input_audio: int
    cached_audio: int
    input_image: int
    cached_image: int
    input_video: int
    cached_video: int
    output_audio: int
    output_image: int
    web_search: int  # per million calls
    file_search: int  # per million calls
    audio_hour: int  # per hour of audio, for duration-billed models (Whisper)

    def cost(self, usage: Usage) -> float:
        inp = usage.input_tokens
        cached = min(usage.cached_input_tokens, inp)
        write = min(usage.cache_write_tokens, inp - cached)
        write_1h = min(usage.cache_write_1h_tokens, write)
        total = (write - write_1h) * self.cache_write + write_1h * self.cache_write_1h
        fresh = inp - cached - write  # neither read from nor written to a cache
        if usage.input_audio_tokens or usage.input_image_tokens or usage.input_video_tokens:
            # Modality counts include their cached tokens (OpenAI realtime, Gemini details).
            c_audio = min(usage.cached_audio_tokens, cached)
            c_image = min(usage.cached_image_tokens, cached - c_audio)
            c_video = min(usage.cached_video_tokens, cached - c_audio - c_image)
            audio = min(max(usage.input_audio_tokens - c_audio, 0), fresh)
            image = min(max(usage.input_image_tokens - c_image, 0), fresh - audio)
            video = min(max(usage.input_video_tokens - c_video, 0), fresh - audio - image)
            total += (
                (cached - c_audio - c_image - c_video) * self.cached_input
                + c_audio * self.cached_audio
                + c_image * self.cached_image
                + c_video * self.cached_video
                + (fresh - audio - image - video) * self.input
                + audio * self.input_audio
                + image * self.input_image
                + video * self.input_video
            )
        else:
            total += cached * self.cached_input + fresh * self.input
        out = usage.output_tokens
        reasoning = min(usage.reasoning_tokens, out)
        o_audio = min(usage.output_audio_tokens, out - reasoning)
        o_image = min(usage.output_image_tokens, out - reasoning - o_audio)
        total += (
            (out - reasoning - o_audio - o_image) * self.output
            + reasoning * self.reasoning
            + o_audio * self.output_audio
            + o_image * self.output_image
        )
        if usage.web_searches or usage.file_searches:
            total += usage.web_searches * self.web_search + usage.file_searches * self.file_search
        if usage.audio_ms:  # one exact division still: over ms per hour times the divisor
            audio_pico = usage.audio_ms * self.audio_hour * 1_000_000
            return (total * _MS_PER_HOUR + audio_pico) / (_COST_DIVISOR * _MS_PER_HOUR)
        return total / _COST_DIVISOR

    @classmethod
    def tokens_only(
        cls,
        input: int,
        cached_input: int,
        cache_write: int,
        cache_write_1h: int,
        output: int,
        reasoning: int,
    ) -> RateSet:
        """Rates with every other modality at the text rate of its kind and no per-call fees."""
        return cls(
            input=input,
            cached_input=cached_input,
            cache_write=cache_write,
            cache_write_1h=cache_write_1h,
            output=output,
            reasoning=reasoning,
            input_audio=input,
            cached_audio=cached_input,
            input_image=input,
            cached_image=cached_input,
            input_video=input,
            cached_video=cached_input,
            output_audio=output,
            output_image=output,
            web_search=0,
            file_search=0,
            audio_hour=0,
        )


_MS_PER_HOUR = 3_600_000


@dataclass(frozen=True, slots=True)
class Rates:
    base: RateSet
    # (start, rates): these rates apply when the input tokens exceed ``start``; ascending.
    tiers: tuple[tuple[int, RateSet], ...]
    source: str  # where the rates came from, for ``atlasburn-proxy prices``
    expires: float = float("inf")  # time.monotonic() after which to resolve again

    def for_input(self, input_tokens: int) -> RateSet:
        chosen = self.base
        for start, rates in self.tiers:
            if input_tokens > start:
                chosen = rates
        return chosen

    def cost(self, usage: Usage) -> float:
        return self.for_input(usage.input_tokens).cost(usage)


def usd_per_mtok(pico: int) -> str:
    """A rate for people: ``150000000000`` -> ``0.15``."""
    value = (Decimal(pico) / PICO).normalize()
    return f"{value:f}"


def to_pico(usd_per_mtok: Decimal | float | int) -> int:
    value = usd_per_mtok if isinstance(usd_per_mtok, Decimal) else Decimal(str(usd_per_mtok))
    return int((value * PICO).to_integral_value())


def rates_from_override(o: PriceOverride) -> Rates:
    base = RateSet.tokens_only(
        input=to_pico(o.input),
        cached_input=to_pico(o.cached_input),
        cache_write=to_pico(o.cache_write),
        cache_write_1h=to_pico(o.cache_write_1h),
        output=to_pico(o.output),
        reasoning=to_pico(o.output),
    )
    return Rates(base, (), f'config [pricing."{o.model}"]')


class Catalog:
    """The genai-prices data set, imported once (it takes ~80 ms and ~15 MB): the packaged
    snapshot, or one fetched by ``proxy.price_data`` (``snapshot``, named by ``data``)."""

    def __init__(
        self,
        corrections: tuple[Correction, ...] | None = None,
        snapshot: Any | None = None,
        data: str = "packaged data",
    ) -> None:
        import genai_prices
        from genai_prices import data_snapshot

        self.version = genai_prices.__version__
        self.data = data
        self._snapshot = data_snapshot.get_snapshot() if snapshot is None else snapshot
        # The packaged corrections unless given (tests pass ``()`` for genai-prices alone).
        self.corrections = packaged(_KNOWN_KEYS) if corrections is None else corrections

    def service_tiers(self) -> tuple[str, ...]:
        """``default`` and every service tier the data prices apart (``flex``, ``priority``...),
        sorted."""
        tiers = {DEFAULT_TIER}
        for provider in self._snapshot.providers:
            for model in provider.models:
                for variant in model.price_variants or ():
                    when = getattr(variant, "when", None)
                    if isinstance(when, dict) and isinstance(when.get("service_tier"), str):
                        tiers.add(when["service_tier"])
        return tuple(sorted(tiers))

    def provider(self, base_url: str, price_as: str, kind: str) -> Any | None:
        """The catalog provider for one configured upstream, or None."""
        snap = self._snapshot
        for ref in ([(None, price_as, None)] if price_as else []) + [
            (None, None, base_url),
            (None, KIND_CATALOG.get(kind), None),
        ]:
            if ref[1] is None and ref[2] is None:
                continue
            try:
                return snap.find_provider(*ref)
            except LookupError:
                continue
        return None

    def rates(self, provider: Any, model: str, service_tier: str | None) -> Rates | None:
        from datetime import UTC, datetime

        found = provider.find_model(model, all_providers=self._snapshot.providers)
        if found is None:
            return None
        now = datetime.now(tz=UTC)
        own = any(found is m for m in provider.models)
        context = {"service_tier": service_tier} if service_tier and own else None
        prices = found.get_prices(now, context)
        correction = next(
            (c for c in self.corrections if c.applies(provider.id, found.id, model)), None
        )
        fixed: Mapping[str, Decimal] = correction.rates if correction else {}

        def value_of(key: str) -> Any:
            return fixed[key] if key in fixed else getattr(prices, key, None)

        if not any(value_of(key) is not None for key in _PRICE_KEYS + _FEE_KEYS):
            return None  # priced per character, per image, per page, ...: nothing we meter
        starts = sorted({tier.start for key in _PRICE_KEYS for tier in _tiers(value_of(key))})

        def at(threshold: int) -> RateSet:
            def rate(key: str, fallback: int, scale: int = 1) -> int:
                value = value_of(key)
                if value is None:
                    return fallback
                if _is_tiered(value):
                    chosen = value.base
                    for tier in value.tiers:
                        if threshold > tier.start:
                            chosen = tier.price
                    value = chosen
                return to_pico(value * scale)

            def has(key: str) -> bool:
                return value_of(key) is not None

            input_rate = rate("input_mtok", 0)
            output_rate = rate("output_mtok", 0)
            cached = rate("cache_read_mtok", input_rate)
            write = rate("cache_write_mtok", input_rate)
            # A modality without a rate pays its text kind's; a cached one without a rate of its
            # own pays the cache rate where the model has one, else its modality's (genai-prices
            # requires the join rate where both exist).
            audio = rate("input_audio_mtok", input_rate)
            image = rate("input_image_mtok", input_rate)
            video = rate("input_video_mtok", input_rate)
            has_cache = has("cache_read_mtok")
            return RateSet(
                input=input_rate,
                cached_input=cached,
                cache_write=write,
                cache_write_1h=rate("cache_write_1h_mtok", write),
                output=output_rate,
                reasoning=rate("output_reasoning_mtok", output_rate),
                input_audio=audio,
                cached_audio=rate("cache_audio_read_mtok", cached if has_cache else audio),
                input_image=image,
                cached_image=rate("cache_image_read_mtok", cached if has_cache else image),
                input_video=video,
                cached_video=rate("cache_video_read_mtok", cached if has_cache else video),
                output_audio=rate("output_audio_mtok", output_rate),
                output_image=rate("output_image_mtok", output_rate),
                # USD per thousand calls -> per million calls
                web_search=rate("web_searches_kcount", 0, 1000),
                file_search=rate("storage_searches_kcount", 0, 1000),
                audio_hour=rate("input_audio_hours", rate("audio_hours", 0)),
            )

        tiers = tuple((start, at(start + 1)) for start in starts)
        timed = _has_time_of_day(found)
        source = f"genai-prices {self.version} ({self.data}): {provider.id}/{found.id}"
        if context:
            source += f" (service_tier {service_tier})"
        if correction is not None:
            names = ", ".join(sorted(fixed))
            source = (
                f"correction {correction.source} (checked {correction.checked}; {names})"
                f" over {source}"
            )
        expires = time.monotonic() + (_TTL_TIME_OF_DAY if timed else _TTL)
        return Rates(at(0), tiers, source, expires)


_PRICE_KEYS = (
    "input_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "output_mtok",
    "output_reasoning_mtok",
    "input_audio_mtok",
    "cache_audio_read_mtok",
    "input_image_mtok",
    "cache_image_read_mtok",
    "input_video_mtok",
    "cache_video_read_mtok",
    "output_audio_mtok",
    "output_image_mtok",
)
# Per-call fees and duration rates (not tiered by input tokens).
_FEE_KEYS = ("web_searches_kcount", "storage_searches_kcount", "input_audio_hours", "audio_hours")
_KNOWN_KEYS = frozenset(_PRICE_KEYS + _FEE_KEYS)


def _is_tiered(value: object) -> bool:
    return hasattr(value, "tiers") and hasattr(value, "base")


def _tiers(value: object) -> list[Any]:
    return list(value.tiers) if _is_tiered(value) else []  # type: ignore[attr-defined]


def _has_time_of_day(model: Any) -> bool:
    prices = model.prices if isinstance(model.prices, list) else []
    return any(type(p.constraint).__name__ == "TimeOfDateConstraint" for p in prices)


@dataclass(slots=True)  # built per request: see Event for why it is not frozen
class Price:
    cost_usd: float
    priced: bool


UNPRICED = Price(0.0, False)


def _tier(service_tier: str | None) -> str | None:
    return None if service_tier is None else inert(service_tier)


class Pricer:
    """Prices usage for (provider, model); rates cached per (provider, model, service tier)."""

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        overrides: Mapping[str, PriceOverride],
        catalog: Catalog | None = None,
    ) -> None:
        self._providers = providers
        self._overrides = overrides
        self._catalog = catalog
        self._catalog_providers: dict[str, Any] = {}
        self._cache: dict[tuple[str, str, str | None], Rates | None] = {}
        self._warned: set[tuple[str, str]] = set()
        self.unpriced_total = 0
        self.errors_total = 0

    @property
    def catalog(self) -> Catalog | None:
        return self._catalog

    def use(self, catalog: Catalog) -> None:
        """Price from ``catalog`` from now on (newer data): the catalog and every rate resolved
        from the old one are replaced in one synchronous step, so a request is priced wholly
        from the old data or wholly from the new. ``[pricing]`` still comes first."""
        self._catalog = catalog
        self._catalog_providers = {}
        self._cache = {}

    @classmethod
    def from_config(
        cls,
        providers: Mapping[str, ProviderConfig],
        overrides: Mapping[str, PriceOverride],
        catalog: Catalog | None = None,
    ) -> Pricer:
        """A pricer over ``catalog`` (data fetched earlier), else the packaged data."""
        if catalog is not None:
            return cls(providers, overrides, catalog)
        try:
            catalog = Catalog()
        except Exception:  # the daemon still relays without the data set, and says so
            log.exception("the genai-prices data set could not be loaded; only [pricing] applies")
            catalog = None
        return cls(providers, overrides, catalog)

    def service_tiers(self) -> tuple[str, ...]:
        """The service tiers a price can be asked for (``Catalog.service_tiers``)."""
        return (DEFAULT_TIER,) if self._catalog is None else self._catalog.service_tiers()

    def rates(self, provider: str, model: str, service_tier: str | None = None) -> Rates | None:
        """The rates for (provider, model, tier), or None for an unknown price. The model and
        tier come from clients and providers: they are cache keys, so they are bounded first
        (``proxy.text.inert``)."""
        return self._rates(provider, inert(model), _tier(service_tier))

    def _rates(self, provider: str, model: str, service_tier: str | None) -> Rates | None:
        key = (provider, model, service_tier)
        if key in self._cache:
            rates = self._cache[key]
            if rates is None or rates.expires >= time.monotonic():
                return rates
        rates = self._resolve(provider, model, service_tier)
        if len(self._cache) > 10_000:  # model names come from clients: stay bounded
            self._cache.clear()
        self._cache[key] = rates
        return rates

    def price(self, provider: str, model: str, usage: Usage) -> Price:
        """The cost of ``usage``; never raises (a pricing failure is logged and counted)."""
        if usage.cost_usd is not None:  # the host reported its own price (OpenRouter)
            return Price(usage.cost_usd, True)
        model = inert(model)  # it is a cache key, logged and remembered below
        try:
            rates = self._rates(provider, model, _tier(usage.service_tier))
            if rates is None or (usage.audio_ms and not rates.base.audio_hour):
                # (audio billed by its length, for a model with no such rate: not free, unknown)
                self._unpriced(provider, model)
                return UNPRICED
            return Price(rates.cost(usage), True)
        except Exception:
            self.errors_total += 1
            log.exception("pricing failed for %s model %r", provider, model)
            return UNPRICED

    def _unpriced(self, provider: str, model: str) -> None:
        self.unpriced_total += 1
        if (provider, model) not in self._warned and len(self._warned) < 10_000:
            self._warned.add((provider, model))
            log.warning(
                "no price known for %s model %r: its events cost 0 and are marked unpriced; "
                'add [pricing."%s"] to the config to price it',
                provider,
                model,
                model,
            )

    def _resolve(self, provider: str, model: str, service_tier: str | None) -> Rates | None:
        override = self._overrides.get(model)
        if override is not None and override.provider in ("", provider):
            return rates_from_override(override)
        if not model or self._catalog is None:
            return None
        cfg = self._providers.get(provider)
        if cfg is None or cfg.price_as == "none" or model.startswith(NOT_CARRIED.get(cfg.kind, ())):
            return None
        if provider not in self._catalog_providers:
            self._catalog_providers[provider] = self._catalog.provider(
                str(cfg.base_url), cfg.price_as, cfg.kind
            )
        catalog_provider = self._catalog_providers[provider]
        if catalog_provider is None:
            return None
        return self._catalog.rates(catalog_provider, model, service_tier)
