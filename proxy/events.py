"""The telemetry event: one per proxied request, in the AtlasBurn ingest schema.

``Event`` holds the schema's fields plus two local-only ones (``usage_source``, ``priced``) that say
how its numbers were obtained; ``to_ingest`` gives the shipped form without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .adapters.base import UsageSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
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
    # Local only: how the token numbers were obtained, and whether the model had a price.
    usage_source: UsageSource
    priced: bool

    def to_ingest(self) -> dict[str, Any]:
        return {
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


Recorder = Callable[[Event], None]


def iso_ms(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC with milliseconds and ``Z``: ``2026-11-29T01:55:24.123Z``."""
    ms = int(epoch * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def log_event(event: Event) -> None:
    """The recorder until the spool exists: one debug line per event."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("event %s", event.to_ingest())
