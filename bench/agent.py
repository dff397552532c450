"""The agent-loop detector's part of the benchmark: the ``agent-c16`` scenario runs a second
daemon, ``atlasburn-proxy-no-agent-loop`` (the same config with
``[guardrails.agent_loop_detector] enabled = false``; its own spool and ingest), in the same
interleaved rounds as ``atlasburn-proxy`` (the layer on, its default config). ``agent_table``
sets the two side by side: CPU per request with the layer against without, the ratio of the
medians and each round's ratio (the two daemons measured one right after the other).
"""

from __future__ import annotations

from typing import Any

from . import by_scenario, markdown, round_ratios

NO_AGENT_TARGET = "atlasburn-proxy-no-agent-loop"
NO_AGENT_CONFIG = "[guardrails.agent_loop_detector]\nenabled = false\n"
TARGET_RATIO = 1.10  # issue 15: CPU per request with the layer at most 10% above without


def agent_table(results: list[Any]) -> str:
    """The daemon with the layer (``atlasburn-proxy``) against without, per scenario that ran
    both (``results``: the bench's Results)."""
    head = [
        "scenario", "layer on req/s", "layer off req/s", "on/off req/s", "on p50 ms",
        "off p50 ms", "+p50 ms", "on CPU µs/req", "off CPU µs/req", "CPU on/off",
        "CPU on/off per round", "target",
    ]  # fmt: skip
    rows = [head]
    for name, group in by_scenario(results).items():
        on, off = group.get("atlasburn-proxy"), group.get(NO_AGENT_TARGET)
        if on is None or off is None or not on.cpu_us or not off.cpu_us:
            continue
        ratio = on.cpu_us / off.cpu_us
        rows.append(
            [
                name,
                f"{on.rps:,.0f}",
                f"{off.rps:,.0f}",
                f"{on.rps / off.rps:.3f}",
                f"{on.p50_ms:.2f}",
                f"{off.p50_ms:.2f}",
                f"{on.p50_ms - off.p50_ms:+.2f}",
                f"{on.cpu_us:,.0f}",
                f"{off.cpu_us:,.0f}",
                f"{ratio:.3f}",
                round_ratios(on, off, 1),
                f"≤ {TARGET_RATIO:.2f}: {'met' if ratio <= TARGET_RATIO else 'MISSED'}",
            ]
        )
    return markdown(rows) if len(rows) > 1 else ""
