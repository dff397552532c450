"""The packaged corrections to genai-prices (``price_corrections.toml``, issue 16.8).

genai-prices lags the providers' pages now and then (DeepSeek's night-time discount, ended
2025-09-05, still applies there; gpt-4o-audio-preview has no audio rates). Each correction names
its provider's page and the date the rates were read there, replaces only the rates it names, and
is applied when a (provider, model, tier) is resolved to integer rates (``proxy.pricing``), never
per request. A user's ``[pricing]`` still wins over it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources

RESOURCE = "price_corrections.toml"
_META = frozenset({"provider", "model", "only", "source", "checked", "note"})


@dataclass(frozen=True, slots=True)
class Correction:
    provider: str  # genai-prices provider id
    model: str  # genai-prices model id
    only: frozenset[str]  # exact lower-case request model names it is limited to; empty = all
    rates: Mapping[str, Decimal]  # genai-prices key -> USD per million tokens (per 1000 calls)
    source: str  # URL of the provider's pricing page
    checked: str  # ISO date the rates were read there

    def applies(self, provider: str, model_id: str, requested: str) -> bool:
        return (
            provider == self.provider
            and model_id == self.model
            and (not self.only or requested.lower() in self.only)
        )


def parse(text: str, known_keys: frozenset[str]) -> tuple[Correction, ...]:
    """Corrections from TOML text; a rate key genai-prices does not have is an error (a typo would
    otherwise silently correct nothing)."""
    doc = tomllib.loads(text)
    out = []
    for i, entry in enumerate(doc.get("correction", [])):
        unknown = set(entry) - _META - known_keys
        if unknown:
            raise ValueError(f"correction {i}: unknown rate key(s) {sorted(unknown)}")
        for key in ("provider", "model", "source", "checked"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"correction {i}: {key} is required")
        rates = {k: Decimal(str(v)) for k, v in entry.items() if k not in _META}
        if not rates:
            raise ValueError(f"correction {i}: no rates")
        out.append(
            Correction(
                provider=entry["provider"],
                model=entry["model"],
                only=frozenset(m.lower() for m in entry.get("only", ())),
                rates=rates,
                source=entry["source"],
                checked=entry["checked"],
            )
        )
    return tuple(out)


def packaged(known_keys: frozenset[str]) -> tuple[Correction, ...]:
    """The corrections shipped in the package."""
    text = resources.files("proxy").joinpath(RESOURCE).read_text(encoding="utf-8")
    return parse(text, known_keys)
