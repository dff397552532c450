"""A hostile neighbour in the state directory: the daemon as a process, with ``storage.path`` where
another user (uid 65534, made the owner with ``os.chown``; the suite runs as root) has been.

The daemon refuses, before binding, with one clear line and exit code 2, rather than trust a
planted key or write through a planted link; a fresh start makes every state file private.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from ..conftest import SPAWNED
from ..process import ROOT
from .conftest import Figures, StartProxy, guardrail_state, toml

NOBODY = 65534
LINE = re.compile(r'ts=\S+ level=error logger=proxy msg="refusing to start: (.*)"\n')


async def refused(tmp_path: Path, state: Path) -> tuple[int, str]:
    """Run the daemon (local-only, no configured key) on ``state``; it must exit without ever
    saying it is ready. (exit code, the message of its one log line)."""
    config = tmp_path / "refused.toml"
    config.write_text(
        toml(
            {
                "server": {"listen": "127.0.0.1:0"},
                "storage": {"path": str(state / "spool.sqlite3")},
                "atlasburn": {"api_key": ""},
            }
        )
    )
    env = {**os.environ, "STATE_DIRECTORY": str(state), "ATLASBURN_API_KEY": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(proc)
    assert proc.stderr is not None
    lines = []
    while line := (await asyncio.wait_for(proc.stderr.readline(), 30)).decode():
        lines.append(line)
        if "ready on" in line:
            proc.kill()
            raise AssertionError("the daemon started:\n" + "".join(lines))
    err = "".join(lines)
    code = await proc.wait()
    match = LINE.fullmatch(err)
    assert match is not None, f"not one clear line:\n{err}"
    return code, match.group(1).replace('\\"', '"')


def plant(path: Path, text: str, mode: int) -> None:
    """A file made by the other user."""
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, NOBODY, NOBODY)


async def test_a_key_planted_by_another_user_is_never_accepted(
    start_proxy: StartProxy, tmp_path: Path, figures: Figures
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)  # anyone may write here ...
    planted = state / "local-api-key"
    plant(planted, "abn_test_planted_by_nobody\n", 0o644)  # ... and someone did

    code, message = await refused(tmp_path, state)
    assert (code, message) == (
        2,
        f"storage.path: directory {state} is writable by other users (mode 0777); use a "
        "private directory (chmod 700) or another storage.path",
    )
    figures("exit code, 0777 state directory with a planted key", code)

    state.chmod(0o700)  # the directory fixed, the planted key still there
    code, message = await refused(tmp_path, state)
    assert (code, message) == (
        2,
        f"storage.path: {planted} belongs to another user: nobody (uid 65534), mode 0644; a "
        "file planted in the state directory is never trusted: remove it",
    )
    figures("exit code, private state directory with a planted key", code)
    assert planted.read_text() == "abn_test_planted_by_nobody\n"

    planted.unlink()
    proxy = await start_proxy(ship=False, atlasburn={"api_key": ""})
    generated = planted.read_text().strip()
    assert generated.startswith("abn_local_") and os.stat(planted).st_uid == os.geteuid()
    refusal = (await guardrail_state(proxy.url, "abn_test_planted_by_nobody"))[0]
    assert (refusal, (await guardrail_state(proxy.url, generated))[0]) == (401, 200)
    figures("the planted key, once the daemon runs", refusal)


async def test_a_planted_link_is_not_written_through(tmp_path: Path, figures: Figures) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # What the link points at: a file the old daemon truncated, overwrote and chmod-ed, and one
    # holding a key, which it trusted.
    for name, content in (("config", "precious = true\n"), ("key", "abn_test_victim\n")):
        victim = tmp_path / f"victim-{name}"
        victim.write_text(content)
        victim.chmod(0o644)
        link = state / "local-api-key"
        link.symlink_to(victim)
        code, message = await refused(tmp_path, state)
        assert (code, message) == (
            2,
            f"storage.path: {link} is a symbolic link (to {victim}); the daemon never follows "
            "links in its state directory: remove it",
        )
        assert (victim.read_text(), victim.stat().st_mode & 0o7777) == (content, 0o644)
        figures(f"exit code, local-api-key linked to a {name} file", code)
        figures(f"the {name} file afterwards", f"unchanged ({len(content)} bytes, mode 0644)")
        link.unlink()


async def test_a_fresh_start_makes_every_state_file_private(
    start_proxy: StartProxy, tmp_path: Path, figures: Figures
) -> None:
    state = tmp_path / "state"
    assert not state.exists()
    proxy = await start_proxy(ship=False, atlasburn={"api_key": ""})
    names = ("spool.sqlite3", "spool.sqlite3-wal", "spool.sqlite3-shm", "local-api-key")
    modes = {name: f"{os.stat(state / name).st_mode & 0o7777:04o}" for name in names}
    modes["(state directory)"] = f"{os.stat(state).st_mode & 0o7777:04o}"
    assert modes == {
        "spool.sqlite3": "0600",
        "spool.sqlite3-wal": "0600",
        "spool.sqlite3-shm": "0600",
        "local-api-key": "0600",
        "(state directory)": "0700",
    }
    assert proxy.process.proc.returncode is None  # measured while it runs
    figures("modes while running", " ".join(f"{k}={v}" for k, v in modes.items()))
