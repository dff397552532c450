"""Running it like infrastructure: sd_notify and the watchdog on a real unix datagram socket,
/metrics parsed by prometheus-client, readiness during shutdown, SIGHUP reload, environment
overrides, no secret in any log line, the sidecar image's command line, the systemd unit."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Listen, load_config

from .conftest import SPAWNED, RunningDaemon, StartDaemon, eventually, eventually_async
from .fakes.provider import FakeProvider
from .process import spawn_daemon

ROOT = Path(__file__).parent.parent
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ATLASBURN_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    out["STATE_DIRECTORY"] = str(tmp_path / "state")
    return out


# --------------------------------------------------------------------------- sd_notify


async def test_sd_notify_ready_watchdog_stopping(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")  # pings every 0.1 s
    loop = asyncio.get_running_loop()
    d = await spawn_daemon("--listen", "127.0.0.1:0", env=env)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 5
        while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).decode())
        assert messages[0].startswith("READY=1\nSTATUS=serving on http://127.0.0.1:")
        assert messages.count("WATCHDOG=1") >= 3
        # READY came after the listener was bound: it answers.
        async with aiohttp.ClientSession() as s:
            async with s.get(d.url + "/readyz") as r:
                assert r.status == 200
        d.proc.send_signal(signal.SIGTERM)
        while (
            message := (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).decode()
        ) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"
        assert await d.stop(signal_it=False) == 0
    finally:
        sock.close()


# --------------------------------------------------------------------------- metrics


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def metrics(d: RunningDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return scrape(await r.text())


async def test_metrics_move_with_traffic(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon()
    before = await metrics(d)
    assert before[("atlasburn_ready", ())] == 1.0
    assert (
        "atlasburn_requests_total",
        (("app", ""), ("model", "gpt-4o-mini"), ("provider", "openai"), ("status", "200")),
    ) not in before
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            body = {**CHAT, "messages": [{"role": "user", "content": str(i)}]}
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
        await d.daemon.kill.suspend("manual", "test", 60, "api")
        async with s.post(d.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
    after = await metrics(d)
    ok = (("app", ""), ("model", "gpt-4o-mini"), ("provider", "openai"), ("status", "200"))
    assert after[("atlasburn_requests_total", ok)] == 2
    assert after[("atlasburn_requests_total", ok[:3] + (("status", "429"),))] == 1
    lm = (("app", ""), ("model", "gpt-4o-mini"), ("provider", "openai"))
    assert after[("atlasburn_tokens_total", lm[:1] + (("direction", "in"),) + lm[1:])] == 2 * 1536
    assert after[("atlasburn_tokens_total", lm[:1] + (("direction", "out"),) + lm[1:])] == 2 * 7
    assert after[("atlasburn_cost_usd_total", lm)] == pytest.approx(2 * 0.0001578, rel=1e-12)
    assert after[("atlasburn_guardrail_refusals_total", (("layer", "manual"),))] == 1
    assert after[("atlasburn_overhead_seconds_count", ())] == 3
    assert after[("atlasburn_upstream_latency_seconds_count", (("provider", "openai"),))] == 2
    assert after[("atlasburn_suspended", ())] == 1
    await eventually(lambda: d.daemon.store.committed_total == 3)
    latest = await metrics(d)
    assert latest[("atlasburn_events_committed_total", ())] == 3
    assert latest[("atlasburn_spool_bytes", ())] > 0
    # Label values stay bounded: no fingerprint, key or path is a label anywhere.
    labels = {v for (_, ls) in latest for _, v in ls}
    assert not any(v.startswith("sha256:") or "/" in v for v in labels)


# --------------------------------------------------------------------------- readiness


async def readyz(s: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with s.get(url + "/readyz") as r:
        return r.status, await r.json()


async def test_readiness_flips_during_shutdown(
    fake: FakeProvider, tmp_path: Path, env: dict[str, str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\ndrain_seconds = 1.5\n")
    d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/readyz") as r:
            assert (r.status, await r.json()) == (200, {"status": "ready"})
        d.proc.send_signal(signal.SIGTERM)
        answers = []

        async def flipped() -> bool:  # once the daemon has handled the signal
            answers.append(await readyz(s, d.url))
            return answers[-1] != (200, {"status": "ready"})

        await eventually_async(flipped, within=10, every=0.02)
        assert answers[-1] == (503, {"status": "draining"})
        async with s.get(d.url + "/healthz") as r:
            assert r.status == 200  # alive, and still serving while it drains
    assert await d.stop(signal_it=False) == 0


# --------------------------------------------------------------------------- reload


async def test_sighup_reload_changes_a_threshold(
    fake: FakeProvider, tmp_path: Path, env: dict[str, str]
) -> None:
    config = tmp_path / "c.toml"
    base = f'[providers.openai]\nbase_url = "{fake.url}"\n'
    config.write_text(base + "[guardrails.dumb_loop_detector]\nthreshold = 4\n")
    d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)

    async def post() -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(d.url + "/v1/chat/completions", json=CHAT) as r:
                return r.status

    assert [await post(), await post()] == [200, 200]
    config.write_text(
        base + "[guardrails.dumb_loop_detector]\nthreshold = 3\n"
        "[storage]\ncommit_interval_ms = 50\n"
    )
    d.proc.send_signal(signal.SIGHUP)
    # Two lines, one after the other: wait for the second (it may not have been read yet).
    await eventually(lambda: "need a restart: storage.commit_interval_ms" in d.log)
    assert "reload: applied guardrails.dumb_loop_detector" in d.log
    assert await post() == 429  # the 3rd identical request now trips it
    # A broken config on reload is refused; the running one stays.
    config.write_text('[server]\nmax_body_bytes = "big"\n')
    d.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "the running config stays" in d.log)
    assert await d.stop() == 0


async def test_a_reload_that_adds_a_fleet_says_it_needs_a_restart_and_nothing_else(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """SIGHUP after adding ``[fleet] redis_url`` to a standalone daemon's config: the fleet
    starts at the next start (redis-py is not loaded meanwhile). The log said "reload: applied
    nothing (no change)" and then that a key changed."""
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    config = tmp_path / "c.toml"
    config.write_text("")
    d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    config.write_text('[fleet]\nredis_url = "redis://127.0.0.1:1"\n')
    d.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "need a restart: fleet.redis_url" in d.log)
    async with aiohttp.ClientSession() as s, s.get(d.url + "/readyz") as r:
        assert r.status == 200
    assert await d.stop() == 0
    reload = [line for line in d.lines if "reload:" in line]
    assert 'msg="reload: applied nothing"' in reload[0] and "no change" not in reload[0]
    assert not {m for m in _imported(d.log) if m.split(".")[0] == "redis"}


