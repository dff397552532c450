"""The spend cap: rolling hourly and daily USD sums of the daemon's own priced events."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from ..config import SpendCapConfig

if TYPE_CHECKING:
    from .fleet import Fleet

SPEND_LAYER = "spend_cap"


class SpendCap:
    """Rolling hourly and daily spend in minute buckets; ``add`` says when a cap is crossed."""

    def __init__(self, config: SpendCapConfig) -> None:
        self._buckets: deque[list[float]] = deque()  # [minute start (epoch), usd], oldest first
        self.fleet: Fleet | None = None  # the fleet's spend too, with [fleet] redis_url
        self.configure(config)

    def configure(self, config: SpendCapConfig) -> None:
        self.enabled = config.enabled
        self.limits = tuple(
            (seconds, limit, label)
            for seconds, limit, label in (
                (3600, config.max_usd_per_hour, "hour"),
                (86400, config.max_usd_per_day, "day"),
            )
            if limit > 0
        )

    def caps(self) -> tuple[float, float]:
        """(USD per hour, USD per day); 0 for a cap that is not set."""
        hour = day = 0.0
        for seconds, limit, _ in self.limits:
            if seconds == 3600:
                hour = limit
            else:
                day = limit
        return hour, day

    def minutes(self) -> list[tuple[float, float]]:
        """This daemon's own spend: (minute start, USD) of the last day, oldest first."""
        return [(m, usd) for m, usd in self._buckets]

    def restore(self, buckets: list[tuple[float, float]]) -> None:
        """Minute buckets (start, usd) from the store, oldest first."""
        self._buckets = deque([m, usd] for m, usd in buckets)

    def add(self, usd: float, now: float | None = None) -> tuple[str, float] | None:
        """Add spend; (reason, seconds until the window allows again) when over a cap."""
        now = time.time() if now is None else now
        if self.fleet is not None:
            self.fleet.spent(usd, now)
        minute = now - now % 60
        buckets = self._buckets
        if buckets and buckets[-1][0] == minute:
            buckets[-1][1] += usd
        else:
            buckets.append([minute, usd])
        while buckets and buckets[0][0] <= now - 86400:
            buckets.popleft()
        for seconds, limit, label in self.limits:
            spent, ttl = self._window(now, seconds, limit)
            if spent > limit:
                return (
                    f"spent {usd_text(spent)} in the last {label},"
                    f" over the cap of {usd_text(limit)}",
                    ttl,
                )
        return None

    def _window(self, now: float, seconds: float, limit: float) -> tuple[float, float]:
        """(spend in the window, seconds until enough of it has aged out to be under limit)."""
        inside = [(m, usd) for m, usd in self._buckets if m > now - seconds]
        spent = sum(usd for _, usd in inside)
        if spent <= limit:
            return spent, 0.0
        left = spent
        for m, usd in inside:
            left -= usd
            if left <= limit:  # once this minute has aged out of the window
                return spent, max(m + seconds - now, 1.0)
        return spent, 60.0


def usd_text(amount: float) -> str:
    """``$1,234.50`` from a dollar up, ``$0.001234`` below."""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.6f}"
