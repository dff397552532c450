"""The daemon as a real process: check-config, exit codes, readiness, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from .fakes.provider import FakeProvider, fixture, sse_events
from .process import spawn_daemon

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "config.example.toml"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every daemon these tests start keeps its state under tmp_path, not in $HOME."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("ATLASBURN_API_KEY", "")
    return tmp_path / "state"


def run_cli(*args: str) -> tuple[int, str, str]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_check_config_ok() -> None:
    code, out, err = run_cli("check-config", str(EXAMPLE))
    assert code == 0, err
    assert out == f"{EXAMPLE}: ok (3 providers: openai, anthropic, gemini)\n"


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "nope"\n[providers.openai]\nbase_url = "ftp://x"\n')
    code, out, err = run_cli("check-config", str(bad))
    assert code == 2
    assert err.splitlines() == [
        "server.listen: expected HOST:PORT (e.g. '127.0.0.1:8787' or '[::1]:8787'), got 'nope'",
        "providers.openai.base_url: expected an http(s) URL, got 'ftp://x'",
        f"{bad}: 2 error(s)",
    ]


def test_check_config_suggests_the_nearest_known_key(tmp_path: Path) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text(
        '[server]\nlisen = "127.0.0.1:9000"\nbogus = 1\n'
        "[guardrails.dumb_loop_detector]\nallow_fingerprint = []\n"
    )
    code, out, err = run_cli("check-config", str(bad))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "server.lisen: unknown key; did you mean `listen`?",
        "server.bogus: unknown key",
        "guardrails.dumb_loop_detector.allow_fingerprint: unknown key;"
        " did you mean `allow_fingerprints`?",
        f"{bad}: 3 error(s)",
    ]


def test_check_config_warns_of_a_base_url_ending_in_v1(tmp_path: Path) -> None:
    """Clients send /v1/chat/completions: a base_url of .../v1 would make it /v1/v1/... A
    warning (an upstream may really want it), naming the key; the default ones are fine."""
    config = tmp_path / "v1.toml"
    config.write_text(
        '[providers.local]\nkind = "openai"\nbase_url = "http://127.0.0.1:11434/v1/"\n'
        '[providers.anthropic]\nbase_url = "https://api.anthropic.com/v1"\n'
    )
    code, out, err = run_cli("check-config", str(config))
    assert (code, out) == (0, f"{config}: ok (4 providers: openai, anthropic, gemini, local)\n")
    assert err.splitlines() == [
        f"warning: providers.{name}.base_url: the path ends in /v1, and clients' paths carry"
        " their own version: requests would go to /v1/v1/...; leave /v1 out of base_url"
        for name in ("local", "anthropic")
    ]


def test_run_exits_2_on_bad_config_before_binding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmax_body_bytes = -1\n")
    code, _, err = run_cli("run", "--config", str(bad))
    assert code == 2
    assert err == "config error: server.max_body_bytes: must be at least 1 bytes, got -1\n"


async def test_run_exits_1_when_the_port_is_taken() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        code, _, err = await asyncio.to_thread(run_cli, "run", "--listen", f"127.0.0.1:{port}")
    finally:
        sock.close()
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err


async def test_embedded_defaults_serve_and_stop_on_sigterm() -> None:
    p = await spawn_daemon("--listen", "127.0.0.1:0")
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(p.proc.wait(), 10) == 0


async def test_sigterm_lets_an_inflight_stream_finish(fake: FakeProvider, tmp_path: Path) -> None:
    fake_url = fake.url
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nshutdown_grace_seconds = 10\n[providers.openai]\nbase_url = "{fake_url}"\n'
    )
    p = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0")
    expected = b"".join(sse_events(fixture("openai", "chat_completion_stream.sse")))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            p.url + "/v1/chat/completions",
            headers={"x-fake-delay-ms": "150"},
            json={"model": "gpt-4o-mini", "messages": [], "stream": True},
        ) as r:
            first = await r.content.readuntil(b"\n\n")
            p.proc.send_signal(signal.SIGTERM)
            rest = await r.read()
    assert first + rest == expected
    assert await asyncio.wait_for(p.proc.wait(), 10) == 0
    # New connections are refused once it has stopped.
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s:
            await s.get(p.url + "/healthz")


async def test_sigint_also_stops_cleanly() -> None:
    p = await spawn_daemon("--listen", "127.0.0.1:0")
    p.proc.send_signal(signal.SIGINT)
    assert await p.stop(signal_it=False) == 0
    rest = p.log
    assert "SIGINT: stopping" in rest and "msg=stopped" in rest


async def test_run_names_a_relative_storage_path_and_where_it_resolved(tmp_path: Path) -> None:
    """Started from another working directory (systemd's is /), a relative storage.path is
    another file: `run` says which, once, at start."""
    config = tmp_path / "c.toml"
    config.write_text('[storage]\npath = "state/spool.db"\n')
    p = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert await p.stop() == 0
    spool = tmp_path / "state" / "spool.db"
    assert spool.is_file()
    warned = [line for line in p.lines if "is relative to" in line]
    assert len(warned) == 1, p.log
    assert "level=warning" in warned[0]
    assert (
        "config: storage.path: 'state/spool.db' is relative to the working directory; "
        f"it resolved to {spool} (use an absolute path)"
    ) in warned[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_operator_commands_and_a_suspension_that_survives_restarts(
    fake: FakeProvider, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n[providers.openai]\nbase_url = "{fake.url}"\n'
    )
    body = {"model": "text-embedding-3-small", "input": "hello"}

    async def post(url: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/embeddings", json=body) as r:
                return r.status

    p = await spawn_daemon("--config", str(config))
    code, out, err = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert (code, out) == (0, "org org_local: ok (guardrail:org_local)\n"), err
    code, out, err = await asyncio.to_thread(
        run_cli, "suspend", "--config", str(config), "--ttl", "600", "--reason", "incident 42"
    )
    assert code == 0, err
    assert re.fullmatch(r"org org_local: SUSPENDED until \S+Z by manual: incident 42\n", out)
    assert await post(p.url) == 429
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(p.proc.wait(), 10) == 0

    p = await spawn_daemon("--config", str(config))
    assert await post(p.url) == 429  # restored before the first request was served
    assert fake.requests == []
    code, out, _ = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert "SUSPENDED" in out
    code, out, err = await asyncio.to_thread(run_cli, "resume", "--config", str(config))
    assert (code, out) == (0, "org org_local: ok (guardrail:org_local)\n"), err
    assert await post(p.url) == 200
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(p.proc.wait(), 10) == 0


def test_operator_commands_without_a_daemon(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n[atlasburn]\napi_key = "abn_test_cli_key"\n'
    )
    code, _, err = run_cli("status", "--config", str(config))
    assert code == 1
    said, failed = err.splitlines()
    assert said == f"status: daemon http://127.0.0.1:{port}"
    assert failed.startswith(f"cannot reach the daemon at http://127.0.0.1:{port}: ")


async def test_operator_commands_take_listen_like_run_and_say_which_daemon(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """A daemon started with ``run --listen`` (its config does not say where it listens) is
    found by the operator commands given the same ``--listen``; each names the daemon."""
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "c.toml"
    config.write_text(f'[providers.openai]\nbase_url = "{fake.url}"\n')
    p = await spawn_daemon("--config", str(config), "--listen", listen)
    said = f"daemon http://{listen}\n"

    def command(*args: str) -> tuple[int, str, str]:
        return run_cli(*args, "--config", str(config), "--listen", listen)

    code, out, err = await asyncio.to_thread(command, "suspend", "--reason", "incident 43")
    assert (code, err) == (0, "suspend: " + said)
    assert re.fullmatch(r"org org_local: SUSPENDED until \S+Z by manual: incident 43\n", out)
    code, out, err = await asyncio.to_thread(command, "status")
    assert (code, err, out.startswith("org org_local: SUSPENDED")) == (0, "status: " + said, True)
    code, out, err = await asyncio.to_thread(command, "resume")
    assert (code, out, err) == (0, "org org_local: ok (guardrail:org_local)\n", "resume: " + said)
    # The same daemon asked without its config (another state directory, another key): the
    # 401 says which key was sent and what to give the command.
    other = tmp_path / "other.toml"
    other.write_text(f'[storage]\npath = "{tmp_path / "elsewhere" / "spool.sqlite3"}"\n')
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "elsewhere" / "local-api-key").write_text("abn_local_not_the_daemons\n")
    (tmp_path / "elsewhere" / "local-api-key").chmod(0o600)
    code, out, err = await asyncio.to_thread(
        run_cli, "status", "--config", str(other), "--listen", listen
    )
    assert (code, out) == (1, "")
    assert err.splitlines()[1] == (
        f"the daemon at http://{listen} answered 401: wrong AtlasBurn-API-Key (this command"
        f" sent the key in {tmp_path / 'elsewhere' / 'local-api-key'}; if the daemon runs with a"
        " config file, give this command the same one: --config FILE, or ATLASBURN_PROXY_CONFIG)"
    )
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(p.proc.wait(), 10) == 0


async def test_operator_commands_say_when_another_server_answers(tmp_path: Path) -> None:
    """``status``, ``suspend`` and ``ui`` pointed at a port where some other HTTP server answers
    200 (an HTML page, JSON that is no guardrail state, a status line that is not HTTP) say so in
    one line and exit 1: no traceback, and never "ok"."""
    from aiohttp import web

    from .fakes.server import start

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>a dev server</html>", content_type="text/html")

    async def other_json(request: web.Request) -> web.Response:
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion"})

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    servers = []
    for handler in (html, other_json):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        servers.append(await start(app))
    raw = await asyncio.start_server(not_http, "127.0.0.1", 0)
    config = tmp_path / "c.toml"
    config.write_text('[atlasburn]\napi_key = "abn_test_cli_key"\n')
    ports = [s.port for s in servers] + [raw.sockets[0].getsockname()[1]]
    try:
        for port in ports:
            for command in (["status"], ["suspend", "--ttl", "5"], ["ui", "--no-browser"]):
                code, out, err = await asyncio.to_thread(
                    run_cli, *command, "--config", str(config), "--listen", f"127.0.0.1:{port}"
                )
                lines = err.splitlines()
                assert (code, out, len(lines)) == (1, "", 2), (command, port, err)
                assert lines[0] == f"{command[0]}: daemon http://127.0.0.1:{port}"
                assert f"http://127.0.0.1:{port}" in lines[1]
    finally:
        for server in servers:
            await server.stop()
        raw.close()


def test_an_empty_config_path_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    """``--config ""`` (``--config "$CONFIG"`` with the variable unset) stops every command
    with exit 2, as ``check-config ""`` does: ``run`` started on the embedded defaults."""
    port = free_port()
    for command in (["run", "--listen", f"127.0.0.1:{port}"], ["status"], ["report"]):
        code, out, err = run_cli(*command, "--config", "")
        assert (code, out) == (2, ""), (command, err)
        assert err == "config error: --config: an empty path (an unset variable?)\n"
