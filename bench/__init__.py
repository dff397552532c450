"""Benchmarks for atlasburn-proxy (see bench/README.md)."""

from __future__ import annotations

import statistics
from typing import Any, Protocol

TIMING_HEAD = (
    "scenario",
    "target",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "+p50 ms",
    "+p99 ms",
    "vs pass",
    "CPU µs/req",
)


class Timed(Protocol):
    """What a table row of one target needs: throughput, percentiles (ms), CPU per request."""

    @property
    def rps(self) -> float: ...
    @property
    def p50_ms(self) -> float: ...
    @property
    def p90_ms(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...
    @property
    def cpu_us(self) -> float | None: ...


def timing_cells(
    scenario: str, target: str, r: Timed, direct: Timed, passthrough: Timed
) -> list[str]:
    """The cells of TIMING_HEAD for one target: added latency against direct, throughput
    against the pass-through."""
    first = target == "direct"
    return [
        scenario if first else "",
        target,
        f"{r.rps:,.0f}",
        f"{r.p50_ms:.2f}",
        f"{r.p90_ms:.2f}",
        f"{r.p99_ms:.2f}",
        "" if first else f"{r.p50_ms - direct.p50_ms:+.2f}",
        "" if first else f"{r.p99_ms - direct.p99_ms:+.2f}",
        "" if first else f"{r.rps / passthrough.rps:.2f}x",
        "" if r.cpu_us is None else f"{r.cpu_us:,.0f}",
    ]


def by_scenario(results: list[Any]) -> dict[str, dict[str, Any]]:
    """Results (the bench's ``Result``s) grouped: scenario name -> target -> result."""
    grouped: dict[str, dict[str, Any]] = {}
    for r in results:
        grouped.setdefault(r.scenario.name, {})[r.target] = r
    return grouped


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table, columns padded; the first row is the head."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def round_ratios(on: Any, off: Any, column: int) -> str:
    """Each interleaved round's ratio of two targets (``column`` 0: req/s, 1: CPU per request)
    and their median, e.g. ``0.98 1.01 0.99 (median 0.990)``: the two measured one right after
    the other, so a ratio holds where the machine's load moved between rounds."""
    ratios = [
        a[column] / b[column]
        for a, b in zip(
            on.rounds or [(on.rps, on.cpu_us)], off.rounds or [(off.rps, off.cpu_us)], strict=True
        )
        if a[column] and b[column]
    ]
    if not ratios:
        return ""
    shown = " ".join(f"{x:.3f}" for x in ratios)
    return f"{shown} (median {statistics.median(ratios):.3f})"
