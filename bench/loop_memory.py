"""The loop detector's memory and time with many distinct fingerprints.

    python -m bench.loop_memory [--fingerprints 1000000]

Feeds N distinct fingerprints within one window (the worst case: nothing has expired yet),
measures the memory it holds with tracemalloc, the cost per observation, and the memory after
the window has passed (one more observation rotates the generations).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import time
import tracemalloc

from proxy.config import LoopDetectorConfig
from proxy.guardrails import LoopDetector


def timing(prints: list[str]) -> None:
    """Time per observation, without tracemalloc (which slows every allocation)."""
    n = len(prints)
    detector = LoopDetector(LoopDetectorConfig(window_seconds=60, max_tracked=max(n + 1, 1000)))
    t0 = time.perf_counter()
    for i, fp in enumerate(prints):
        detector.observe(fp, now=i * (59.0 / n))
    new = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for fp in prints[:100_000]:
        detector.observe(fp, now=59.5)  # the second occurrence of each
    repeat = (time.perf_counter() - t0) / min(n, 100_000)
    print(
        f"  observe: {new * 1e6:.2f} µs for a new fingerprint, {repeat * 1e6:.2f} µs for a repeat"
    )


def main(n: int) -> None:
    prints = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    print(f"{n:,} distinct fingerprints in one 60 s window")
    timing(prints)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    detector = LoopDetector(LoopDetectorConfig(window_seconds=60, max_tracked=max(n + 1, 1000)))
    for i, fp in enumerate(prints):
        detector.observe(fp, now=i * (59.0 / n))
    held = tracemalloc.get_traced_memory()[0] - base
    print(f"  memory held: {held / 2**20:.1f} MiB ({held / n:.0f} bytes per fingerprint)")
    detector.observe("sha256:" + "0" * 64, now=60.0)  # a window later: rotation
    detector.observe("sha256:" + "1" * 64, now=120.0)  # and the old generation is gone
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    print(f"  memory two windows later: {after / 2**20:.2f} MiB ({len(detector)} tracked)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fingerprints", type=int, default=1_000_000)
    main(parser.parse_args().fingerprints)
