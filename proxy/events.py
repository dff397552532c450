"""The telemetry event: one per proxied request, in the AtlasBurn ingest schema.

``Event`` holds the schema's fields plus local-only ones (``usage_source``, ``priced``,
``refused_by``, ``origin``, ``usage_unknown``) that say how its numbers were obtained and where it
came from; ``to_ingest`` gives the shipped form without them. ``parse_event`` validates an event
that arrives at the local ``/api/ingest``: every field checked and bounded, the reason named when
one is wrong, and the whole event encoded once (``check_encodable``), so that nothing it accepts
can fail later in the store, the shipper or the loop detector, which all encode it again.
"""

from __future__ import annotations

import math
import re
import reprlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from .adapters.base import UsageSource
from .attribution import KEY_ID, MAX_BYTES, MAX_TAGS, Attributes, Process
from .attribution.request import bounded
from .text import LIMIT, inert


# Not frozen: a frozen dataclass sets each of its 15 fields through object.__setattr__, which
# costs microseconds per request on the hot path. Treat it as immutable all the same.
@dataclass(slots=True)
class Event:
    ts: str
    provider: str
    model: str
    endpoint: str
    status: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: int
    fingerprint: str
    stream: bool
    # Local only: how the token numbers were obtained, whether the model had a price, which
    # guardrail layer refused the request (None: not refused), and where the event came from.
    usage_source: UsageSource
    priced: bool
    refused_by: str | None = None
    origin: str = "proxy"  # "proxy" (relayed here) or "ingest" (posted to the local API)
    # A 2xx answer to a request that is billed (a POST to an endpoint that is not free) whose
    # usage was missing or partial: its cost is not known (recorded 0, or a lower bound).
    usage_unknown: bool = False
    # Who sent it (DESIGN "Attribution"): shipped as the optional ``attributes`` object.
    attributes: Attributes | None = None
    # Local only: the names of the ``[[guardrails.budgets]]`` whose spend this event counts in.
    budgets: tuple[str, ...] = ()

    @property
    def unknown_cost(self) -> str | None:
        """Why this event's cost is not known, or None when it is: ``missing`` or ``partial``
        (``usage_unknown``), ``unpriced`` (usage known, the model has no price). Never a $0 to
        read as free (``report``'s unknown-cost column, ``/metrics``)."""
        if self.usage_unknown:
            return str(self.usage_source)
        if not self.priced and self.refused_by is None and self.usage_source in _HAS_USAGE:
            return "unpriced"
        return None

    def to_ingest(self) -> dict[str, Any]:
        fields = {
            "ts": self.ts,
            "provider": self.provider,
            "model": self.model,
            "endpoint": self.endpoint,
            "status": self.status,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": self.cost_usd,
            "latency_ms": self.latency_ms,
            "fingerprint": self.fingerprint,
            "stream": self.stream,
        }
        if self.attributes is not None:
            attributes = self.attributes.to_json()
            if attributes is not None:
                fields["attributes"] = attributes
        return fields


Recorder = Callable[[Event], None]
_HAS_USAGE = frozenset({UsageSource.REPORTED, UsageSource.REQUESTED})


_second = -1
_prefix = ""