# --------------------------------------------------------------------------- environment


def test_environment_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:9000"\n[atlasburn]\napi_key = "abn_file"\n')
    env = {"ATLASBURN_PROXY_LISTEN": "0.0.0.0:9100", "ATLASBURN_API_KEY": "abn_env"}
    cfg = load_config(config, env=env)
    assert cfg.server.listen == Listen("0.0.0.0", 9100)  # env beats the file
    assert cfg.atlasburn.api_key.reveal() == "abn_env"
    cfg = load_config(config, listen="127.0.0.1:9200", env=env)
    assert cfg.server.listen == Listen("127.0.0.1", 9200)  # the command line beats env
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "atlasburn-api-key").write_text("abn_credential\n")
    cfg = load_config(config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.atlasburn.api_key.reveal() == "abn_credential"  # systemd LoadCredential
    assert load_config(config, env={}).atlasburn.api_key.reveal() == "abn_file"
    from proxy.config import config_path

    assert config_path(None, {"ATLASBURN_PROXY_CONFIG": "/etc/x.toml"}) == "/etc/x.toml"
    assert config_path("/cli.toml", {"ATLASBURN_PROXY_CONFIG": "/etc/x.toml"}) == "/cli.toml"


# --------------------------------------------------------------------------- memory


def _imported(log: str) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` lines on stderr."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s+([\w.]+)\s*$", log, re.M)}


async def test_a_daemon_without_a_fleet_never_loads_the_redis_client(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """redis-py (and the OpenTelemetry modules it brings) take about 7 MB of a daemon's memory:
    it is loaded only when ``[fleet] redis_url`` is set (issue 19, idle memory)."""
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # python -X importtime: every import on stderr
    daemon = await spawn_daemon("--listen", "127.0.0.1:0", env=env)
    assert await daemon.stop() == 0
    standalone = _imported(daemon.log)
    assert "proxy.relay" in standalone and "aiohttp" in standalone  # the lines were read
    assert not {m for m in standalone if m.split(".")[0] in ("redis", "opentelemetry")}

    config = tmp_path / "fleet.toml"
    config.write_text('[fleet]\nredis_url = "redis://127.0.0.1:1"\n')  # nothing listens there
    daemon = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    assert await daemon.stop() == 0
    assert {"redis", "redis.asyncio", "proxy.guardrails.fleet"} <= _imported(daemon.log)


# --------------------------------------------------------------------------- sidecar image


def dockerfile() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            word, rest = line.split(" ", 1)
            out[word] = out.get(word, "") + " " + rest.strip() if word == "ENV" else rest.strip()
    return out


async def test_sidecar_image_command_line_works(
    fake: FakeProvider, tmp_path: Path, env: dict[str, str]
) -> None:
    """What the image runs, run directly: its ENTRYPOINT + CMD with its environment (listening on
    every interface), and its HEALTHCHECK command against it."""
    import json
    import shlex

    spec = dockerfile()
    assert spec["USER"].split(":")[0] != "0" and spec["FROM"].startswith("python:")
    image_env = dict(re.findall(r"(\w+)=(\S+)", spec["ENV"]))
    assert image_env["ATLASBURN_PROXY_LISTEN"] == "0.0.0.0:8787"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.update(image_env)
    env["ATLASBURN_PROXY_LISTEN"] = f"0.0.0.0:{port}"
    env["STATE_DIRECTORY"] = str(tmp_path / "volume")
    command = json.loads(spec["ENTRYPOINT"]) + json.loads(spec["CMD"])
    assert command == ["atlasburn-proxy", "run"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *command[1:],
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(proc)
    assert proc.stderr is not None
    line = ""
    while "ready on" not in line:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line, "exited before ready"
    assert f"ready on http://0.0.0.0:{port}" in line
    reader = asyncio.ensure_future(proc.stderr.read())
    health = json.loads(spec["HEALTHCHECK"].split("CMD ", 1)[1])
    health = [sys.executable if w == "python" else w.replace(":8787", f":{port}") for w in health]
    done = await asyncio.to_thread(subprocess.run, health, capture_output=True, timeout=10)
    assert done.returncode == 0, shlex.join(health)
    assert (tmp_path / "volume" / "atlasburn-proxy.sqlite3").exists()  # state on the volume
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    await reader


# --------------------------------------------------------------------------- systemd unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "atlasburn-proxy.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "DynamicUser=yes",
        "StateDirectory=atlasburn-proxy",
        "ConfigurationDirectory=atlasburn-proxy",
        "LoadCredential=atlasburn-api-key:",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryMax=",
    ):
        assert line in unit, line
    security = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--no-pager",
            str(ROOT / "systemd" / "atlasburn-proxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert m is not None, security.stdout + security.stderr
    assert float(m.group(1)) <= 2.0
    # systemd's own check of the unit, with ExecStart pointing at this installation.
    local = tmp_path / "atlasburn-proxy.service"
    local.write_text(
        unit.replace(
            "/opt/atlasburn-proxy/bin/atlasburn-proxy",
            str(Path(sys.executable).parent / "atlasburn-proxy"),
        )
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stderr
