"""Attribution's part of the benchmark: the ``attribution-c64`` scenario runs a second daemon,
``atlasburn-proxy-no-attribution`` (``[attribution] enabled = false``, ``process = false``; its
own spool and ingest), in the same interleaved rounds as ``atlasburn-proxy`` (attribution on, its
default: headers, the credential's key_id, the calling process looked up once per connection).
Every request carries ``AtlasBurn-App``, ``-User``, ``-Tag-Team`` and an ``Authorization`` key, on
keep-alive connections (issue 17: on costs at most 3% of the throughput of off).
"""

from __future__ import annotations

from typing import Any

from . import by_scenario, markdown, round_ratios

NO_ATTRIBUTION_TARGET = "atlasburn-proxy-no-attribution"
NO_ATTRIBUTION_CONFIG = "[attribution]\nenabled = false\nprocess = false\n"
HEADERS = {
    "AtlasBurn-App": "bench-app",
    "AtlasBurn-User": "bench-user@example.com",
    "AtlasBurn-Tag-Team": "benchmarks",
    "Authorization": "Bearer sk-bench-not-a-real-key-0123456789abcdef",
}
TARGET_RATIO = 0.97  # throughput with attribution at least 97% of without


def attribution_table(results: list[Any]) -> str:
    """The daemon with attribution (``atlasburn-proxy``) against without, per scenario that
    ran both (``results``: the bench's Results)."""
    head = [
        "scenario", "on req/s", "off req/s", "on/off req/s", "on/off per round", "on p50 ms",
        "off p50 ms", "on CPU µs/req", "off CPU µs/req", "CPU on/off", "target",
    ]  # fmt: skip
    rows = [head]
    for name, group in by_scenario(results).items():
        on, off = group.get("atlasburn-proxy"), group.get(NO_ATTRIBUTION_TARGET)
        if on is None or off is None or not on.cpu_us or not off.cpu_us:
            continue
        ratio = on.rps / off.rps
        rows.append(
            [
                name,
                f"{on.rps:,.0f}",
                f"{off.rps:,.0f}",
                f"{ratio:.3f}",
                round_ratios(on, off, 0),
                f"{on.p50_ms:.2f}",
                f"{off.p50_ms:.2f}",
                f"{on.cpu_us:,.0f}",
                f"{off.cpu_us:,.0f}",
                f"{on.cpu_us / off.cpu_us:.3f}",
                f"≥ {TARGET_RATIO:.2f}: {'met' if ratio >= TARGET_RATIO else 'MISSED'}",
            ]
        )
    return markdown(rows) if len(rows) > 1 else ""
