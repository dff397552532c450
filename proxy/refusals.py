"""Where an injected ``stream_options`` was refused: remembered per target, bounded, expiring.

The daemon asks OpenAI-shaped chat and completion streams for their usage
(``stream_options.include_usage``). Some hosts reject the option with a 400 naming it: an Azure
deployment behind an ``api-version`` older than 2024-09-01, a self-hosted server of an older
release. That is a property of one target, not of the whole provider: the same Azure resource
serves old and new API versions and many deployments, and an OpenAI-compatible gateway routes
each model elsewhere. So a refusal is remembered for its ``Target`` only, (provider, deployment or
model, api-version), and other targets keep being asked.

Bounded and expiring: at most ``MAX_TARGETS`` targets are remembered (the oldest refusal is
forgotten first), each for ``TTL_SECONDS`` (an hour): a deployment that gets upgraded, or a
host that starts accepting the option, has its streams metered again within the hour; until
then its streams are relayed as the client sent them, at no extra cost (a remembered refusal
saves the 400 round trip on every request).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .adapters.azure import split_deployment
from .text import inert

TTL_SECONDS = 3600.0  # how long a refusal is believed
MAX_TARGETS = 1024  # targets remembered at once; each entry is a few hundred bytes at most


class Target(NamedTuple):
    """What a refusal is remembered for. ``name`` is the Azure deployment of the path, else the
    body's ``model`` ("" when neither); ``api_version`` is the query's ``api-version`` ("" when
    none). Both are bounded (``proxy.text.inert``): the client chooses them."""

    provider: str
    name: str
    api_version: str

    @classmethod
    def of(cls, provider: str, path: str, query: Mapping[str, str], body: Any) -> Target:
        name = split_deployment(path)[0]
        if name is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            name = body["model"]
        return cls(provider, inert(name or ""), inert(query.get("api-version", "")))

    def __str__(self) -> str:
        version = f" (api-version {self.api_version})" if self.api_version else ""
        return f"{self.provider} {self.name or '(no model)'}{version}"


class Refusals:
    """The targets that refused ``stream_options`` lately: ``refused(target)`` and ``add``."""

    def __init__(
        self,
        ttl_seconds: float = TTL_SECONDS,
        max_targets: int = MAX_TARGETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.max_targets = max_targets
        self._clock = clock
        # target -> when its refusal expires (clock seconds); oldest refusal first.
        self._until: OrderedDict[Target, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def refused(self, target: Target) -> bool:
        """Whether ``target`` refused the option less than ``ttl`` seconds ago."""
        until = self._until.get(target)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[target]
        return False

    def add(self, target: Target) -> None:
        """``target`` refused the option now."""
        self._until.pop(target, None)
        self._until[target] = self._clock() + self.ttl
        while len(self._until) > self.max_targets:
            self._until.popitem(last=False)