def iso_ms(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC with milliseconds and ``Z``: ``2026-11-29T01:55:24.123Z``.
    (The formatted second is kept: consecutive events mostly share it.)"""
    global _second, _prefix
    ms = int(epoch * 1000)
    second = ms // 1000
    if second != _second:
        _second, _prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_prefix}.{ms % 1000:03d}Z"


# --------------------------------------------------------------------------- validation

# Matched whole (``fullmatch``): ``$`` would also match before a final newline, and let
# ``"openai\n"`` through as a provider of its own.
_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.:/@+-]{1,64}")
FIELDS = (
    "ts",
    "provider",
    "model",
    "endpoint",
    "status",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "latency_ms",
    "fingerprint",
    "stream",
)
_MAX_TOKENS = 10**12
_MAX_COST = 10**9
MAX_LATENCY_MS = 30 * 86400 * 1000  # 30 days: 2,592,000,000 ms
# An ingested event's ts may be at most this far ahead of this host's clock (clocks differ a
# little; an event a year ahead would show in every ``report --since`` for a year).
MAX_TS_AHEAD_SECONDS = 300


class InvalidEvent(ValueError):
    """An ingested event that cannot be stored; the message names the field."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _shown(value: Any) -> str:
    """A rejected value as an error message shows it: its repr, at most 60 characters, inert
    (an answer echoes no megabytes, and nothing that moves a terminal's cursor)."""
    return inert(_REPR.repr(value), 60)


def ts_epoch(ts: str) -> float:
    """Epoch seconds of an event's ``ts`` (``2026-11-29T01:55:24.123Z``, 0 to 6 fractional
    digits, as ``parse_event`` accepts it). Raises ValueError for anything else."""
    if not _TS.fullmatch(ts):
        raise ValueError(f"not an event timestamp: {_shown(ts)}")
    return datetime.fromisoformat(ts[:-1]).replace(tzinfo=UTC).timestamp()


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = obj[key]
    if type(value) is not int or not low <= value <= high:
        raise InvalidEvent(f"{key}: expected an integer from {low} to {high}, got {_shown(value)}")
    return value


def check_encodable(event: Event) -> None:
    """Encode ``event``'s ingest form as the store and the shipper will (orjson); InvalidEvent
    naming the first field that cannot be encoded (e.g. an integer past 64 bits: ``latency_ms:
    cannot be encoded as JSON: Integer exceeds 64-bit range``)."""
    fields = event.to_ingest()
    try:
        orjson.dumps(fields)
    except orjson.JSONEncodeError:
        for key, value in fields.items():
            try:
                orjson.dumps(value)
            except orjson.JSONEncodeError as exc:
                raise InvalidEvent(f"{key}: cannot be encoded as JSON: {exc}") from None
        raise  # pragma: no cover - the whole fails only where a field does


def parse_event(obj: Any, now: float | None = None) -> Event:
    """A validated ``Event`` from one ingested JSON object, or InvalidEvent naming the field.

    Every number is bounded: ``status`` 100-599, ``tokens_in`` / ``tokens_out`` integers from 0
    to 10**12, ``cost_usd`` 0 to 10**9 USD, ``latency_ms`` a whole number of milliseconds from 0
    to 30 days (``812`` or ``812.0``); ``ts`` is at most ``MAX_TS_AHEAD_SECONDS`` (5 minutes)
    ahead of ``now`` (epoch seconds; this host's clock unless given). ``model`` and ``endpoint``
    over 256 characters are refused; what is kept of them is inert (``proxy.text``: non-printable
    characters escaped, so at most 256 characters still). The event is then encoded once
    (``check_encodable``): what this accepts, the store can always write."""
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected an event object, got {type(obj).__name__}")
    missing = [key for key in FIELDS if key not in obj]
    if missing:
        raise InvalidEvent(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(obj) - set(FIELDS) - {"attributes"})
    if unknown:
        raise InvalidEvent(f"unknown field(s): {', '.join(unknown)}")
    ts = obj["ts"]
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise InvalidEvent(
            f"ts: expected ISO 8601 UTC like 2026-11-29T01:55:24.123Z, got {_shown(ts)}"
        )
    try:
        epoch = ts_epoch(ts)
    except ValueError:
        raise InvalidEvent(f"ts: not a real date and time: {_shown(ts)}") from None
    if epoch > (time.time() if now is None else now) + MAX_TS_AHEAD_SECONDS:
        raise InvalidEvent(
            f"ts: more than {MAX_TS_AHEAD_SECONDS // 60} minutes ahead of this host's clock,"
            f" got {_shown(ts)}"
        )
    provider = obj["provider"]
    if not isinstance(provider, str) or not _NAME.fullmatch(provider):
        raise InvalidEvent(f"provider: expected a name (1-64 characters), got {_shown(provider)}")
    model = obj["model"]
    if not isinstance(model, str) or len(model) > LIMIT:
        raise InvalidEvent(f"model: expected a string of at most {LIMIT} characters")
    endpoint = obj["endpoint"]
    if not isinstance(endpoint, str) or not endpoint.startswith("/") or len(endpoint) > LIMIT:
        raise InvalidEvent(
            f"endpoint: expected a path starting with '/' (at most {LIMIT} characters),"
            f" got {_shown(endpoint)}"
        )
    status = _int(obj, "status", 100, 599)
    tokens_in = _int(obj, "tokens_in", 0, _MAX_TOKENS)
    tokens_out = _int(obj, "tokens_out", 0, _MAX_TOKENS)
    cost = obj["cost_usd"]
    if type(cost) not in (int, float) or not math.isfinite(cost) or not 0 <= cost <= _MAX_COST:
        raise InvalidEvent(f"cost_usd: expected a number from 0 to {_MAX_COST}, got {_shown(cost)}")
    latency = obj["latency_ms"]
    if (
        type(latency) not in (int, float)
        or not 0 <= latency <= MAX_LATENCY_MS  # NaN fails this too
        or latency != int(latency)
    ):
        raise InvalidEvent(
            f"latency_ms: expected a whole number of milliseconds from 0 to {MAX_LATENCY_MS},"
            f" got {_shown(latency)}"
        )
    fingerprint = obj["fingerprint"]
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidEvent("fingerprint: expected 'sha256:' and 64 lowercase hex digits")
    stream = obj["stream"]
    if type(stream) is not bool:
        raise InvalidEvent(f"stream: expected true or false, got {_shown(stream)}")
    event = Event(
        ts=ts,
        provider=provider,
        model=inert(model),
        endpoint=inert(endpoint),
        status=status,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cost_usd=float(cost),
        latency_ms=int(latency),
        fingerprint=fingerprint,
        stream=stream,
        usage_source=UsageSource.REPORTED,
        priced=True,
        origin="ingest",
        attributes=parse_attributes(obj["attributes"]) if "attributes" in obj else None,
    )
    check_encodable(event)
    return event


_KEY_ID = re.compile(KEY_ID)
_ATTRIBUTE_MEMBERS = ("app", "user", "session", "tags", "key_id", "key_name", "process")
_MAX_PID = 2**22  # Linux's pid_max limit


def parse_attributes(obj: Any) -> Attributes | None:
    """An ingested event's ``attributes`` (DESIGN "Attribution"), validated: an object of
    ``app``, ``user``, ``session``, ``key_name`` (strings of 1-128 UTF-8 bytes), ``tags`` (an
    object of at most 10 names to values, each 1-128 bytes), ``key_id`` (``key_`` and 16
    lowercase hex digits) and ``process`` (``pid`` 1 to 2**22, ``exe`` and ``unit`` strings of
    1-128 bytes); every member optional. Strings are kept inert. None for ``{}``; InvalidEvent
    naming the member otherwise."""
    if not isinstance(obj, dict):
        raise InvalidEvent(f"attributes: expected an object, got {_shown(obj)}")
    unknown = sorted(set(obj) - set(_ATTRIBUTE_MEMBERS))
    if unknown:
        raise InvalidEvent(f"attributes: unknown member(s): {', '.join(map(_shown, unknown))}")
    tags: list[tuple[str, str]] = []
    raw_tags = obj.get("tags", {})
    if not isinstance(raw_tags, dict) or len(raw_tags) > MAX_TAGS:
        raise InvalidEvent(
            f"attributes.tags: expected an object of at most {MAX_TAGS} names to strings"
        )
    for name, value in raw_tags.items():
        tag = _attribute_text(name, "attributes.tags (a name)").lower()
        tags.append((tag, _attribute_text(value, f"attributes.tags.{tag}")))
    key_id = obj.get("key_id")
    if key_id is not None and (not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id)):
        raise InvalidEvent("attributes.key_id: expected 'key_' and 16 lowercase hex digits")
    process = None
    raw = obj.get("process")
    if raw is not None:
        if not isinstance(raw, dict) or not set(raw) <= {"pid", "exe", "unit"} or "pid" not in raw:
            raise InvalidEvent(
                "attributes.process: expected an object with pid and optional exe, unit"
            )
        pid = raw["pid"]
        if type(pid) is not int or not 1 <= pid <= _MAX_PID:
            raise InvalidEvent(
                f"attributes.process.pid: expected an integer from 1 to {_MAX_PID},"
                f" got {_shown(pid)}"
            )
        process = Process(
            pid,
            _optional_text(raw, "exe", "attributes.process.exe"),
            _optional_text(raw, "unit", "attributes.process.unit"),
        )
    attributes = Attributes(
        app=_optional_text(obj, "app", "attributes.app"),
        user=_optional_text(obj, "user", "attributes.user"),
        session=_optional_text(obj, "session", "attributes.session"),
        tags=tuple(dict(tags).items()),
        key_id=key_id,
        key_name=_optional_text(obj, "key_name", "attributes.key_name"),
        process=process,
    )
    return attributes if attributes else None


def _optional_text(obj: dict[str, Any], key: str, name: str) -> str | None:
    return _attribute_text(obj[key], name) if key in obj else None


def _attribute_text(value: Any, name: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_BYTES
        or len(value.encode("utf-8", "surrogatepass")) > MAX_BYTES
    ):
        raise InvalidEvent(f"{name}: expected a string of 1-{MAX_BYTES} bytes, got {_shown(value)}")
    return bounded(value)
