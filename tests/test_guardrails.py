"""Guardrails end to end: the loop detector with real SDKs, refusals in each provider's shape,
the local enforce API, TTL expiry, the spend cap, and the report to the AtlasBurn API."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import LoopDetectorConfig
from proxy.events import iso_ms
from proxy.guardrails import LoopDetector

from .conftest import RunningDaemon, StartDaemon, eventually, shipping
from .fakes.ingest import FakeIngest, ingest_event
from .fakes.provider import FakeProvider

KEY = "abn_test_guardrails_key_42"
MESSAGES = [{"role": "user", "content": "Are we there yet?"}]


def oai(d: RunningDaemon, retries: int = 2) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="sk-test", max_retries=retries)


async def test_openai_sdk_4th_identical_request_is_refused_without_retries(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon()
    async with oai(d) as c:  # the SDK's default: 2 retries
        for _ in range(3):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # A different request in between passes and does not disturb the count.
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "other"}]
        )
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert time.monotonic() - started < 0.5  # no retry, no back-off sleep
        # Now the org is suspended: anything is refused.
        with pytest.raises(openai.RateLimitError):
            await c.embeddings.create(model="text-embedding-3-small", input="x")
    assert len(fake.requests) == 4  # 3 identical + 1 other; the SDK retried nothing
    response = info.value.response
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["AtlasBurn-Guardrail"] == "dumb_loop_detector"
    assert 7199 <= int(response.headers["Retry-After"]) <= 7200
    assert 7198_000 <= int(response.headers["retry-after-ms"]) <= 7200_000
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "atlasburn_guardrail"
    fingerprint = d.events[0].fingerprint
    assert error["message"] == (
        "AtlasBurn guardrail: org org_local is suspended by dumb_loop_detector (fingerprint"
        f" {fingerprint} seen 4 times in 60s); retry after {response.headers['Retry-After']}s."
        " An operator resumes it with `atlasburn-proxy resume` (or DELETE"
        f' /api/guardrails/enforce); if this repeat is expected, add "{fingerprint}" to'
        " guardrails.dumb_loop_detector.allow_fingerprints, or set"
        " guardrails.dumb_loop_detector.exempt_header and send that header with it"
    )
    refused = [e for e in d.events if e.status == 429]
    assert [(e.refused_by, e.tokens_in, e.cost_usd) for e in refused] == [
        ("dumb_loop_detector", 0, 0.0)
    ] * 2
    state = d.daemon.kill.check()
    assert state is not None and state.reason == f"fingerprint {fingerprint} seen 4 times in 60s"


async def test_anthropic_sdk_likewise(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon()
    async with anthropic.AsyncAnthropic(
        base_url=d.url + "/anthropic", api_key="sk-ant-test", max_retries=2
    ) as c:
        for _ in range(3):
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as info:
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
    assert len(fake.requests) == 3
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_gemini_refusal_shape(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon()
    await d.daemon.kill.suspend("manual", "budget review", 30, "api")
    async with aiohttp.ClientSession() as s:
        async with s.post(
            d.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent", json={"contents": []}
        ) as r:
            assert r.status == 429
            body = await r.json()
            assert r.headers["Retry-After"] == "30"
    assert body["error"]["code"] == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert body["error"]["message"] == (
        "AtlasBurn guardrail: org org_local is suspended by manual (budget review); retry after 30s"
        ". An operator resumes it with `atlasburn-proxy resume` (or DELETE /api/guardrails/enforce)"
    )
    assert fake.requests == []


async def test_sdk_retries_are_not_new_occurrences(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        for retry in ("0", "1", "2", "0", "1", "0"):
            async with s.post(
                d.url + "/v1/chat/completions",
                json=body,
                headers={"x-stainless-retry-count": retry},
            ) as r:
                assert r.status == 200, retry
        async with s.post(d.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 429  # the 4th occurrence


@pytest.mark.parametrize("exempt", ["allow", "header"])
async def test_exemptions(fake: FakeProvider, start_daemon: StartDaemon, exempt: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "n": 1}
    from proxy.adapters import ADAPTERS
    from proxy.fingerprint import fingerprint

    raw = json.dumps(body).encode()
    meta = ADAPTERS["openai"].describe("/v1/chat/completions", body)
    fp = fingerprint("openai", meta.endpoint, meta.canonical, raw)
    loop: dict[str, Any] = (
        {"allow_fingerprints": [fp]} if exempt == "allow" else {"exempt_header": "X-Sample-Run"}
    )
    d = await start_daemon(guardrails={"dumb_loop_detector": loop})
    headers = {"Content-Type": "application/json"}
    if exempt == "header":
        headers["X-Sample-Run"] = "eval-42"
    async with aiohttp.ClientSession() as s:
        for _ in range(8):
            async with s.post(d.url + "/v1/chat/completions", data=raw, headers=headers) as r:
                assert r.status == 200
    assert fake.requests[-1].header("X-Sample-Run") == ("eval-42" if exempt == "header" else None)


async def test_scope_fingerprint_refuses_only_that_request(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(
        guardrails={
            "dumb_loop_detector": {
                "scope": "fingerprint",
                "ttl_seconds": 60,
                "exempt_header": "x-expected-repeat",
            }
        }
    )
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(6):
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                statuses.append(r.status)
                message = (await r.json()).get("error", {}).get("message")
                retry_after = r.headers.get("Retry-After")
        async with s.post(d.url + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            other = r.status
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert other == 200
    assert d.daemon.kill.status == "ok"
    # Not "the org is suspended", and no `resume` (it would not help): what lets it through.
    fp = d.events[0].fingerprint
    assert message == (
        f"AtlasBurn guardrail dumb_loop_detector: fingerprint {fp} seen 4 times in 60s;"
        f" requests identical to this one are refused for {retry_after}s (the org is not"
        f' suspended); if this repeat is expected, add "{fp}" to'
        " guardrails.dumb_loop_detector.allow_fingerprints, or send the header"
        " x-expected-repeat with it"
    )


async def test_window_slides(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon(guardrails={"dumb_loop_detector": {"window_seconds": 1}})
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
        await asyncio.sleep(1.05)
        async with s.post(d.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200  # the first three fell out of the window


async def test_polling_a_free_endpoint_is_not_a_loop(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon()
    async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="sk-test", max_retries=0) as c:
        for _ in range(8):
            assert [m.id async for m in c.models.list()][0] == "gpt-4o-mini"
    assert d.daemon.kill.status == "ok"


async def test_requests_the_provider_refuses_are_not_a_loop(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    """Attack review M3: four identical requests that the provider answers 401 (a neighbour on
    the host with no provider key) suspended the org for two hours. Only answered (2xx)
    requests are occurrences; the fourth answered one is still refused."""
    d = await start_daemon()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    no_key = {"x-fake-status": "401"}
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.post(d.url + "/v1/chat/completions", json=body, headers=no_key) as r:
                assert r.status == 401
        assert d.daemon.kill.status == "ok"
        statuses = []
        for _ in range(4):
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 200, 429]
    assert len(fake.requests) == 9


async def test_counting_tokens_is_not_a_loop(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    """count_tokens costs nothing: an agent that counts before every turn is no loop."""
    d = await start_daemon()
    async with anthropic.AsyncAnthropic(
        base_url=d.url, api_key="sk-ant-test", max_retries=0
    ) as c:
        for _ in range(6):
            counted = await c.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)
            assert counted.input_tokens > 0
    assert d.daemon.kill.status == "ok"
    assert len(fake.requests) == 6


class Reference:
    """The loop detector's contract, naively: every occurrence's time (to the microsecond, as
    the detector keeps it), per fingerprint."""

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold, self.window = threshold, round(window * 1_000_000)
        self.times: dict[str, list[int]] = {}

    def observe(self, fingerprint: str, now: float) -> int | None:
        us = int(now * 1_000_000)
        recent = [t for t in self.times.get(fingerprint, []) if t > us - self.window]
        if len(recent) + 1 >= self.threshold:
            self.times.pop(fingerprint, None)  # a trip starts the count afresh
            return len(recent) + 1
        self.times[fingerprint] = [*recent, us]
        return None


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(2, 5),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    steps=st.lists(
        st.tuples(
            st.integers(0, 400),  # which fingerprint: a few hot ones among many seen once
            st.sampled_from([0.0, 0.001, 0.1, 0.5, 1.0, 2.5, 3.0, 25.0]),  # time since the last
        ),
        max_size=400,
    ),
)
def test_detector_counts_exactly_like_the_naive_window(
    threshold: int, window: float, steps: list[tuple[int, float]]
) -> None:
    detector = LoopDetector(
        LoopDetectorConfig(threshold=threshold, window_seconds=window, max_tracked=1000)
    )
    reference = Reference(threshold, window)
    now = 1000.0
    for which, gap in steps:
        now += gap
        fingerprint = f"sha256:{which % 7 if which < 200 else which:064x}"
        trip = detector.observe(fingerprint, now=now)
        assert (trip and trip.count) == reference.observe(fingerprint, now), (fingerprint, now)
    assert detector.forgotten == 0


@pytest.mark.parametrize("threshold", [2, 4])
def test_detector_counts_exactly_over_a_long_run(threshold: int) -> None:
    # Long enough for full buckets (about 2,000 fingerprints in the window, 64 buckets): records
    # are cut off as buckets grow, and repeats rotate through their generations.
    rng = random.Random(threshold)
    detector = LoopDetector(
        LoopDetectorConfig(threshold=threshold, window_seconds=2.0, max_tracked=1000)
    )
    reference = Reference(threshold, 2.0)
    now, trips = 0.0, 0
    for i in range(100_000):
        now += rng.choice((0.0, 0.0005, 0.001, 0.002))
        hot = rng.random() < 0.02
        fingerprint = f"sha256:{rng.randrange(50) if hot else i + 1000:064x}"
        trip = detector.observe(fingerprint, now=now)
        expected = reference.observe(fingerprint, now)
        assert (trip and trip.count) == expected, (i, fingerprint, now)
        trips += expected is not None
    assert trips > 50
    assert detector.forgotten == 0
    in_window = sum(1 for t in reference.times.values() if t[-1] > int(now * 1e6) - 2_000_000)
    assert len(detector) <= 1.2 * in_window


def test_detector_window_edge_to_the_microsecond() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=2, window_seconds=2.5))
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert detector.observe(a, now=1000.0) is None
    assert detector.observe(b, now=1001.0) is None
    assert detector.observe(a, now=1002.5) is None  # exactly a window later: outside it
    assert detector.observe(b, now=1003.499999) is not None  # a microsecond inside it
    trip = detector.observe(a, now=1004.999999)
    assert trip is not None and trip.count == 2


def test_detector_finds_a_record_only_at_a_record_boundary() -> None:
    from proxy.guardrails.dumb_loop import _aligned_find

    needle = bytes(range(1, 7))  # a record is 12 bytes and starts with its 6-byte key
    # The needle's bytes also appear straddling the first two records (offset 9).
    bucket = bytearray(b"\xaa" * 9 + needle + b"\xbb" * 9 + needle + b"\0" * 6)
    assert bucket.find(needle) == 9
    assert _aligned_find(bucket, needle, 9) == 24
    assert _aligned_find(bucket[:24], needle, 9) == -1


def test_detector_keeps_counting_across_its_epoch() -> None:
    # Times are kept as 48-bit microseconds from an epoch that moves every 4.4 years of
    # monotonic time (a machine's uptime can be longer).
    detector = LoopDetector(LoopDetectorConfig(window_seconds=60))
    loop = "sha256:" + "b" * 64
    for start in (10.0, 2.0**47 / 1e6 - 30, 2.0**48 / 1e6, 2.0**49 / 1e6 + 0.5):
        seen = [detector.observe(loop, now=start + i * 10) for i in range(4)]
        assert seen[:3] == [None, None, None] and seen[3] is not None, start
        assert detector.observe("sha256:" + "c" * 64, now=start + 100) is None


def test_detector_reconfigured_keeps_its_counts() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=3))
    once, twice = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    for fingerprint in (once, twice, twice):
        assert detector.observe(fingerprint, now=1.0) is None
    detector.configure(LoopDetectorConfig(threshold=3, window_seconds=30))  # same buckets
    assert detector.observe(once, now=2.0) is None
    assert detector.observe(once, now=2.0) is not None  # its first occurrence was kept
    # A max_tracked that changes the number of buckets starts what was seen once afresh,
    # and keeps the repeats.
    detector.observe(once, now=3.0)
    detector.configure(LoopDetectorConfig(threshold=3, max_tracked=1_000_000))
    assert [detector.observe(once, now=4.0) for _ in range(2)] == [None, None]
    assert detector.observe(twice, now=4.0) is not None


def test_detector_memory_is_bounded() -> None:
    # A flood of distinct fingerprints within one window: buckets keep at most 64 records each.
    detector = LoopDetector(LoopDetectorConfig(window_seconds=60, max_tracked=1000))
    for i in range(20_000):
        assert detector.observe(f"sha256:{i:064x}", now=float(i) / 1000) is None
    assert len(detector) <= 64 * 64
    assert detector.forgotten >= 20_000 - 64 * 64
    loop = "sha256:" + "a" * 64  # and a loop in the middle of the flood is still caught
    assert [detector.observe(loop, now=20.0) for _ in range(4)][-1] is not None
    # A flood of fingerprints seen twice: a generation of repeats holds at most max_tracked.
    for i in range(5_000):
        for _ in range(2):
            assert detector.observe(f"sha256:{i + 100_000:064x}", now=21.0) is None
    assert len(detector._repeats) <= 1000
    # Two windows after the traffic stops, one observation lets everything go.
    detector = LoopDetector(LoopDetectorConfig(window_seconds=10))
    for i in range(1000):
        detector.observe(f"sha256:{i:064x}", now=0.0)
    for i in range(10):
        detector.observe(f"sha256:{i:064x}", now=1.0)  # repeats
    assert len(detector) == 1000
    detector.observe("sha256:" + "f" * 64, now=11.0)
    detector.observe("sha256:" + "e" * 64, now=22.0)
    assert len(detector) == 1


# --------------------------------------------------------------------------- the enforce API


async def call(
    d: RunningDaemon,
    method: str,
    body: Any = None,
    key: str | None = KEY,
    query: str = "?org_id=org_local",
) -> tuple[int, Any]:
    headers = {} if key is None else {"AtlasBurn-API-Key": key}
    async with aiohttp.ClientSession() as s:
        async with s.request(
            method,
            d.url + "/api/guardrails/enforce" + query,
            data=None if body is None else (body if isinstance(body, bytes) else json.dumps(body)),
            headers=headers,
        ) as r:
            return r.status, await r.json()


@pytest.fixture
async def api(start_daemon: StartDaemon) -> RunningDaemon:
    return await start_daemon(atlasburn={"api_key": KEY})


async def test_enforce_post_get_delete(
    fake: FakeProvider, api: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    assert await call(api, "GET") == (
        200,
        {
            "ok": True,
            "kv_key": "guardrail:org_local",
            "state": "ok",
            "expires_at": None,
            "layer": None,
            "reason": None,
        },
    )
    status, answer = await call(
        api,
        "POST",
        {
            "org_id": "org_local",
            "action": "suspend",
            "layer": "manual",
            "ttl_seconds": 600,
            "reason": "runaway agent",
        },
    )
    assert status == 200
    assert (answer["ok"], answer["kv_key"], answer["state"]) == (
        True,
        "guardrail:org_local",
        "suspended",
    )
    assert answer["expires_at"].endswith("Z")
    status, state = await call(api, "GET")
    assert (state["state"], state["layer"], state["reason"]) == (
        "suspended",
        "manual",
        "runaway agent",
    )
    async with aiohttp.ClientSession() as s:  # takes effect on the very next request
        async with s.post(api.url + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 429 and 599 <= int(r.headers["Retry-After"]) <= 600
    assert await call(api, "DELETE", {"org_id": "org_local", "reason": "fixed"}) == (
        200,
        {"ok": True, "kv_key": "guardrail:org_local", "state": "ok", "expires_at": None},
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(api.url + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 200
    # Audited: logged, and stored with who (a key digest, never the key) and why.
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit:")]
    assert len(audit) == 2 and "runaway agent" in audit[0] and "fixed" in audit[1]
    assert KEY not in caplog.text
    import sqlite3

    db = sqlite3.connect(api.daemon.config.storage.path)
    rows = db.execute("SELECT who, action, layer, ttl_seconds, reason FROM audit").fetchall()
    db.close()
    assert [r[1:] for r in rows] == [
        ("suspend", "manual", 600.0, "runaway agent"),
        ("resume", None, None, "fixed"),
    ]
    assert rows[0][0].startswith("key:") and KEY not in rows[0][0]


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("abn_test_wrong", 401), ("sk-123", 401), (KEY, 200)]
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_enforce_auth(api: RunningDaemon, key: str | None, status: int, method: str) -> None:
    body = (
        None
        if method == "GET"
        else {"org_id": "org_local", "action": "suspend", "ttl_seconds": 5, "reason": "t"}
    )
    if method == "DELETE":
        body = {"org_id": "org_local"}
    got, answer = await call(api, method, body, key=key)
    assert got == status
    if status == 401:
        assert answer["error"]["code"] == "unauthorized"
        assert api.daemon.kill.status == "ok"


@pytest.mark.parametrize(
    ("method", "body", "status", "message"),
    [
        ("POST", b"not json", 400, None),
        ("POST", [1, 2], 400, "expected a JSON object"),
        ("POST", {"action": "suspend", "ttl_seconds": 5}, 400, "org_id: required"),
        ("POST", {"org_id": "org_other", "action": "suspend", "ttl_seconds": 5}, 403, None),
        (
            "POST",
            {"org_id": "org_local", "action": "pause", "ttl_seconds": 5},
            400,
            "action: expected 'suspend' (DELETE resumes)",
        ),
        ("POST", {"org_id": "org_local", "action": "suspend"}, 400, "ttl_seconds: required"),
        (
            "POST",
            {"org_id": "org_local", "action": "suspend", "ttl_seconds": "5"},
            400,
            "ttl_seconds: expected a number",
        ),
        (
            "POST",
            {"org_id": "org_local", "action": "suspend", "ttl_seconds": -1},
            400,
            "ttl_seconds: expected more than 0 and at most 2592000",
        ),
        (
            "POST",
            {"org_id": "org_local", "action": "suspend", "ttl_seconds": 1e308},
            400,
            "ttl_seconds: expected more than 0 and at most 2592000",
        ),
        (
            "POST",
            {"org_id": "org_local", "action": "suspend", "ttl_seconds": 5, "layer": "a b"},
            400,
            "layer: 1-64 characters of letters, digits and _ . : -",
        ),
        (
            "POST",
            {"org_id": "org_local", "action": "suspend", "ttl_seconds": 5, "x": 1},
            400,
            "unknown field(s): x",
        ),
        ("DELETE", {"org_id": "org_local", "reason": 5}, 400, "reason: expected a string"),
        ("GET", None, 400, "org_id: required"),
        ("PUT", {}, 405, None),
    ],
)
async def test_enforce_bad_requests(
    api: RunningDaemon, method: str, body: Any, status: int, message: str | None
) -> None:
    got, answer = await call(api, method, body, query="" if method == "GET" else "")
    assert got == status
    if message is not None:
        assert answer["error"]["message"] == message
    assert api.daemon.kill.status == "ok"


async def test_ttl_expiry(fake: FakeProvider, api: RunningDaemon) -> None:
    """A 2 s suspension refuses until it expires by itself, then lets requests through: judged by
    when each request was sent (not by sleeping a fixed time), so it holds on a busy machine."""
    asked = time.monotonic()
    await call(api, "POST", {"org_id": "org_local", "action": "suspend", "ttl_seconds": 2})
    latest = time.monotonic() + 2  # set between asking and the answer: it expires by then
    answers = []
    async with aiohttp.ClientSession() as s:
        for n in range(1000):
            sent = time.monotonic()
            async with s.post(api.url + "/v1/embeddings", json={"model": "m", "input": n}) as r:
                answers.append((sent, time.monotonic(), r.status, r.headers.get("Retry-After")))
            if r.status == 200:
                break
            await asyncio.sleep(0.05)
    sent, answered, status, retry_after = answers[0]
    assert status == 429 and math.ceil(2 - (answered - asked)) <= int(retry_after or 0) <= 2
    assert all(status == 429 and sent < latest for sent, _, status, _ in answers[:-1])
    sent, answered, status, retry_after = answers[-1]
    assert (status, retry_after) == (200, None)
    assert answered >= asked + 2  # not before it expired
    assert (await call(api, "GET"))[1]["state"] == "ok"


# --------------------------------------------------------------------------- spend cap


async def test_spend_cap_fires_at_the_right_cent(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Any
) -> None:
    """Each chat costs $0.0001578 (test_cost.py); a $0.0005 hourly cap is crossed by the 4th."""
    config = {
        "guardrails": {"spend_cap": {"enabled": True, "max_usd_per_hour": 0.0005}},
        "storage": {"path": str(tmp_path / "cap" / "spool.sqlite3")},
    }
    first = await start_daemon(**config)
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            async with s.post(
                first.url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": str(i)}]},
            ) as r:
                assert r.status == 200
    await first.daemon.stop()
    # The spend so far ($0.0003156) is restored from the store after a restart.
    second = await start_daemon(**config)
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(2, 5):
            async with s.post(
                second.url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": str(i)}]},
            ) as r:
                statuses.append((r.status, r.headers.get("AtlasBurn-Guardrail")))
    # 3rd: $0.0004734 (under); 4th: $0.0006312 crosses the cap and is the last to pass.
    assert statuses == [(200, None), (200, None), (429, "spend_cap")]
    state = second.daemon.kill.check()
    assert state is not None and state.layer == "spend_cap"
    assert state.reason == "spent $0.000631 in the last hour, over the cap of $0.000500"
    assert state.expires_at is not None and 3500 < state.expires_at - time.time() <= 3600


# --------------------------------------------------------------------------- report upstream


async def test_local_trip_is_reported_to_the_api(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(**shipping(ingest))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                await r.read()
    await eventually(lambda: len(ingest.enforce_calls) == 1)
    [report] = ingest.enforce_calls
    fingerprint = d.events[0].fingerprint
    assert report == {
        "org_id": "org_local",
        "action": "suspend",
        "layer": "dumb_loop_detector",
        "ttl_seconds": 7200,
        "reason": f"fingerprint {fingerprint} seen 4 times in 60s",
    }


async def test_ingested_fingerprints_feed_the_detector(
    fake: FakeProvider, api: RunningDaemon
) -> None:
    # Four distinct events of one fingerprint, at their own times inside the window (the same
    # event posted again, or one outside the window, is not a new occurrence: issue 13 F2).
    events = [
        ingest_event(
            tokens_in=1,
            tokens_out=1,
            cost_usd=0.0,
            latency_ms=1,
            fingerprint="sha256:" + "ab" * 32,
            ts=iso_ms(time.time() - seconds),
        )
        for seconds in (3, 2, 1, 0)
    ]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            api.url + "/api/ingest",
            json={"events": events},
            headers={"AtlasBurn-API-Key": KEY},
        ) as r:
            answer = await r.json()
    assert answer["accepted"] == 4
    assert api.daemon.kill.status == "suspended"
