"""Budgets per scope (``[[guardrails.budgets]]``; DESIGN "Attribution", budgets).

A budget caps the spend of the requests it matches (by app, user, key, unit, model, provider or
tag) over rolling windows: the last 60 minutes and the last 24 hours, in minute buckets as the
spend cap keeps them. Crossing one refuses only the requests it matches (429, layer ``budget``)
until enough spend has aged out of the window; the org is never suspended, other traffic flows.

On the hot path a request costs ``matching`` (the values of the dimensions budgets name, then a
dict lookup once those were seen: results are cached, bounded by ``MAX_CACHED``; one test when
no budget is configured; about 1 us with 21 budgets, 11 us at a first sight) and ``check`` (one
float comparison per matched budget: whether a budget is over is worked out when spend is
added, not per request).

Restarts: each event carries the names of the budgets its spend counts in (``Event.budgets``,
set by the relay); the store adds that spend per budget and minute in the same group commit as
the event itself (table ``budget_spend``), and ``restore`` takes the last day of it back at
start. Keeping it beside the events, rather than in a file of its own, costs no extra fsync and
can never disagree with the events committed: what is lost in a crash (the last commit interval)
is lost from both. Spend is kept by budget name: a budget renamed, or newly added, starts at $0;
one whose ``match`` changed keeps its name's spend over a restart (a reload, which can tell,
starts it at $0).

Fleet (``[fleet] redis_url``): each daemon adds its spend to one Redis hash per budget and the
fleet's totals come back within a second (``proxy.guardrails.fleet``); a budget is over when this
daemon's own spend or the fleet's total is over. No request waits on Redis.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..attribution import Attributes
from ..config import BudgetConfig
from .kill_switch import Suspension
from .spend import usd_text

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger(__name__)

BUDGET_LAYER = "budget"
MAX_CACHED = 4096  # distinct (provider, model, matched dimensions) whose budgets are remembered
WINDOWS = ((3600, "hour", "max_usd_per_hour"), (86400, "day", "max_usd_per_day"))
_NONE = Attributes()


@dataclass(frozen=True, slots=True)
class BudgetSuspension(Suspension):
    """The refusal of one request by a budget: nothing is suspended (``source`` "budget").
    ``budget`` is its name, ``key`` the config key whose limit was crossed."""

    budget: str = ""
    key: str = ""

    def message(self, seconds: int) -> str:
        """The refusal's text for the client, ``seconds`` until the budget allows again."""
        return (
            f"AtlasBurn guardrail budget: {self.reason}; requests it matches are refused for"
            f" {seconds}s more (other traffic flows). To allow more, raise {self.key} of the"
            f" [[guardrails.budgets]] entry named '{self.budget}' and reload"
        )


class _Window:
    """One window of one budget: its limit, the spend inside (running total), and whether the
    warning for it was given."""

    __slots__ = ("seconds", "label", "key", "limit", "warn", "buckets", "total", "warned")

    def __init__(self, seconds: int, label: str, key: str, limit: float, warn_at: float) -> None:
        self.seconds = seconds
        self.label = label
        self.key = key
        self.limit = limit
        self.warn = limit * warn_at
        self.buckets: deque[list[float]] = deque()  # [minute start, usd], shared with the day's
        self.total = 0.0
        self.warned = False

    def expire(self, now: float) -> None:
        buckets = self.buckets
        cutoff = now - self.seconds
        while buckets and buckets[0][0] <= cutoff:
            self.total -= buckets.popleft()[1]
        if not buckets:
            self.total = 0.0

    def exact(self) -> float:
        """The sum again from the buckets (the running total drifts by float rounding)."""
        self.total = math.fsum(usd for _, usd in self.buckets)
        return self.total

    def until_under(self, now: float, spent: float) -> float:
        """Seconds until enough of ``spent`` has aged out to be at or under the limit."""
        left = spent
        for minute, usd in self.buckets:
            left -= usd
            if left <= self.limit:  # once this minute has left the window
                return max(minute + self.seconds - now, 1.0)
        return 60.0


