"""The local POST /api/ingest: auth, per-event validation, counts, limits; never a 500."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import RunningDaemon, StartDaemon, eventually
from .fakes.ingest import ingest_event

KEY = "abn_test_local_api_key_0123"


good = ingest_event


@pytest.fixture
async def api(start_daemon: StartDaemon) -> RunningDaemon:
    return await start_daemon(atlasburn={"api_key": KEY}, server={"max_body_bytes": 200_000})


async def post(
    d: RunningDaemon, body: Any, key: str | None = KEY, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["AtlasBurn-API-Key"] = key
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/api/ingest", data=data, headers=headers) as r:
            text = await r.text()
            assert r.content_type == "application/json", text
            return r.status, json.loads(text)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "missing AtlasBurn-API-Key header"),
        ("abn_test_wrong", "wrong AtlasBurn-API-Key"),
        ("sk-not-an-abn-key", "wrong AtlasBurn-API-Key"),
        ("", "wrong AtlasBurn-API-Key"),
    ],
)
async def test_auth(api: RunningDaemon, key: str | None, message: str) -> None:
    assert await post(api, good(), key=key) == (
        401,
        {"error": {"code": "unauthorized", "message": message}},
    )
    assert api.daemon.store.queued == 0


async def test_single_event_and_batch(api: RunningDaemon) -> None:
    assert await post(api, good(1)) == (
        200,
        {"accepted": 1, "rejected": 0, "guardrail_status": "ok", "errors": []},
    )
    status, answer = await post(
        api, {"events": [good(2), good(3, tokens_in=-1), good(4), {"ts": "x"}, "nope"]}
    )
    assert status == 200
    assert (answer["accepted"], answer["rejected"]) == (2, 3)
    assert answer["errors"] == [
        {"index": 1, "error": "tokens_in: expected an integer from 0 to 1000000000000, got -1"},
        {
            "index": 3,
            "error": "missing field(s): provider, model, endpoint, status, tokens_in, "
            "tokens_out, cost_usd, latency_ms, fingerprint, stream",
        },
        {"index": 4, "error": "expected an event object, got str"},
    ]
    store = api.daemon.store
    await eventually(lambda: store.committed_total == 3)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"ts": "2026-13-45T00:00:00.000Z"},
            "ts: not a real date and time: '2026-13-45T00:00:00.000Z'",
        ),
        (
            {"ts": "yesterday"},
            "ts: expected ISO 8601 UTC like 2026-11-29T01:55:24.123Z, got 'yesterday'",
        ),
        ({"status": "200"}, "status: expected an integer from 100 to 599, got '200'"),
        ({"status": True}, "status: expected an integer from 100 to 599, got True"),
        ({"cost_usd": -0.5}, "cost_usd: expected a number from 0 to 1000000000, got -0.5"),
        ({"cost_usd": 1e300}, "cost_usd: expected a number from 0 to 1000000000, got 1e+300"),
        (
            {"fingerprint": "sha256:XYZ"},
            "fingerprint: expected 'sha256:' and 64 lowercase hex digits",
        ),
        ({"stream": "yes"}, "stream: expected true or false, got 'yes'"),
        (
            {"endpoint": "chat"},
            "endpoint: expected a path starting with '/' (at most 256 characters), got 'chat'",
        ),
        (
            {"endpoint": "/" + "a" * 300},
            "endpoint: expected a path starting with '/' (at most 256 characters),"
            " got '/" + "a" * 26 + "..." + "a" * 28 + "'",
        ),
        (
            {"ts": "\x1b[2J" * 1000},  # echoed bounded and inert
            "ts: expected ISO 8601 UTC like 2026-11-29T01:55:24.123Z,"
            " got '" + "\\x1b[2J" * 3 + "\\x1b[2..." + "\\x1b[2J" * 4 + "'",
        ),
        ({"provider": ""}, "provider: expected a name (1-64 characters), got ''"),
        ({"extra": 1}, "unknown field(s): extra"),
    ],
)
async def test_each_bad_field_is_named(
    api: RunningDaemon, change: dict[str, Any], error: str
) -> None:
    assert await post(api, {"events": [good(0, **change)]}) == (
        200,
        {
            "accepted": 0,
            "rejected": 1,
            "guardrail_status": "ok",
            "errors": [{"index": 0, "error": error}],
        },
    )


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"events": {"a": 1}}', 400, "invalid_body"),
        (b'{"events": [], "junk": 1}', 400, "invalid_body"),
        (b'{"events": [], "org_id": "org_other"}', 403, "forbidden"),
        (b'{"events": [' + b"1," * 10_001 + b"1]}", 413, "too_many_events"),
        (b'{"events": ["' + b"x" * 300_000 + b'"]}', 413, "body_too_large"),
        (b"\xff\xfe\x00garbage", 400, "invalid_json"),
        (b'{"events": [NaN]}', 400, "invalid_json"),
    ],
)
async def test_bad_bodies(api: RunningDaemon, raw: bytes, status: int, code: str) -> None:
    got_status, answer = await post(api, None, raw=raw)
    assert (got_status, answer["error"]["code"]) == (status, code)
    assert api.daemon.store.queued == 0


async def test_method_not_allowed_is_json(api: RunningDaemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(api.url + "/api/ingest", headers={"AtlasBurn-API-Key": KEY}) as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_generated_key_when_none_is_configured(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    d = await start_daemon()
    key_file = d.daemon.config.storage.path.parent / "local-api-key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = key_file.read_text().strip()
    assert key.startswith("abn_local_") and len(key) > 40
    assert (await post(d, good(), key=None))[0] == 401
    assert (await post(d, good(), key=key))[0] == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda evs: json.dumps({"events": evs}).encode(), st.lists(json_values, max_size=5)
        ),
        st.binary(max_size=200),
    )
)
async def test_hostile_bodies_never_500(api: RunningDaemon, raw: bytes) -> None:
    headers = {"AtlasBurn-API-Key": KEY, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(api.url + "/api/ingest", data=raw, headers=headers) as r:
            assert r.status in (200, 400, 403, 413), await r.text()
        async with s.get(api.url + "/healthz") as r:
            assert r.status == 200


async def test_compressed_bodies_are_read_within_the_body_limit(api: RunningDaemon) -> None:
    import gzip

    from .fakes.provider import gzip_bomb

    packed = gzip.compress(json.dumps({"events": [good(1), good(2)]}).encode())
    headers = {"AtlasBurn-API-Key": KEY, "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as s:
        async with s.post(api.url + "/api/ingest", data=packed, headers=headers) as r:
            assert (r.status, (await r.json())["accepted"]) == (200, 2)
        # About 1 MiB on the wire: over the 200,000-byte limit before it is even decoded.
        async with s.post(api.url + "/api/ingest", data=gzip_bomb(), headers=headers) as r:
            assert r.status == 413
        # Small on the wire, 1 GiB decoded: refused once it decodes past the limit.
        small_bomb = gzip.compress(b"\0" * 10_000_000)
        async with s.post(api.url + "/api/ingest", data=small_bomb, headers=headers) as r:
            assert (r.status, await r.json()) == (
                400,
                {
                    "error": {
                        "code": "invalid_encoding",
                        "message": "body is not valid gzip or decodes to over 200000 bytes",
                    }
                },
            )


async def test_a_body_that_stops_coming_is_408(start_daemon: StartDaemon) -> None:
    import asyncio

    d = await start_daemon(atlasburn={"api_key": KEY}, server={"body_timeout_seconds": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.port)
    writer.write(
        f"POST /api/ingest HTTP/1.1\r\nHost: localhost\r\nAtlasBurn-API-Key: {KEY}\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"
