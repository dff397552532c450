"""Every layer on (``python -m bench --layers``; issue 19): a second daemon,
``atlasburn-proxy+layers``, in the same interleaved rounds as ``atlasburn-proxy`` (the default
config), with its own spool and ingest:

- fleet mode against the bench's local ``redis-server`` (``bench/fleet.py``: ``RedisServer``,
  ``fleet_config``), with the spend cap on (a cap never reached) so spend is flushed to Redis;
- the dumb and the agent-loop detectors (both on by default);
- attribution with the calling process looked up (on by default; with ``--layers`` every
  client sends ``AtlasBurn-App``, ``-User``, ``-Tag-Team`` and an ``Authorization`` key:
  ``bench/attribution.py`` ``HEADERS``, to every target);
- a budget matching the app (``[[guardrails.budgets]]``, ``app = "bench-app"``), with limits
  never reached: each request's spend counts in it.

``targets_table`` sets every daemon of a scenario against the pass-through, the way issue 19
states its targets: throughput ÷ the pass-through's (the medians of the rounds, and each
round's ratio), added p50 (against direct) of the daemon and of the pass-through, CPU per
request of each and their ratio; then which target holds (throughput ≥ 1.0×, added p50 ≤ the
pass-through's, CPU per request ≤ 1.2× at concurrency 1 and 16, ≤ 1.0× at 64).
"""

from __future__ import annotations

from typing import Any

from . import by_scenario, markdown, round_ratios
from .attribution import HEADERS
from .fleet import SPEND_CAP, fleet_config

LAYERS_TARGET = "atlasburn-proxy+layers"
BUDGET = (
    "[[guardrails.budgets]]\n"
    'name = "bench-app"\n'
    f'match = {{ app = "{HEADERS["AtlasBurn-App"]}" }}\n'
    "max_usd_per_hour = 1000000.0\n"
    "max_usd_per_day = 10000000.0\n"
)


def layers_config(redis_url: str) -> str:
    """The extra config of ``LAYERS_TARGET`` (after the bench's base config; the loop
    detectors and attribution are on by default)."""
    return (
        SPEND_CAP
        + BUDGET
        + fleet_config(redis_url)
        + "[attribution]\nenabled = true\nprocess = true\n"
        + "[guardrails.agent_loop_detector]\nenabled = true\n"
    )


def cpu_target(concurrency: int) -> float:
    """Issue 19: CPU per request at most this many times the pass-through's."""
    return 1.0 if concurrency >= 64 else 1.2


def targets_table(results: list[Any]) -> str:
    """Each daemon against the pass-through, per scenario (``results``: the bench's Results)."""
    head = [
        "scenario", "daemon", "req/s ÷ pass", "per round", "+p50 ms daemon", "+p50 ms pass",
        "CPU µs/req daemon", "CPU µs/req pass", "CPU ÷ pass", "throughput ≥ 1.0",
        "+p50 ≤ pass", "CPU",
    ]  # fmt: skip
    rows = [head]
    for name, group in by_scenario(results).items():
        direct, passthrough = group.get("direct"), group.get("pass-through")
        if direct is None or passthrough is None:
            continue
        for target, r in group.items():
            if target in ("direct", "pass-through") or not r.cpu_us or not passthrough.cpu_us:
                continue
            ratio = r.rps / passthrough.rps
            added, added_pass = r.p50_ms - direct.p50_ms, passthrough.p50_ms - direct.p50_ms
            cpu = r.cpu_us / passthrough.cpu_us
            limit = cpu_target(r.scenario.concurrency)
            rows.append(
                [
                    name,
                    target,
                    f"{ratio:.2f}",
                    round_ratios(r, passthrough, 0),
                    f"{added:+.2f}",
                    f"{added_pass:+.2f}",
                    f"{r.cpu_us:,.0f}",
                    f"{passthrough.cpu_us:,.0f}",
                    f"{cpu:.2f}",
                    "met" if ratio >= 1.0 else f"MISSED by {(1.0 - ratio) * 100:.0f}%",
                    "met" if added <= added_pass else f"MISSED by {added - added_pass:.2f} ms",
                    f"≤ {limit:.1f}: "
                    + ("met" if cpu <= limit else f"MISSED by {(cpu / limit - 1) * 100:.0f}%"),
                ]
            )
    return markdown(rows) if len(rows) > 1 else ""