class Budget:
    """One configured budget: its windows, this daemon's spend in them, and the fleet's view."""

    __slots__ = ("config", "name", "match", "windows", "_day", "until", "refusal", "fleet_totals")

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self.name = config.name
        self.match = config.match
        limits = {"hour": config.max_usd_per_hour, "day": config.max_usd_per_day}
        self.windows = tuple(
            _Window(seconds, label, key, limits[label], config.warn_at)
            for seconds, label, key in WINDOWS
            if limits[label] > 0
        )
        self._day: deque[list[float]] = deque()  # this daemon's minutes of the last day
        self.until = 0.0  # refused until (epoch s); 0: not over
        self.refusal: BudgetSuspension | None = None
        # Window label -> the fleet's total (USD) and until when it is over (epoch s; 0: under),
        # as Redis last answered; empty without a fleet, or while Redis is away.
        self.fleet_totals: dict[str, tuple[float, float]] = {}

    def matches(self, values: dict[str, str | None]) -> bool:
        """Whether every dimension of ``match`` has a value (in ``values``) its pattern fits."""
        for dimension, pattern in self.match:
            value = values.get(dimension)
            if not value or not fnmatchcase(value, pattern):
                return False
        return True

    def minutes(self) -> list[tuple[float, float]]:
        """This daemon's own spend: (minute start, USD) of the last day, oldest first."""
        return [(m, usd) for m, usd in self._day]

    def restore(self, buckets: Iterable[tuple[float, float]], now: float) -> None:
        for minute, usd in buckets:
            self._put(minute, usd)
        for window in self.windows:
            window.expire(now)
            window.exact()

    def add(self, usd: float, now: float) -> None:
        self._put(now - now % 60, usd)

    def _put(self, minute: float, usd: float) -> None:
        day = self._day
        if day and day[-1][0] == minute:
            day[-1][1] += usd
            for window in self.windows:
                window.total += usd
            return
        bucket = [minute, usd]
        day.append(bucket)
        while day and day[0][0] <= minute - 86400:
            day.popleft()
        for window in self.windows:
            window.buckets.append(bucket)
            window.total += usd

    def spent(self, window: _Window, now: float) -> float:
        """The window's spend: this daemon's, or the fleet's total when that is larger."""
        window.expire(now)
        fleet = self.fleet_totals.get(window.label)
        return window.total if fleet is None else max(window.total, fleet[0])


