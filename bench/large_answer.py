"""Peak memory of the daemon relaying one large embeddings answer (issue 16.5).

```sh
python -m bench.large_answer                      # 33.7 MB and 300 MB answers
python -m bench.large_answer --mb 33.7 1000
python -m bench.large_answer --floats --mb 12    # embeddings as float arrays, not base64
python -m bench.large_answer --code /path/to/other/checkout   # the daemon of another checkout
```

For each size a fresh daemon (``python -m proxy run``, pinned to its CPU like the benchmark's)
relays one ``POST /v1/embeddings`` to a provider in this process that streams an answer of that
size in 64 KiB pieces, shaped like ``tests/fixtures/cases/openai-embeddings-large`` (indented
JSON, base64 embeddings of 3,072 dimensions, the model and the usage at the end); the client
reads and drops it. Printed per size: the daemon's RSS before the answer (after one small
warm-up answer), its peak RSS (``VmHWM`` from ``/proc``: the kernel's high-water mark, exact), and
the input tokens the daemon counted (``atlasburn_tokens_total`` on ``/metrics``; 102,400 expected).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

from .procs import OTHER_CPU, PROXY_CPU, free_port, spawn_daemon, wait_port, write_daemon_config

VECTOR = base64.b64encode(b"\x00\x00\x80\x3f" * 3072)
ITEM = 16_470  # bytes of one indented item, about
TAIL = (
    b'  ],\n  "model": "text-embedding-3-large",\n  "usage": {\n    "prompt_tokens": 102400,\n'
    b'    "total_tokens": 102400\n  }\n}\n'
)


FLOATS = b"[" + b", ".join(b"%.9f" % (i / 3072 - 0.5) for i in range(3072)) + b"]"


def answer(size: int, floats: bool) -> Iterator[bytes]:
    vector, quote = (FLOATS, b"") if floats else (VECTOR, b'"')
    item = ITEM - len(VECTOR) + len(vector)
    n = max(1, size // item)
    yield b'{\n  "object": "list",\n  "data": [\n'
    for i in range(n):
        yield b'    {\n      "object": "embedding",\n      "index": %d,\n      "embedding": ' % i
        yield quote + vector + quote + b"\n    }" + (b",\n" if i < n - 1 else b"\n")
    yield TAIL


def provider(sizes: dict[str, int], floats: bool) -> web.Application:
    async def embeddings(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        held: list[bytes] = []
        n = 0
        for piece in answer(sizes[body["input"]], floats):
            held.append(piece)
            n += len(piece)
            if n >= 65536:
                await resp.write(b"".join(held))
                held, n = [], 0
        await resp.write(b"".join(held))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def spawn_checkout(code: str, config: Path, state: Path) -> subprocess.Popen[bytes]:
    """The daemon of another checkout (``python -m`` puts the working directory first on the
    path: it runs there)."""
    env = {**os.environ, "STATE_DIRECTORY": str(state), "PYTHONPATH": code}
    args = ["taskset", "-c", PROXY_CPU, sys.executable, "-m", "proxy", "run"]
    return subprocess.Popen(
        [*args, "--config", str(config)],
        cwd=code,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def tokens_in(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("atlasburn_tokens_total{") and 'direction="in"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def one(size_mb: float, upstream: str, code: str | None, work: Path) -> str:
    size = int(size_mb * 1_000_000)
    port = free_port()
    config = write_daemon_config(work / f"d{size}" / "config.toml", port, upstream, None)
    if code:
        daemon = spawn_checkout(code, config, work / f"d{size}")
    else:
        daemon = spawn_daemon(config, work / f"d{size}")
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for which in ("small", "large"):
                t = time.perf_counter()
                received = 0
                body = {"model": "text-embedding-3-large", "input": which}
                async with s.post(url + "/v1/embeddings", json=body) as r:
                    async for chunk in r.content.iter_any():
                        received += len(chunk)
                seconds = time.perf_counter() - t
                if which == "small":
                    before = status_kb(daemon.pid, "VmRSS") / 1024
            await asyncio.sleep(0.5)  # the event is recorded after the last byte
            counted = await tokens_in(s, url)
        peak = status_kb(daemon.pid, "VmHWM") / 1024
        return (
            f"{received / 1e6:8.1f} MB  {seconds:6.2f} s  RSS before {before:6.1f} MiB  "
            f"peak {peak:6.1f} MiB  input tokens counted {counted - 102400:,}"
        )
    finally:
        daemon.terminate()
        daemon.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[33.7, 300.0])
    parser.add_argument("--floats", action="store_true", help="embeddings as float arrays")
    parser.add_argument("--code", help="run the daemon of this checkout (its PYTHONPATH)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(OTHER_CPU)})
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            sizes = {"small": ITEM * 2, "large": int(mb * 1_000_000)}
            app = provider(sizes, args.floats)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            uport = free_port()
            await web.TCPSite(runner, "127.0.0.1", uport).start()
            try:
                print(await one(mb, f"http://127.0.0.1:{uport}", args.code, Path(tmp)))
            finally:
                await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
