"""The daemon as a real process (``python -m proxy run``), for the tests where the point is a
process: signals, exit codes, crashes, sd_notify, reload."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import sys
from pathlib import Path

from .conftest import SPAWNED

ROOT = Path(__file__).parent.parent


class DaemonProcess:
    """A started daemon; its stderr keeps being collected line by line (the access lines would
    otherwise fill the pipe and block it)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines
        assert proc.stderr is not None
        self.reader = asyncio.ensure_future(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        # In pieces, not with readline: a line over the stream's 64 KiB limit would end the
        # reading, and the daemon would then block on a full pipe.
        partial = b""
        while piece := await stream.read(65536):
            *whole, partial = (partial + piece).split(b"\n")
            self.lines.extend(line.decode("utf-8", "replace") + "\n" for line in whole)
        if partial:
            self.lines.append(partial.decode("utf-8", "replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def stop(self, signal_it: bool = True) -> int:
        """SIGTERM (unless already sent), then the exit code once stderr is read to its end."""
        if signal_it:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            message = f"the daemon did not stop within 20 s; its log:\n{self.log}"
            raise AssertionError(message) from None
        await self.reader
        return code


async def spawn_daemon(
    *args: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    cwd: Path = ROOT,
) -> DaemonProcess:
    """``atlasburn-proxy run ARGS...``, returned once it says it is ready; ``nofile`` limits
    its open files (soft and hard, as ``ulimit -n``); ``cwd`` is its working directory (this
    checkout's ``proxy`` is run from any)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    if cwd != ROOT:
        env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit if nofile is not None else None,
    )
    SPAWNED.append(proc)
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        lines.append(line)
        if not line:
            raise AssertionError("daemon exited before ready:\n" + "".join(lines))
        if m := re.search(r'ready on (http://[^\s"]+)', line):
            return DaemonProcess(proc, m.group(1), lines)
