"""The loop detector's memory and time with many distinct fingerprints.

    python -m bench.loop_memory [--fingerprints 1000000]

Feeds N distinct fingerprints within one window (the worst case: nothing has expired yet),
measures the memory it holds (allocated, with tracemalloc, and resident, from /proc), the cost
per observation, and the memory after the window has passed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import time
import tracemalloc

from proxy.config import LoopDetectorConfig
from proxy.guardrails import LoopDetector


def timing(prints: list[str], passes: int = 5) -> None:
    """Time per observation (the best of ``passes``), without tracemalloc (which slows every
    allocation)."""
    n = len(prints)
    config = LoopDetectorConfig(window_seconds=60, max_tracked=max(n + 1, 1000))
    new, repeat = [], []
    for _ in range(passes):
        detector = LoopDetector(config)
        t0 = time.perf_counter()
        for i, fp in enumerate(prints):
            detector.observe(fp, now=i * (59.0 / n))
        new.append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for fp in prints[:100_000]:
            detector.observe(fp, now=59.5)  # the second occurrence of each
        repeat.append((time.perf_counter() - t0) / min(n, 100_000))
    print(
        f"  observe (best of {passes}): {min(new) * 1e6:.2f} µs for a new fingerprint, "
        f"{min(repeat) * 1e6:.2f} µs for a repeat"
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(n: int, prints: list[str]) -> LoopDetector:
    detector = LoopDetector(LoopDetectorConfig(window_seconds=60, max_tracked=max(n + 1, 1000)))
    for i, fp in enumerate(prints):
        detector.observe(fp, now=i * (59.0 / n))
    return detector


def main(n: int) -> None:
    prints = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    print(f"{n:,} distinct fingerprints in one 60 s window")
    gc.collect()
    rss = rss_bytes()
    detector = fill(n, prints)
    resident = rss_bytes() - rss  # first, in a process that has freed nothing it could reuse
    del detector
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    detector = fill(n, prints)
    held = tracemalloc.get_traced_memory()[0] - base
    print(
        f"  memory held: {held / 2**20:.1f} MiB allocated ({held / n:.0f} bytes per fingerprint), "
        f"{resident / 2**20:.1f} MiB resident ({resident / n:.0f} bytes per fingerprint)"
    )
    detector.observe("sha256:" + "0" * 64, now=60.0)  # a window later: rotation
    detector.observe("sha256:" + "1" * 64, now=120.0)  # and the old generation is gone
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    print(f"  memory two windows later: {after / 2**20:.2f} MiB ({len(detector)} tracked)")
    tracemalloc.stop()
    del detector
    timing(prints)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fingerprints", type=int, default=1_000_000)
    main(parser.parse_args().fingerprints)
