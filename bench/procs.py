"""The benchmark's processes: ports, CPU pinning, the daemon's config, and what /proc says.

The proxy under test runs on ``PROXY_CPU``; everything else (the fake provider, the ingest, the
client, Redis) on ``OTHER_CPU``, so that they do not fight over the proxy's core. ``colocate()``
(``python -m bench --colocate``) puts the proxy on ``OTHER_CPU`` too: one CPU for the proxy, the
client and the provider, as a sidecar shares its pod's CPUs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
EXTRA_CONFIG = os.environ.get("BENCH_DAEMON_CONFIG", "").replace("\\n", "\n")
PROXY_CPU = "0"
OTHER_CPU = "1"
HZ = os.sysconf("SC_CLK_TCK")
API_KEY = "abn_bench_key"


def colocate() -> None:
    """From now on the proxies under test share ``OTHER_CPU`` with everything else (callers
    read ``procs.PROXY_CPU`` when they spawn, not a copy imported before)."""
    global PROXY_CPU
    PROXY_CPU = OTHER_CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.025)
    raise RuntimeError(f"nothing listens on {port}")


def spawn(
    cpu: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", cpu, sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_daemon_config(
    path: Path,
    port: int,
    provider: str,
    ingest: str | None,
    loop_detector: bool = True,
    extra: str = "",
) -> Path:
    """The daemon's config for the bench: its spool beside ``path``, the provider's base URL,
    the fake ingest (None: local only), then ``extra`` and ``BENCH_DAEMON_CONFIG``."""
    atlasburn = f'api_base = "{ingest}"\n' if ingest else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[storage]\npath = "{path.with_suffix(".sqlite3")}"\n'
        f'[atlasburn]\n{atlasburn}api_key = "{API_KEY}"\n'
        f"[guardrails.dumb_loop_detector]\nenabled = {str(loop_detector).lower()}\n"
        f'[providers.openai]\nbase_url = "{provider}"\n' + extra + EXTRA_CONFIG
    )
    return path


def spawn_daemon(config: Path, state: Path, source: Path | None = None) -> subprocess.Popen[bytes]:
    """The daemon under test, on the proxy's CPU, with its own state directory; ``source``: a
    directory holding another version's ``proxy`` package (``python -m`` imports it from
    the working directory first)."""
    env = {**os.environ, "STATE_DIRECTORY": str(state)}
    return spawn(
        PROXY_CPU, "-m", "proxy", "run", "--config", str(config), env=env, cwd=source or ROOT
    )
