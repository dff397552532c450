"""The kill switch: the org's kill flag.

``KillSwitch`` is the org's flag. It lives in memory for the hot path — a check is one float
comparison — and in the store, so a suspension survives restarts. It expires by itself at
``expires_at`` (never extended locally); a suspension by the AtlasBurn API (``guardrail_status:
"suspended"`` in an ingest answer) has no expiry and lasts until the API answers ``ok`` again.
Changing it is synchronous in memory (the very next request sees it); persisting follows in the
background, or is awaited where an answer promises it (the local API).

Every change carries a ``version`` (epoch milliseconds when it was made; 1 for a flag restored
from the store, 0 for none): in a fleet (``guardrails.fleet``) the newest change wins.
``watchers`` hear of each change made here; ``apply`` takes one made elsewhere in the fleet,
without telling them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..events import iso_ms
from ..store import GuardrailRow, Store
from ..text import inert

log = logging.getLogger(__name__)

SERVER_LAYER = "atlasburn_api"


@dataclass(frozen=True, slots=True)
class Suspension:
    org_id: str
    layer: str
    reason: str
    # "server" (the AtlasBurn API), "local" (a local layer), "api" (an operator); "conversation"
    # for the refusal of one request by the agent-loop detector, which suspends nothing.
    source: str
    expires_at: float | None  # epoch seconds; None: until cleared

    def seconds_left(self, now: float) -> float | None:
        return None if self.expires_at is None else max(0.0, self.expires_at - now)

    def expires_iso(self) -> str | None:
        return None if self.expires_at is None else iso_ms(self.expires_at)


class KillSwitch:
    """The org's kill flag: ``check()`` on the hot path, ``suspend``/``clear`` to change it."""

    def __init__(self, org_id: str, store: Store | None) -> None:
        self.org_id = org_id
        self._store = store
        self._current: Suspension | None = None
        self._until = 0.0  # fast path: 0 = not suspended; inf = until cleared
        # Called with each new local suspension (the shipper reports them to the API).
        self.listeners: list[Callable[[Suspension], None]] = []
        # Called with every change made on this daemon: the suspension (None: cleared), and
        # its version (the fleet sync shares it).
        self.watchers: list[Callable[[Suspension | None, int], None]] = []
        self.version = 0  # of the last change: epoch ms; 1 for a restored flag, 0 for none
        self.cleared = False  # the last change was a clear (not a suspension that expired)

    @property
    def key(self) -> str:
        return f"guardrail:{self.org_id}"

    async def load(self) -> None:
        """Restore the flag from the store (an expired one stays off)."""
        if self._store is None:
            return
        for row in await self._store.load_guardrails():
            if row.org_id != self.org_id or row.state != "suspended":
                continue
            # Inert: a spool written by an older version may hold any reason a client sent.
            suspension = Suspension(
                row.org_id,
                inert(row.layer or ""),
                inert(row.reason or ""),
                row.source or "",
                row.expires_at,
            )
            if suspension.expires_at is None or suspension.expires_at > time.time():
                self._set(suspension)
                # Older than any change made since (in the fleet too), newer than none.
                self.version = max(self.version, 1)
                log.warning(
                    "org %s is suspended (%s: %s) until %s",
                    self.org_id,
                    suspension.layer,
                    suspension.reason,
                    suspension.expires_iso() or "the AtlasBurn API resumes it",
                )

    def check(self, now: float | None = None) -> Suspension | None:
        """The suspension in force, or None (one float comparison when there is none)."""
        if not self._until:
            return None
        if (time.time() if now is None else now) >= self._until:
            self._current, self._until = None, 0.0
            return None
        return self._current

    @property
    def status(self) -> str:
        return "suspended" if self.check() is not None else "ok"

    def suspend_now(
        self, layer: str, reason: str, ttl_seconds: float | None, source: str
    ) -> tuple[Suspension, asyncio.Task[None]]:
        """Suspend at once (the next request is refused); the task persists it."""
        from ..tasks import spawn

        expires = None if ttl_seconds is None else time.time() + ttl_seconds
        # The reason is logged, stored, shipped and put into every refusal: bounded, inert.
        suspension = Suspension(self.org_id, inert(layer), inert(reason), source, expires)
        self._set(suspension)
        self._changed(suspension)
        log.warning(
            "guardrail: org %s suspended by %s (%s) until %s",
            self.org_id,
            layer,
            reason,
            suspension.expires_iso() or "resumed",
        )
        for listener in self.listeners:
            listener(suspension)
        return suspension, spawn(self._persist("suspended", suspension), name="persist-kill")

    async def suspend(
        self, layer: str, reason: str, ttl_seconds: float | None, source: str
    ) -> Suspension:
        """Suspend, and return once the flag is also on disk."""
        suspension, persisted = self.suspend_now(layer, reason, ttl_seconds, source)
        await persisted
        return suspension

    async def clear(self, reason: str, source: str) -> None:
        reason = inert(reason)
        previous = self._current
        self._current, self._until = None, 0.0
        self._changed(None)
        log.warning("guardrail: org %s resumed by %s (%s)", self.org_id, source, reason)
        await self._persist("ok", previous, reason=reason, source=source)

    def apply(self, suspension: Suspension | None, version: int, reason: str = "") -> bool:
        """Take a change made elsewhere in the fleet (``suspension``, or None for a clear) if
        it is newer than this daemon's (``version``, epoch ms); persisted in the background.
        Watchers and listeners are not told (it is not this daemon's to share or report).
        Whether it was newer."""
        from ..tasks import spawn

        if version <= self.version:
            return False
        self.version = version
        self.cleared = suspension is None
        previous = self._current
        if suspension is not None:
            suspension = replace(
                suspension, layer=inert(suspension.layer), reason=inert(suspension.reason)
            )
            self._set(suspension)
            log.warning(
                "guardrail: org %s suspended by %s (%s) until %s, from the fleet",
                self.org_id,
                suspension.layer,
                suspension.reason,
                suspension.expires_iso() or "resumed",
            )
            spawn(self._persist("suspended", suspension), name="persist-kill")
        elif previous is not None:
            self._current, self._until = None, 0.0
            reason = inert(reason) or "resumed elsewhere in the fleet"
            log.warning("guardrail: org %s resumed, from the fleet (%s)", self.org_id, reason)
            spawn(self._persist("ok", previous, reason=reason, source="fleet"), name="persist-kill")
        return True

    def _changed(self, suspension: Suspension | None) -> None:
        # Strictly increasing, so two changes within one millisecond keep their order.
        self.version = max(int(time.time() * 1000), self.version + 1)
        self.cleared = suspension is None
        for watcher in self.watchers:
            watcher(suspension, self.version)

    def _set(self, suspension: Suspension) -> None:
        self._current = suspension
        self._until = math.inf if suspension.expires_at is None else suspension.expires_at

    async def _persist(
        self,
        state: str,
        suspension: Suspension | None,
        reason: str | None = None,
        source: str | None = None,
    ) -> None:
        if self._store is None:
            return
        row = GuardrailRow(
            org_id=self.org_id,
            state=state,
            expires_at=suspension.expires_at if suspension and state == "suspended" else None,
            layer=suspension.layer if suspension else None,
            reason=reason if reason is not None else (suspension.reason if suspension else None),
            source=source if source is not None else (suspension.source if suspension else None),
        )
        try:
            await self._store.save_guardrail(row)
        except Exception:  # the flag still holds in memory; say that it will not survive
            log.exception("guardrail: could not persist the kill flag; it holds until restart")