class Budgets:
    """The configured budgets: ``matching`` and ``check`` on the hot path, ``add`` as each
    request ends."""

    def __init__(self, budgets: tuple[BudgetConfig, ...] = ()) -> None:
        self.budgets: dict[str, Budget] = {}
        self.fleet: Fleet | None = None  # the fleet's totals too, with [fleet] redis_url
        self.warnings: dict[tuple[str, str], int] = {}  # (budget, window) -> warnings given
        # The values of the dimensions any budget names -> the budgets they match.
        self._dimensions: tuple[str, ...] = ()  # those dimensions, besides provider and model
        self._by_process: tuple[Budget, ...] = ()  # the budgets that match by ``unit``
        self._cache: dict[tuple[str | None, ...], tuple[str, ...]] = {}
        self.configure(budgets)

    def configure(self, budgets: tuple[BudgetConfig, ...]) -> None:
        """Take a (re)loaded config: a budget whose name and match are unchanged keeps its
        spend (its limits may change); any other starts at $0."""
        old = self.budgets
        new: dict[str, Budget] = {}
        for config in budgets:
            kept = old.get(config.name)
            budget = Budget(config)
            if kept is not None and kept.match == config.match:
                budget.restore(kept.minutes(), time.time())
                budget.fleet_totals = kept.fleet_totals
            new[config.name] = budget
        self.budgets = new
        named = {d for b in new.values() for d, _ in b.match} - {"provider", "model"}
        self._dimensions = tuple(sorted(named))
        self._by_process = tuple(b for b in new.values() if any(d == "unit" for d, _ in b.match))
        self._cache = {}
        now = time.time()
        for budget in new.values():  # new limits: over or not, from the spend as it stands
            self._judge(budget, now, warn=False)

    @property
    def active(self) -> bool:
        return bool(self.budgets)

    def over_by_process(self, now: float) -> bool:
        """Whether a budget that matches by the calling process (``unit``) refuses now. A new
        connection's process is found after its first request arrives: while such a budget is
        over, that request waits for the lookup (the relay), or a client that opens one
        connection per request (curl, ``requests.post``) would never be refused."""
        return any(b.until > now for b in self._by_process)

    def matching(self, attributes: Attributes | None, provider: str, model: str) -> tuple[str, ...]:
        """The names of the budgets a request counts in, in config order. Cached by the values
        of the dimensions budgets name (not by the whole attributes: a new session or pid of
        the same app is no new entry)."""
        if not self.budgets:
            return ()
        attrs = attributes or _NONE
        key = (provider, model, *[attrs.dimension(d) for d in self._dimensions])
        found = self._cache.get(key)
        if found is None:
            values = dict(zip(("provider", "model", *self._dimensions), key, strict=True))
            found = tuple(name for name, b in self.budgets.items() if b.matches(values))
            if len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]  # the one seen first
            self._cache[key] = found
        return found

    def check(self, matched: tuple[str, ...], now: float) -> BudgetSuspension | None:
        """The refusal of a request that counts in ``matched``, when one of them is over."""
        refusal: BudgetSuspension | None = None
        for name in matched:
            budget = self.budgets.get(name)
            if budget is not None and budget.until > now and budget.refusal is not None:
                if refusal is None or (budget.until > (refusal.expires_at or 0.0)):
                    refusal = budget.refusal  # the one that allows again last
        return refusal

    def add(self, matched: tuple[str, ...], usd: float, now: float | None = None) -> None:
        """Spend (USD) of a request that counted in ``matched``."""
        now = time.time() if now is None else now
        fleet = self.fleet
        for name in matched:
            budget = self.budgets.get(name)
            if budget is None:  # gone with a reload while the request ran
                continue
            budget.add(usd, now)
            if fleet is not None:
                fleet.budget_spent(name, usd, now)
            self._judge(budget, now)

    def restore(
        self, spend: dict[str, list[tuple[float, float]]], now: float | None = None
    ) -> None:
        """Minute buckets (start, USD) per budget name from the store, oldest first."""
        now = time.time() if now is None else now
        for name, buckets in spend.items():
            budget = self.budgets.get(name)
            if budget is not None:
                budget.restore(buckets, now)
                self._judge(budget, now, warn=False)

    def fleet_view(self, name: str, totals: dict[str, tuple[float, float]], now: float) -> None:
        """The fleet's totals of a budget, as Redis answered: window label -> (USD, seconds
        until it is under its limit; 0 when under)."""
        budget = self.budgets.get(name)
        if budget is None:
            return
        budget.fleet_totals = {
            label: (usd, now + wait if wait > 0 else 0.0) for label, (usd, wait) in totals.items()
        }
        self._judge(budget, now)

    def fleet_lost(self) -> None:
        """Redis is away: each budget goes by this daemon's own spend until it is back."""
        now = time.time()
        for budget in self.budgets.values():
            if budget.fleet_totals:
                budget.fleet_totals = {}
                self._judge(budget, now, warn=False)

    def _judge(self, budget: Budget, now: float, warn: bool = True) -> None:
        """Whether the budget is over (and until when), and the warnings when crossing."""
        over: tuple[float, _Window, float] | None = None
        for window in budget.windows:
            spent = budget.spent(window, now)
            fleet_usd, fleet_until = budget.fleet_totals.get(window.label, (0.0, 0.0))
            if spent >= window.warn:
                spent = max(window.exact(), fleet_usd)
            if spent > window.limit:
                wait = fleet_until - now if spent == fleet_usd else 0.0
                if window.total > window.limit:
                    wait = max(wait, window.until_under(now, window.total))
                wait = max(wait, 1.0)
                if over is None or wait > over[0]:
                    over = (wait, window, spent)
            if spent >= window.warn:
                if not window.warned and warn:
                    self._warn(budget, window, spent)
                window.warned = True
            else:
                window.warned = False
        if over is None:
            budget.until, budget.refusal = 0.0, None
            return
        wait, window, spent = over
        whose = "" if spent <= window.total else "the fleet "
        reason = (
            f"budget '{budget.name}' {whose}spent {_usd(spent)} in the last {window.label},"
            f" over its {usd_text(window.limit)} limit"
        )
        budget.until = now + wait
        budget.refusal = BudgetSuspension(
            "", BUDGET_LAYER, reason, "budget", budget.until, budget.name, window.key
        )

    def _warn(self, budget: Budget, window: _Window, spent: float) -> None:
        key = (budget.name, window.label)
        self.warnings[key] = self.warnings.get(key, 0) + 1
        log.warning(
            "budget '%s' spent %s in the last %s: %.0f%% of its %s limit (warn_at %g)",
            budget.name,
            _usd(spent),
            window.label,
            spent / window.limit * 100,
            usd_text(window.limit),
            budget.config.warn_at,
        )

    def state(self, now: float | None = None) -> list[tuple[str, str, float, float, int]]:
        """(budget, window, USD spent, USD limit, warnings given) for every budget's windows,
        for /metrics."""
        now = time.time() if now is None else now
        out = []
        for budget in self.budgets.values():
            for window in budget.windows:
                spent = budget.spent(window, now)
                warned = self.warnings.get((budget.name, window.label), 0)
                out.append((budget.name, window.label, spent, window.limit, warned))
        return out


def _usd(amount: float) -> str:
    """A budget's spend: 4 decimals from a dollar up (``$5.0123``), 6 below."""
    return f"${amount:,.4f}" if amount >= 1 else f"${amount:.6f}"
