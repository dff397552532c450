"""Guardrails: the layers that refuse requests, one module each.

- ``kill_switch``: the org's kill flag (``KillSwitch``), checked first on every request; every
  other layer trips by setting it (or, scoped, by refusing only what it matched).
- ``dumb_loop``: the dumb loop detector (``LoopDetector``, ``LoopGuard``): the
  ``threshold``-th identical request (by fingerprint) within ``window_seconds`` trips it.
- ``agent_loop``: the agent-loop detector (``AgentLoopDetector``): a tool call answered by the
  same result ``threshold`` times among a conversation's last ``lookback`` calls trips it.
- ``spend``: the spend cap (``SpendCap``): rolling hourly and daily USD sums of the daemon's
  own priced events in minute buckets.
- ``budgets``: budgets per scope (``Budgets``): the spend of the requests each
  ``[[guardrails.budgets]]`` entry matches, capped per rolling hour and day; crossing one
  refuses only what it matches.
- ``fleet``: the fleet sync (``Fleet``, with ``[fleet] redis_url``): the kill flag, the loop
  count, the spend total and the budgets' totals shared by every daemon of the org through
  Redis, in the background.

The relay, the local API and the shipper import what they need from here.
"""

from .agent_loop import AGENT_LOOP_LAYER, AgentLoopDetector
from .budgets import BUDGET_LAYER, Budgets, BudgetSuspension
from .dumb_loop import LOOP_LAYER, RETRY_HEADER, LoopDetector, LoopGuard, RecentKeys, Trip
from .kill_switch import SERVER_LAYER, KillSwitch, Suspension
from .spend import SPEND_LAYER, SpendCap

__all__ = [
    "AGENT_LOOP_LAYER",
    "AgentLoopDetector",
    "BUDGET_LAYER",
    "Budgets",
    "BudgetSuspension",
    "LOOP_LAYER",
    "RETRY_HEADER",
    "SERVER_LAYER",
    "SPEND_LAYER",
    "KillSwitch",
    "LoopDetector",
    "LoopGuard",
    "RecentKeys",
    "SpendCap",
    "Suspension",
    "Trip",
]
