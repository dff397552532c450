"""Attribution (DESIGN "Attribution: who is spending"): the AtlasBurn-* headers and the /@<app>/
prefix, read and removed before the request goes upstream; key_id for every credential header;
attributes on events, shipped, ingested, reported and labelled."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from proxy.attribution import Attributes

from .conftest import RunningDaemon, StartDaemon, eventually, shipping
from .fakes.ingest import FakeIngest, ingest_event
from .fakes.provider import FakeProvider
from .test_infra import metrics
from .test_report_since import run_report

ROOT = Path(__file__).parent.parent
EXE = Path(sys.executable).resolve().name  # e.g. python3.11, not the 15-character comm
KEY = "sk-test-fake-canary-Q7vZ2mX9kR4tW1y"  # a canary: obviously fake, in no other text
API_KEY = "abn_test_attribution"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def secret_of(d: RunningDaemon) -> bytes:
    path = d.daemon.config.storage.path.parent / "key-id-secret"
    return bytes.fromhex(path.read_text().strip())


def expected_id(d: RunningDaemon, key: str) -> str:
    """key_id as DESIGN defines it: key_ + 16 hex of HMAC-SHA-256(secret, key)."""
    return "key_" + hmac.new(secret_of(d), key.encode(), hashlib.sha256).hexdigest()[:16]


def openai_client(base: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base, api_key=KEY, max_retries=0, default_headers=headers or None
    )


def shipped(ingest: FakeIngest) -> list[dict[str, Any]]:
    return [e for call in ingest.calls if call.status == 200 for e in call.events]


def own_headers(fake: FakeProvider) -> list[str]:
    return [k for seen in fake.requests for k, _ in seen.headers if k.lower().startswith("atlas")]


async def test_headers_name_app_user_session_and_tags_and_never_go_upstream(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    headers = {
        "AtlasBurn-App": "search-api",
        "AtlasBurn-User": "alice@example.com",
        "AtlasBurn-Session": "sess-42",
        "AtlasBurn-Tag-Team": "retrieval",
        "atlasburn-tag-env": "prod",
    }
    async with openai_client(daemon.url + "/v1", **headers) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async for _ in stream:
            pass
    assert own_headers(fake) == []  # no AtlasBurn-* header reached the provider
    assert len(fake.requests) == 2
    for event in daemon.events:
        assert event.attributes is not None
        assert event.to_ingest()["attributes"] == {
            "app": "search-api",
            "user": "alice@example.com",
            "session": "sess-42",
            "tags": {"team": "retrieval", "env": "prod"},
            "key_id": expected_id(daemon, KEY),
        }


async def test_path_prefix_names_the_app_and_a_header_wins(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    async with openai_client(daemon.url + "/@ci-bot/v1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with openai_client(daemon.url + "/@ci-bot/v1", **{"AtlasBurn-App": "nightly"}) as c:
        await c.embeddings.create(model="text-embedding-3-small", input="x")
    # The prefix is not part of what goes upstream: the provider sees /v1/...
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions", "/v1/embeddings"]
    apps = [e.attributes.app if e.attributes else None for e in daemon.events]
    assert apps == ["ci-bot", "nightly"]
    assert daemon.events[0].tokens_in == 1536  # metered like any other request
    async with aiohttp.ClientSession() as s:
        async with s.post(daemon.url + "/@x/nowhere", json={}) as r:
            assert r.status == 404  # a prefix routes as the rest of the path does
        async with s.post(daemon.url + "/@%F0%9F%A4%96%20bot/openai/v1/embeddings", json={}) as r:
            assert r.status == 200
    assert daemon.events[-1].attributes is not None
    assert daemon.events[-1].attributes.app == "\U0001f916 bot"


async def test_bounds_cut_never_refuse(fake: FakeProvider, daemon: RunningDaemon) -> None:
    headers = [(f"AtlasBurn-Tag-T{i:02d}", f"v{i}") for i in range(14)]
    headers += [
        ("AtlasBurn-App", "a" * 300),
        ("AtlasBurn-User", "é" * 100),  # 200 bytes
        ("AtlasBurn-Session", "admin\u202egpj.exe"),
        ("AtlasBurn-Tag-" + "n" * 200, "long name"),
        ("AtlasBurn-App", "second"),  # the first one counts
    ]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            daemon.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers=[*headers, ("Authorization", "Bearer " + KEY)],
        ) as r:
            assert r.status == 200
    [event] = daemon.events
    a = event.attributes
    assert a is not None
    assert a.app == "a" * 125 + "…"  # 128 bytes, the cut marked as any inert text's
    assert a.user == "é" * 62 + "…"  # 127 bytes: a character is never split
    assert a.session == "admin\\u202egpj.exe"  # inert: no bidi override reaches a terminal
    assert [name for name, _ in a.tags] == [f"t{i:02d}" for i in range(10)]
    assert own_headers(fake) == []


async def test_key_id_for_every_credential_header(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    expected = expected_id(daemon, KEY)
    async with openai_client(daemon.url + "/v1") as c:  # Authorization: Bearer
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with anthropic.AsyncAnthropic(base_url=daemon.url, api_key=KEY, max_retries=0) as c:
        await c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MESSAGES)
    gemini = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    async with aiohttp.ClientSession() as s:
        for i, (url, headers) in enumerate(
            [
                (daemon.url + gemini, {"x-goog-api-key": KEY}),
                (daemon.url + gemini + "?key=" + KEY, {}),
                (daemon.url + "/v1/embeddings", {"api-key": KEY}),  # Azure's header
                (daemon.url + "/v1/embeddings", {"Authorization": "bearer  " + KEY}),
                (daemon.url + "/v1/embeddings", {"Authorization": "Bearer sk-other"}),
                (daemon.url + "/v1/embeddings", {}),  # no credential: no key_id
            ]
        ):
            embedding = {"model": "text-embedding-3-small", "input": str(i)}
            payload = body if "gemini" in url else embedding
            async with s.post(url, json=payload, headers=headers) as r:
                assert r.status == 200, await r.text()
    ids = [e.attributes.key_id if e.attributes else None for e in daemon.events]
    assert ids == [expected] * 6 + [expected_id(daemon, "sk-other"), None]
    assert expected != expected_id(daemon, "sk-other")
    # The secret is private, beside the store.
    secret = daemon.daemon.config.storage.path.parent / "key-id-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret_of(daemon)) == 32


def key_id_command(config: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "key-id", "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


async def test_key_id_command_prints_the_events_id_and_key_names_name_it(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    spool = tmp_path / "kid" / "spool.sqlite3"
    d = await start_daemon(storage={"path": str(spool)})
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    done = await asyncio.to_thread(key_id_command, config, KEY + "\n")
    assert done.returncode == 0, done.stderr
    key_id = done.stdout.strip()
    assert key_id == expected_id(d, KEY)
    assert KEY not in done.stdout + done.stderr
    await d.daemon.stop()

    named = await start_daemon(
        storage={"path": str(spool)}, attribution={"key_names": {key_id: "team-search"}}
    )
    async with openai_client(named.url + "/v1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [event] = named.events
    assert event.to_ingest()["attributes"] == {"key_id": key_id, "key_name": "team-search"}


def test_key_id_command_without_a_key_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "s" / "spool.sqlite3"}"\n')
    done = key_id_command(config, "\n")
    assert done.returncode == 1
    assert "no key on stdin" in done.stderr


async def test_refused_requests_carry_their_attributes(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    await daemon.daemon.kill.suspend("manual", "test", 60, "api")
    async with openai_client(daemon.url + "/@ci-bot/v1") as c:
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [event] = daemon.events
    assert event.status == 429
    assert event.to_ingest()["attributes"] == {"app": "ci-bot", "key_id": expected_id(daemon, KEY)}


async def test_shipped_events_carry_attributes(
    fake: FakeProvider, start_daemon: StartDaemon, ingest: FakeIngest
) -> None:
    d = await start_daemon(**shipping(ingest))
    async with openai_client(d.url + "/@ci-bot/v1", **{"AtlasBurn-User": "bob"}) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await eventually(lambda: len(shipped(ingest)) == 1)
    assert shipped(ingest)[0]["attributes"] == {
        "app": "ci-bot",
        "user": "bob",
        "key_id": expected_id(d, KEY),
    }


async def stored(d: RunningDaemon) -> list[dict[str, Any]]:
    """The event bodies in the daemon's store, oldest first."""
    await d.daemon.store.flush()
    db = sqlite3.connect(d.daemon.config.storage.path)
    try:
        return [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY id")]
    finally:
        db.close()


async def ingest_post(d: RunningDaemon, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            d.url + "/api/ingest", json=body, headers={"AtlasBurn-API-Key": API_KEY}
        ) as r:
            return r.status, await r.json()


async def test_ingest_validates_attributes(start_daemon: StartDaemon) -> None:
    d = await start_daemon(atlasburn={"api_key": API_KEY})
    good = {
        "app": "ci-bot",
        "user": "u",
        "session": "s",
        "tags": {"Team": "search"},
        "key_id": "key_0123456789abcdef",
        "key_name": "team-search",
        "process": {"pid": 4242, "exe": "python3.11", "unit": "ci-runner.service"},
    }
    assert await ingest_post(d, ingest_event(1, attributes=good)) == (
        200,
        {"accepted": 1, "rejected": 0, "guardrail_status": "ok", "errors": []},
    )
    assert (await stored(d))[-1]["attributes"] == {**good, "tags": {"team": "search"}}
    bad: list[Any] = [
        [],
        {"color": "red"},
        {"app": ""},
        {"app": "x" * 129},
        {"user": 7},
        {"tags": {f"t{i}": "v" for i in range(11)}},
        {"tags": {"team": 1}},
        {"key_id": "key_XYZ"},
        {"key_id": KEY},
        {"process": {"exe": "python"}},
        {"process": {"pid": 0}},
        {"process": {"pid": 12, "cwd": "/"}},
    ]
    batch = {"events": [ingest_event(i, attributes=a) for i, a in enumerate(bad)]}
    status, answer = await ingest_post(d, batch)
    assert (status, answer["accepted"], answer["rejected"]) == (200, 0, len(bad))
    # An empty object says nothing: the event has no attributes.
    assert await ingest_post(d, ingest_event(99, attributes={})) == (
        200,
        {"accepted": 1, "rejected": 0, "guardrail_status": "ok", "errors": []},
    )
    last = (await stored(d))[-1]
    assert last["fingerprint"] == "sha256:" + f"{99:064x}"
    assert "attributes" not in last


async def test_report_by_each_dimension_adds_up(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    spool = tmp_path / "r" / "spool.sqlite3"
    d = await start_daemon(storage={"path": str(spool)})
    sent = [
        ("/@ci-bot/v1", {"AtlasBurn-User": "alice", "AtlasBurn-Tag-Team": "search"}),
        ("/@ci-bot/v1", {"AtlasBurn-User": "bob"}),
        ("/v1", {"AtlasBurn-App": "web", "AtlasBurn-Tag-Team": "search"}),
        ("/v1", {}),
    ]
    for i, (base, headers) in enumerate(sent):
        async with openai_client(d.url + base, **headers) as c:
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": str(i)}]
            )
    await d.daemon.stop()
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    one = 0.0001578  # a chat completion of the fake: 512 x 0.15 + 1024 x 0.075 + 7 x 0.60 / 1e6
    by_model = (await asyncio.to_thread(run_report, config, "--since", "all"))["total"]
    assert by_model["requests"] == 4
    assert by_model["cost_usd"] == pytest.approx(4 * one, rel=1e-9)
    expected = {
        "app": {"ci-bot": 2, "web": 1, "(none)": 1},
        "user": {"alice": 1, "bob": 1, "(none)": 2},
        "tag:Team": {"search": 2, "(none)": 2},
        "key": {expected_id(d, KEY): 4},
        "session": {"(none)": 4},
    }
    for by, counts in expected.items():
        out = await asyncio.to_thread(run_report, config, "--since", "all", "--by", by)
        assert {row[by]: row["requests"] for row in out["rows"]} == counts, by
        assert sum(row["cost_usd"] for row in out["rows"]) == pytest.approx(4 * one, rel=1e-9)
        assert out["total"] == {**{k: v for k, v in by_model.items() if k != "model"}, by: "total"}
    rows = (await asyncio.to_thread(run_report, config, "--since", "all", "--by", "app"))["rows"]
    assert rows[0] == {
        "app": "ci-bot",
        "requests": 2,
        "refused": 0,
        "errors": 0,
        "tokens_in": 2 * 1536,
        "tokens_out": 2 * 7,
        "cost_usd": round(2 * one, 10),
        "unpriced": 0,
        "unknown_cost": 0,
    }


async def test_metrics_label_app(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async with openai_client(daemon.url + "/@ci-bot/v1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with openai_client(daemon.url + "/v1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    m = await metrics(daemon)
    labels = (("model", "gpt-4o-mini"), ("provider", "openai"), ("status", "200"))
    assert m[("atlasburn_requests_total", (("app", "ci-bot"), *labels))] == 1
    assert m[("atlasburn_requests_total", (("app", ""), *labels))] == 1
    cost = (("app", "ci-bot"), ("model", "gpt-4o-mini"), ("provider", "openai"))
    assert m[("atlasburn_cost_usd_total", cost)] == pytest.approx(0.0001578, rel=1e-12)


async def test_the_key_is_never_kept_anywhere(
    fake: FakeProvider,
    start_daemon: StartDaemon,
    ingest: FakeIngest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A canary key sent every way a client sends one: it is in no event, log line, metric,
    report, spool byte or shipped payload; nor is any 8-character piece of it."""
    caplog.set_level("DEBUG")
    spool = tmp_path / "canary" / "spool.sqlite3"
    overrides = shipping(ingest)
    overrides["storage"]["path"] = str(spool)
    d = await start_daemon(logging={"access": True, "level": "debug"}, **overrides)
    async with openai_client(d.url + "/@ci-bot/v1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with anthropic.AsyncAnthropic(base_url=d.url, api_key=KEY, max_retries=0) as c:
        await c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MESSAGES)
    async with aiohttp.ClientSession() as s:
        gemini = "/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=" + KEY
        async with s.post(d.url + gemini, json={"contents": []}) as r:
            assert r.status == 200
        async with s.post(
            d.url + "/v1/embeddings", json={"model": "m", "input": "x"}, headers={"api-key": KEY}
        ) as r:
            assert r.status == 200
    await d.daemon.kill.suspend("manual", "canary", 60, "api")
    async with openai_client(d.url + "/v1") as c:
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await eventually(lambda: len(shipped(ingest)) == 5)
    scraped = json.dumps(sorted(map(str, (await metrics(d)).items())))
    await d.daemon.stop()
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    reports = ""
    for by in ("model", "app", "key", "user", "unit"):
        reports += json.dumps(
            await asyncio.to_thread(run_report, config, "--since", "all", "--by", by)
        )
    stored = b"".join(p.read_bytes() for p in spool.parent.iterdir() if p.is_file())
    places = {
        "events": json.dumps([e.to_ingest() for e in d.events]) + repr(d.events),
        "log": caplog.text,
        "metrics": scraped,
        "reports": reports,
        "shipped": json.dumps(shipped(ingest)),
        "state directory": stored.decode("latin-1"),
    }
    pieces = {KEY[i : i + 8] for i in range(len(KEY) - 7)}
    for where, text in places.items():
        assert KEY not in text, where
        found = [p for p in pieces if p in text]
        assert found == [], (where, found)
    assert all(e.attributes and e.attributes.key_id for e in d.events)


def test_attributes_of_nothing_are_none() -> None:
    assert Attributes().to_json() is None
    assert not Attributes()
    assert Attributes(app="a").to_json() == {"app": "a"}


async def test_attribution_off_keeps_nothing_and_still_relays_no_own_header(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(attribution={"enabled": False})
    async with openai_client(d.url + "/@ci-bot/v1", **{"AtlasBurn-User": "alice"}) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [event] = d.events
    assert event.attributes is None and "attributes" not in event.to_ingest()
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions"]
    assert own_headers(fake) == []


# One connection per request (urllib keeps none), each a chat stream the fake provider sends
# 30 ms an event, as a real one takes a while: a connection closed before its lookup ran (an
# instant answer to a one-shot client) is gone from the kernel's tables and names no process.
CLIENT = """
import json, os, sys, urllib.request
for i in range(int(sys.argv[2])):
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": f"{os.getpid()} {i}"}]}).encode()
    request = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json", "x-fake-delay-ms": "30"})
    urllib.request.urlopen(request).read()
print(os.getpid())
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="process attribution needs /proc")
async def test_every_request_names_its_calling_process(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    """A client on this host, changed in nothing, one connection per request: each event names
    its process (the lookup of a new connection is waited for by the event, not the client)."""
    daemon = await start_daemon(attribution={"process": True})  # (the suite has it off)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, daemon.url, "3", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    pid = int(out)
    await eventually(lambda: len(daemon.events) == 3)
    exe = EXE
    for event in daemon.events:
        assert event.attributes is not None and event.attributes.process is not None
        assert (event.attributes.process.pid, event.attributes.process.exe) == (pid, exe)
    assert all(e.to_ingest()["attributes"]["process"]["pid"] == pid for e in daemon.events)
    m = await metrics(daemon)  # (this scrape's own connection is looked up too)
    assert m[("atlasburn_process_lookups_found_total", ())] >= 3
    assert m[("atlasburn_process_lookups_not_found_total", ())] == 0
    assert m[("atlasburn_process_lookups_skipped_total", ())] == 0


async def test_process_lookup_off_names_no_process(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(attribution={"process": False})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, d.url, "1", stdout=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    await eventually(lambda: len(d.events) == 1)
    [event] = d.events
    assert event.attributes is None or event.attributes.process is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="process attribution needs /proc")
async def test_an_instant_refusal_waits_for_its_connections_lookup(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    """A 429 on a new connection is answered before the connection's process is known: its
    event waits for the lookup (the client does not), and names the process."""
    daemon = await start_daemon(attribution={"process": True})  # (the suite has it off)
    await daemon.daemon.kill.suspend("manual", "test", 60, "api")
    host, port = daemon.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    writer.write(
        b"POST /@ci-bot/v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type:"
        b" application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), port.encode(), len(body), body)
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 429")
    await eventually(lambda: len(daemon.events) == 1)  # the connection is still open
    writer.close()
    [event] = daemon.events
    assert event.to_ingest()["attributes"] == {
        "app": "ci-bot",
        "process": {"pid": os.getpid(), "exe": EXE},
    }


async def test_a_tag_named_with_any_header_character_is_reported_and_budgeted(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A header name may hold . ! # $ % & ' * + ^ _ ` | ~ -: ``AtlasBurn-Tag-Cost.Center`` was
    recorded as tag ``cost.center``, but ``report --by tag:cost.center`` and a budget matching
    ``tag:Cost.Center`` were refused (1-128 letters, digits, _ and -)."""
    spool = tmp_path / "t" / "spool.sqlite3"
    budget = {"name": "cc", "match": {"tag:Cost.Center": "eng"}, "max_usd_per_hour": 0.0001}
    d = await start_daemon(storage={"path": str(spool)}, guardrails={"budgets": [budget]})
    async with openai_client(d.url + "/v1", **{"AtlasBurn-Tag-Cost.Center": "eng"}) as c:
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "1"}]
        )
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "2"}]
            )
    assert info.value.response.headers["AtlasBurn-Guardrail"] == "budget"
    await d.daemon.stop()
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    out = await asyncio.to_thread(run_report, config, "--since", "all", "--by", "tag:Cost.Center")
    assert {row["tag:Cost.Center"]: row["requests"] for row in out["rows"]} == {"eng": 2}


async def test_a_bare_bearer_scheme_is_no_credential(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """``Authorization: Bearer`` with no token (a tool whose token setting is empty) beside
    ``x-api-key``: the key_id was that of the word ``Bearer``, the same for every key."""
    body = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        for headers in (
            {"Authorization": "Bearer ", "x-api-key": KEY},
            {"Authorization": "bearer", "x-api-key": "sk-other"},
            {"Authorization": "Bearer"},
        ):
            async with s.post(daemon.url + "/v1/messages", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
    ids = [e.attributes.key_id if e.attributes else None for e in daemon.events]
    assert ids == [expected_id(daemon, KEY), expected_id(daemon, "sk-other"), None]


async def test_the_status_page_session_cookie_never_goes_upstream(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """A browser app that sends credentials to a provider route carries the daemon's status
    page session cookie too: it is taken out; the app's own cookies are relayed."""
    async with aiohttp.ClientSession() as s:
        for cookie, relayed in (
            ("theme=dark; atlasburn_session_8787=s3cret; lang=en", "theme=dark; lang=en"),
            ("atlasburn_session_8787=s3cret", None),
        ):
            async with s.post(
                daemon.url + "/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": cookie},
                headers={"Cookie": cookie},
            ) as r:
                assert r.status == 200
            assert fake.requests[-1].header("Cookie") == relayed
    assert not any("s3cret" in v for seen in fake.requests for _, v in seen.headers)


async def test_taking_the_session_cookie_out_keeps_every_other_header(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """Several ``Cookie`` lines, one of the session alone: that one is not sent; every other
    header goes as it came, one with an empty value too (as it does without the cookie)."""
    lines = [("X-Empty", ""), ("Cookie", "theme=dark"), ("Cookie", "atlasburn_session_8787=s")]
    async with aiohttp.ClientSession() as s:
        for cookies in (lines[1:], []):
            async with s.post(
                daemon.url + "/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": str(cookies)},
                headers=[lines[0], *cookies],
            ) as r:
                assert r.status == 200
            seen = fake.requests[-1].headers
            assert [(n, v) for n, v in seen if n.lower() in ("x-empty", "cookie")] == [
                ("X-Empty", ""),
                *cookies[:1],
            ]
