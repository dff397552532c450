"""Case 13: hostile input to the local API. Generated bodies for /api/ingest and
/api/guardrails/enforce (wrong types, huge numbers, deep nesting, invalid UTF-8, NaN) get 2xx or
4xx, never a 500, and the daemon is healthy afterwards."""

from __future__ import annotations

import json
from collections import Counter

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..fakes.ingest import FakeIngest
from .conftest import Figures, Proxy, StartProxy

SEEN: Counter[int] = Counter()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)

ENFORCE_FIELDS = {
    "org_id": st.one_of(st.just("org_local"), json_values),
    "action": st.one_of(st.sampled_from(["suspend", "resume", "", "SUSPEND"]), json_values),
    "layer": st.one_of(st.just("operator"), json_values),
    "ttl_seconds": st.one_of(st.sampled_from([1, 0, -1, 1e308, 10**400]), st.floats(), json_values),
    "reason": st.one_of(st.text(max_size=50), json_values),
}

NASTY = [
    b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    b'{"events": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
    b'{"org_id": "org_local", "ttl_seconds": NaN}',
    b'{"org_id": "org_local", "ttl_seconds": Infinity, "action": "suspend"}',
    b'{"org_id": "\xff\xfe\xfd", "action": "suspend"}',  # invalid UTF-8
    b'{"events": [{"tokens_in": 1' + b"0" * 5000 + b"}]}",  # a 5,000-digit number
    b"\x00\x01\x02",
    b"",
    b"null",
    b'"just a string"',
]


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> Proxy:
    return await start_proxy(ship=False, server={"max_body_bytes": 2_000_000})


async def post(p: Proxy, key: str, path: str, raw: bytes, method: str = "POST") -> int:
    headers = {"AtlasBurn-API-Key": key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, p.url + path, data=raw, headers=headers) as r:
            await r.read()
            SEEN[r.status] += 1
            return r.status


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({}, optional=ENFORCE_FIELDS).map(lambda d: json.dumps(d).encode()),
        st.builds(
            lambda evs: json.dumps({"events": evs}).encode(), st.lists(json_values, max_size=5)
        ),
        st.binary(max_size=300),
    ),
    st.sampled_from(["/api/ingest", "/api/guardrails/enforce"]),
    st.sampled_from(["POST", "DELETE", "GET"]),
)
async def test_generated_bodies_never_500(
    proxy: Proxy, ingest: FakeIngest, raw: bytes, path: str, method: str
) -> None:
    status = await post(proxy, ingest.api_key, path, raw, method)
    assert 200 <= status < 500, (path, method, raw[:200])


async def test_nasty_bodies_never_500_and_the_daemon_stays_healthy(
    proxy: Proxy, ingest: FakeIngest, figures: Figures
) -> None:
    for raw in NASTY:
        for path in ("/api/ingest", "/api/guardrails/enforce"):
            for method in ("POST", "DELETE"):
                status = await post(proxy, ingest.api_key, path, raw, method)
                assert 200 <= status < 500, (path, method, raw[:80])
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        async with s.post(
            proxy.url + "/v1/embeddings", json={"model": "m", "input": "still relaying"}
        ) as r:
            assert r.status in (200, 429)  # 429 if a generated body suspended the org
    figures("answers to hostile bodies (status: count)", dict(sorted(SEEN.items())))
