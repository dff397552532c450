"""What the agent-loop detector costs per request on the ``agent-c16`` body, function by function.

    python -m bench.agent_cost [--number 2000] [--profile]

Times, on the 100-message agent conversation of ``bench/agent_body.py`` (the best of
``--repeat`` runs of ``--number`` calls each, in µs per call), what the daemon does with every
such request anyway (``orjson.loads`` of the body; ``describe`` and the fingerprint of it) beside
what the layer adds (``tool_uses``: the adapter reading the calls; ``find``: comparing them;
``check``: both). The same calls on one parsed body are warm; the last row parses a fresh
copy of the body each time, as the daemon does (new objects, the garbage collector's share),
then checks it: less the first row, the layer's cost per request in that setting.
``--profile`` adds a cProfile view of ``check``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import timeit
from collections.abc import Callable
from typing import Any

import orjson

from proxy.adapters import ADAPTERS
from proxy.config import AgentLoopConfig
from proxy.fingerprint import fingerprint
from proxy.guardrails.agent_loop import AgentLoopDetector
from proxy.guardrails.kill_switch import KillSwitch

from .agent_body import AgentBody

ENDPOINT = "/chat/completions"


def per_call(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """µs per call: the best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_cost")
    parser.add_argument("--number", type=int, default=2000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs (the best counts)")
    parser.add_argument("--profile", action="store_true", help="a cProfile view of check")
    args = parser.parse_args()

    raw = AgentBody().request(123456)
    adapter = ADAPTERS["openai"]
    parsed = orjson.loads(raw)
    detector = AgentLoopDetector(AgentLoopConfig(), KillSwitch("org_bench", None))
    uses = adapter.tool_uses(ENDPOINT, parsed, detector.lookback, detector.exempt)
    if detector.find(uses) is not None or detector.check(adapter, ENDPOINT, parsed) is not None:
        raise SystemExit("the agent body trips the detector: it must be loop-free")
    every = len(adapter.tool_uses(ENDPOINT, parsed, 1_000_000))
    recent = uses[-detector.lookback :]
    names: dict[str, int] = {}
    for name, _, _ in recent:
        names[name] = names.get(name, 0) + 1
    hashed = sum(n for n in names.values() if n >= detector.threshold)

    def loads_and_check() -> Any:
        return detector.check(adapter, ENDPOINT, orjson.loads(raw))

    def describe_and_fingerprint() -> str:
        meta = adapter.describe("/v1/chat/completions", parsed)
        return fingerprint("openai", meta.endpoint, meta.canonical, raw)

    n, r = args.number, args.repeat
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("orjson.loads(body)", lambda: orjson.loads(raw)),
        ("describe + fingerprint(body)", describe_and_fingerprint),
        (
            "tool_uses (chat_tool_uses)",
            lambda: adapter.tool_uses(ENDPOINT, parsed, detector.lookback, detector.exempt),
        ),
        ("AgentLoopDetector.find(uses)", lambda: detector.find(uses)),
        ("AgentLoopDetector.check", lambda: detector.check(adapter, ENDPOINT, parsed)),
        ("fresh body: orjson.loads + check", loads_and_check),
    ]
    rows = [(what, per_call(fn, n, r)) for what, fn in calls]
    print(
        f"body {len(raw):,} bytes, {len(parsed['messages'])} messages, {every} answered tool "
        f"calls; among the last {detector.lookback}: {hashed} of a name seen threshold times "
        f"({ {k: v for k, v in names.items() if v >= detector.threshold} })"
    )
    print(f"best of {r} x {n} calls, µs per call:\n")
    print("| what | µs/call |\n|------|---------|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")
    base = rows[0][1] + rows[1][1]
    print(
        f"\ncheck / (loads + describe + fingerprint): {rows[4][1] / base:.3f}; check on a "
        f"fresh body: {rows[5][1] - rows[0][1]:.1f} µs"
    )

    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            detector.check(adapter, ENDPOINT, parsed)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())


if __name__ == "__main__":
    main()
