"""Issue 13 C: strings a client chooses are bounded and inert everywhere.

A web page can POST ``text/plain`` to the daemon without a CORS preflight: 20 chat requests whose
``model`` is 2 MiB of text (escape sequences, newlines, a forged log line, a bidi override) must
not become 2 MiB Prometheus labels, log fields or stored events (one /metrics scrape once
answered 335 MB and took the daemon to 1.16 GB), and nothing a client sends may reach a log line,
the spool or an operator's terminal with a raw control character in it. The same for a 16 KiB
request path (the event's endpoint), the local /api/ingest and the enforce API's ``reason``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sqlite3
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import eventually
from ..fakes.ingest import FakeIngest, ingest_event
from .conftest import Figures, StartProxy

ROOT = Path(__file__).parent.parent.parent
MIB = 1 << 20
HOSTILE = (
    "\x1b[2J\x1b[H\x1b]0;owned\x07"  # clear the screen, home the cursor, set the title
    "\n2026-11-29T00:00:00.000Z level=error msg=forged\r\n"  # a forged log line
    "\u202egpt-4o\u2028\x9b31m\x7f\u200d"  # bidi override, line separator, C1 CSI, DEL, ZWJ
)
# HOSTILE as the daemon keeps it: every non-printable character as \xNN or \uNNNN.
ESCAPED = (
    "\\x1b[2J\\x1b[H\\x1b]0;owned\\x07"
    "\\x0a2026-11-29T00:00:00.000Z level=error msg=forged\\x0d\\x0a"
    "\\u202egpt-4o\\u2028\\x9b31m\\x7f\\u200d"
)
LIMIT = 256


def hostile_model(i: int) -> str:
    """2 MiB: a distinct start (so each is its own label), then escapes and filler."""
    head = f"m{i:02d}-" + (HOSTILE if i % 2 else "")
    return head + "x" * (2 * MIB - len(head))


def logfmt_field(line: str, name: str) -> str:
    """The decoded value of ``name=`` in a logfmt line (bare, or quoted with escapes)."""
    m = re.search(rf' {name}=("(?:[^"\\]|\\.)*"|[^ ]*)', line)
    assert m is not None, (name, line[:300])
    value = m.group(1)
    if not value.startswith('"'):
        return value
    decoded: str = json.loads(value)  # the logfmt escapes are JSON's
    return decoded


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def cut(text: str) -> str:
    """``text`` as the daemon bounds it when it is over the limit (printable already)."""
    return text[: LIMIT - 1] + "…"


def spooled(spool: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT CAST(body AS TEXT) FROM events ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(body) for (body,) in rows]


def assert_inert(value: str, what: str) -> None:
    assert len(value) <= LIMIT, (what, len(value))
    assert value.isprintable(), (what, value[:300])


async def test_client_chosen_strings_are_bounded_and_inert(
    start_proxy: StartProxy, ingest: FakeIngest, tmp_path: Path, figures: Figures
) -> None:
    proxy = await start_proxy(ship=False)
    rss_before = proxy.rss_mb()
    headers = {"Content-Type": "text/plain"}
    # Bounded: a daemon that writes megabyte log lines can block on its stderr pipe.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for i in range(20):
            body = json.dumps(
                {"model": hostile_model(i), "messages": [{"role": "user", "content": f"q{i}"}]}
            ).encode()
            async with s.post(
                proxy.url + "/v1/chat/completions", data=io.BytesIO(body), headers=headers
            ) as r:
                assert r.status == 200
                await r.read()
        # A 16 KiB request path: the endpoint is made of its [a-z_.] segments.
        long_path = "/v1/" + "abc/" * 3500 + "embeddings"
        async with s.post(proxy.url + long_path, json={"model": "m", "input": "x"}) as r:
            await r.read()
        # The local ingest: a model and endpoint within the 256 bound, with escapes in them.
        event = ingest_event(7, model="\x1b[31mred\x1b[0m\u202e", endpoint="/chat\x1b[2J\n")
        key = {"AtlasBurn-API-Key": ingest.api_key}
        async with s.post(proxy.url + "/api/ingest", json=event, headers=key) as r:
            assert (await r.json())["accepted"] == 1
        # The enforce API's reason: stored, logged, put into refusals, shown by `status`.
        reason = HOSTILE + "r" * (1000 - len(HOSTILE))
        suspend = {
            "org_id": "org_local",
            "action": "suspend",
            "layer": "operator",
            "ttl_seconds": 600,
            "reason": reason,
        }
        async with s.post(proxy.url + "/api/guardrails/enforce", json=suspend, headers=key) as r:
            assert r.status == 200
        async with s.post(
            proxy.url + "/v1/chat/completions", data=json.dumps({"model": "gpt-4o-mini"})
        ) as r:
            assert r.status == 429
            refusal = (await r.json())["error"]["message"]
        async with s.get(proxy.url + "/metrics") as r:
            metrics_bytes = r.content_length
            metrics = await r.content.read(MIB)  # (today's code answered 335 MB)
    rss_after, rss_peak = proxy.rss_mb(), peak_rss_mb(proxy.pid)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        "--config",
        str(tmp_path / "config0.toml"),
        cwd=ROOT,
        env={**os.environ, "ATLASBURN_PROXY_LISTEN": proxy.url.removeprefix("http://")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    status_line = out.decode()
    await eventually(lambda: len(spooled(proxy.spool)) >= 23, within=10)
    await proxy.stop()

    figures("/metrics bytes after 20 x 2 MiB models", metrics_bytes)
    figures(
        "daemon RSS MB before / after / peak",
        f"{rss_before:.0f} / {rss_after:.0f} / {rss_peak:.0f}",
    )
    assert metrics_bytes is not None and metrics_bytes < 100_000
    assert rss_peak - rss_before < 150
    text = metrics.decode()
    assert all(line.isprintable() for line in text.splitlines()), "raw control in /metrics"
    labels = {
        sample.labels["model"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "model" in sample.labels
    }
    # The long path's "m" (its upstream refused it) and the refused gpt-4o-mini were never
    # answered 2xx: they count as other.
    assert labels == {
        cut(f"m{i:02d}-" + (ESCAPED if i % 2 else "") + "x" * LIMIT) for i in range(20)
    } | {"other"}

    access = [line for line in proxy.process.lines if "logger=atlasburn.access" in line]
    assert len(access) == 22  # 20 chats, the long path, the refusal
    for line in proxy.process.lines:
        assert line.rstrip("\n").isprintable(), line[:300]
    for line in access:
        assert_inert(logfmt_field(line, "model"), "access log model")
        assert_inert(logfmt_field(line, "endpoint"), "access log endpoint")
    models = [logfmt_field(line, "model") for line in access[:20]]
    assert models[0] == cut("m00-" + "x" * LIMIT)
    assert models[1] == cut("m01-" + ESCAPED + "x" * LIMIT)
    assert logfmt_field(access[20], "endpoint") == cut("/abc" * 3500)

    events = spooled(proxy.spool)
    assert len(events) == 23
    for e in events:
        assert_inert(str(e["model"]), "stored model")
        assert_inert(str(e["endpoint"]), "stored endpoint")
    assert [e["model"] for e in events[:20]] == models
    ingested = events[21]
    assert (ingested["model"], ingested["endpoint"]) == (
        "\\x1b[31mred\\x1b[0m\\u202e",
        "/chat\\x1b[2J\\x0a",
    )

    kept = cut(ESCAPED + "r" * LIMIT)
    assert refusal.startswith(
        f"AtlasBurn guardrail: org org_local is suspended by operator ({kept}); retry after "
    )
    assert cli.returncode == 0, err.decode()
    assert status_line.rstrip("\n").isprintable()
    assert status_line.startswith("org org_local: SUSPENDED until ")
    assert status_line.endswith(f"by operator: {kept}\n")
    figures("status line characters (reason of 1,000)", len(status_line.rstrip("\n")))
