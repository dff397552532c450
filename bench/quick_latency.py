"""Quick side-by-side latency: a small chat completion direct, through a minimal aiohttp
pass-through proxy, and through atlasburn-proxy, interleaved in one run.

    python -m bench.quick_latency [--requests 2000]

Each server runs in its own process (the fake provider, the pass-through, the daemon); the client
sends one request at a time, rotating between the three targets so that machine noise hits all
of them alike, and checks every answer. The full benchmark (concurrency, streams, CPU per
request, RSS) is a separate piece of work; this is the quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).parent.parent
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1769090400,'
    b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! How can I help?","refusal":null,"annotations":[]},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,'
    b'"total_tokens":16,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_bench"}'
)


def provider_app() -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def passthrough_app(upstream: str) -> web.Application:
    """The reference: a minimal reverse proxy with no telemetry at all."""

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["session"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "")},
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={
                    k: v
                    for k, v in up.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection")
                },
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def serve(kind: str, port: int, upstream: str) -> None:
    import uvloop

    app = provider_app() if kind == "provider" else passthrough_app(upstream)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(n: int) -> None:
    procs = []
    p_port, t_port = free_port(), free_port()
    direct = f"http://127.0.0.1:{p_port}"
    procs.append(
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.quick_latency",
            "--serve",
            "provider",
            str(p_port),
            "",
            cwd=ROOT,
        )
    )
    await wait_port(p_port)
    procs.append(
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.quick_latency",
            "--serve",
            "passthrough",
            str(t_port),
            direct,
            cwd=ROOT,
        )
    )
    await wait_port(t_port)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f'[logging]\nlevel = "warning"\n[providers.openai]\nbase_url = "{direct}"\n')
    d_port = free_port()
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        f.name,
        "--listen",
        f"127.0.0.1:{d_port}",
        cwd=ROOT,
    )
    procs.append(daemon)
    await wait_port(d_port)
    targets = {
        "direct": direct,
        "pass-through": f"http://127.0.0.1:{t_port}",
        "atlasburn-proxy": f"http://127.0.0.1:{d_port}",
    }
    times: dict[str, list[float]] = {name: [] for name in targets}
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(n + 200):
                for name, base in targets.items():
                    t0 = time.perf_counter()
                    async with s.post(
                        base + "/v1/chat/completions",
                        data=BODY,
                        headers={"Content-Type": "application/json"},
                    ) as r:
                        body = await r.read()
                    elapsed = time.perf_counter() - t0
                    if r.status != 200 or body != ANSWER:
                        raise RuntimeError(f"{name}: bad answer {r.status}")
                    if i >= 200:  # warm-up
                        times[name].append(elapsed * 1e6)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            await p.wait()
        os.unlink(f.name)

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[int(q * (len(xs) - 1))]

    base50 = statistics.median(times["direct"])
    base99 = pct(times["direct"], 0.99)
    print(f"small chat completion, concurrency 1, {n} requests per target (interleaved)")
    print(
        f"{'target':<16} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'added p50':>10} "
        f"{'added p99':>10}"
    )
    for name, xs in times.items():
        p50, p90, p99 = statistics.median(xs), pct(xs, 0.9), pct(xs, 0.99)
        print(
            f"{name:<16} {p50:>8.0f} {p90:>8.0f} {p99:>8.0f} {p50 - base50:>10.0f} "
            f"{p99 - base99:>10.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "UPSTREAM"))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
    else:
        asyncio.run(main(args.requests))
