"""The fleet's Redis scripts against a real Redis: the spend totals against a naive sum, the kill
flag's newest-wins write, and two fleet members in one process (the processes are in
tests/reliability/test_fleet.py)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from proxy.config import FleetConfig, LoopDetectorConfig, Secret, SpendCapConfig
from proxy.guardrails import KillSwitch, LoopGuard, SpendCap
from proxy.guardrails.fleet import _FLAG, _OCCURRENCES, _SPEND, Fleet

from .conftest import eventually

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server missing: run scripts/system-deps"
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), 0.1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            subprocess.run(["sleep", "0.02"], check=True)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def next_message(pubsub: redis.client.PubSub, within: float = 1.0) -> bytes | None:
    """The next published message's data, or None if none comes ``within`` seconds (the
    subscription's confirmation is skipped: get_message answers None for it)."""
    deadline = asyncio.get_running_loop().time() + within
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        message = await pubsub.get_message(timeout=left)
        if message is not None:
            return bytes(message["data"])
    return None


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    await c.flushdb()
    yield c
    await c.aclose()


async def test_spend_totals_are_the_naive_sums(client: redis.Redis) -> None:
    """Spend added over two simulated days, with gaps (one over a day long): after every call,
    the hour and day totals are the sums of the minute buckets inside each window."""
    script = client.register_script(_SPEND)
    rnd = random.Random(7)
    added: dict[int, float] = {}
    now = 1_800_000_000 // 60 * 60
    for step in range(600):
        now += 60 * rnd.choice([0, 0, 1, 1, 2, 5, 30, 61, 300]) + (90000 if step == 400 else 0)
        minute = now - 60 * rnd.choice([0, 0, 0, 1, 3])  # spend from a minute or so ago too
        usd = round(rnd.uniform(0, 2), 6)
        added[minute] = added.get(minute, 0.0) + usd
        hour, day, hour_wait, day_wait = (
            float(v) for v in await script(keys=["spend"], args=[minute, usd, now, 0, 0])
        )
        naive_hour = sum(v for m, v in added.items() if now - 3600 < m <= now)
        naive_day = sum(v for m, v in added.items() if now - 86400 < m <= now)
        assert hour == pytest.approx(naive_hour, abs=1e-6), step
        assert day == pytest.approx(naive_day, abs=1e-6), step
        assert hour_wait == day_wait == 0
    # Minute buckets older than a day are gone.
    fields = [f.decode() for f in await client.hkeys("spend")]
    minutes = [int(f[2:]) for f in fields if f.startswith("m:")]
    assert min(minutes) > now - 86400


async def test_spend_over_a_cap_says_when_it_is_under_again(client: redis.Redis) -> None:
    script = client.register_script(_SPEND)
    now = 1_800_000_000 // 60 * 60
    for ago, usd in ((50, 3.0), (20, 4.0), (0, 5.0)):
        result = await script(keys=["spend"], args=[now - ago * 60, usd, now, 10, 0])
    hour, _, wait, _ = (float(v) for v in result)
    assert hour == 12.0
    # 12 > 10: once the 3.00 of 50 minutes ago leaves the hour (in 10 minutes), 9 <= 10.
    assert wait == 600


async def test_the_flag_keeps_the_newest_version(client: redis.Redis) -> None:
    script = client.register_script(_FLAG)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("ch")
    new = orjson.dumps({"state": "suspended", "version": 200})
    old = orjson.dumps({"state": "ok", "version": 100})
    assert await script(keys=["flag"], args=[new, 200, 5000, "ch"]) is None
    assert await script(keys=["flag"], args=[old, 100, 0, "ch"]) == new  # the newer one stays
    assert await client.get("flag") == new
    assert 4000 < await client.pttl("flag") <= 5000
    assert await next_message(pubsub) == new
    assert await next_message(pubsub, 0.2) is None  # the older one was not published
    await pubsub.aclose()


async def test_occurrences_are_published_only_near_the_threshold(
    client: redis.Redis,
) -> None:
    script = client.register_script(_OCCURRENCES)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("ch")
    head = [60000, 4, "ch", "d"]
    # One call for a batch: two occurrences of "x" and one of "y", then one more "x".
    first = await script(
        keys=["fp", "fp", "other"],
        args=[*head, 1000, "m0", "sha256:x", 1001, "m1", "sha256:x", 1001, "m2", "sha256:y"],
    )
    assert first == [1, 2, 1]
    assert await script(keys=["fp"], args=[*head, 1002, "m3", "sha256:x"]) == [3]
    # Two short of the threshold ("warm": the relay then asks Redis), and one short.
    for times in ([1000, 1001], [1000, 1001, 1002]):
        message = await next_message(pubsub)
        assert message is not None
        assert orjson.loads(message) == {"t": "hot", "fp": "sha256:x", "times": times, "by": "d"}
    assert await next_message(pubsub, 0.2) is None  # nothing at the first
    # Out of the window: the count starts again.
    assert await script(keys=["fp"], args=[*head, 70000, "m9", "sha256:x"]) == [1]
    assert 0 < await client.pttl("fp") <= 60000
    await pubsub.aclose()


def member(url: str, prefix: str) -> tuple[Fleet, KillSwitch, LoopGuard]:
    kill = KillSwitch("org_test", None)
    loop = LoopGuard(LoopDetectorConfig(), kill)
    spend = SpendCap(SpendCapConfig())
    fleet = Fleet(FleetConfig(Secret(url), prefix), "org_test", kill, loop, spend)
    return fleet, kill, loop


async def test_two_members_share_the_flag_and_the_count(redis_url: str) -> None:
    prefix = f"t{random.getrandbits(32):x}:"
    (a, kill_a, loop_a), (b, kill_b, loop_b) = member(redis_url, prefix), member(redis_url, prefix)
    a.start()
    b.start()
    try:
        await eventually(lambda: a.connected and b.connected, within=10)
        kill_a.suspend_now("ops", "by hand", 60, "api")
        await eventually(lambda: kill_b.check() is not None, within=2)
        assert kill_b.check().reason == "by hand"  # type: ignore[union-attr]
        await kill_b.clear("back", "api")
        await eventually(lambda: kill_a.check() is None, within=2)
        # Three answered occurrences, on either member: the fourth request trips on the other.
        headers: dict[str, str] = {}
        for loop in (loop_a, loop_b, loop_a):
            assert loop.check("sha256:" + "e" * 64, headers) is None
            loop.record("sha256:" + "e" * 64)
        await eventually(lambda: b.count("sha256:" + "e" * 64) == 3, within=2)
        refused = loop_b.check("sha256:" + "e" * 64, headers)
        assert refused is not None and "seen 4 times in 60s across the fleet" in refused.reason
        await eventually(lambda: kill_a.check() is not None, within=2)
        # A trip starts the count afresh on every member, as on one daemon.
        await kill_a.clear("back", "api")
        await eventually(lambda: kill_b.check() is None and a.count("sha256:" + "e" * 64) == 0)
        for loop in (loop_a, loop_b, loop_a):
            assert loop.check("sha256:" + "e" * 64, headers) is None
            loop.record("sha256:" + "e" * 64)
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_spend_comes_back_when_redis_comes_back_empty(
    redis_url: str, client: redis.Redis
) -> None:
    """A fresh user's trial: a Redis restarted empty forgot the fleet's spend, and the fleet
    could spend its cap again. Each member adds its own spend of the last day again, once."""
    prefix = f"t{random.getrandbits(32):x}:"
    members = []
    for _ in range(2):
        kill = KillSwitch("org_test", None)
        loop = LoopGuard(LoopDetectorConfig(), kill)
        spend = SpendCap(SpendCapConfig(enabled=True, max_usd_per_hour=100.0))
        members.append(
            (Fleet(FleetConfig(Secret(redis_url), prefix), "org_test", kill, loop, spend), spend)
        )
    for fleet, _ in members:
        fleet.start()
    key = f"{prefix}spend:org_test"

    async def hour() -> float:
        value = await client.hget(key, "hour")
        return float(value) if value is not None else 0.0

    try:
        await eventually(lambda: all(fleet.connected for fleet, _ in members), within=10)
        for _, spend in members:
            spend.add(1.25)
        await eventually_async(lambda: hour(), 2.5)
        reconnects = [fleet.reconnects for fleet, _ in members]
        await client.flushdb()  # Redis "restarted empty": the connections drop, the data is gone
        await client.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        await back_again(members, reconnects)
        await eventually_async(lambda: hour(), 2.5)
        # Reconnecting to the same hash adds nothing again.
        reconnects = [fleet.reconnects for fleet, _ in members]
        await client.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        await back_again(members, reconnects)
        assert await hour() == 2.5
    finally:
        await asyncio.gather(*(fleet.stop() for fleet, _ in members))


async def back_again(members: list[tuple[Fleet, SpendCap]], reconnects: list[int]) -> None:
    pairs = list(zip(members, reconnects, strict=True))
    await eventually(
        lambda: all(f.reconnects > r and f.connected for (f, _), r in pairs), within=15
    )


async def eventually_async(read: Any, expected: float, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (value := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, value
        await asyncio.sleep(0.02)


async def test_agent_loop_with_scope_org_suspends_the_whole_fleet(
    redis_url: str, fake: Any, start_daemon: Any
) -> None:
    """Two daemons of one fleet: an agent loop caught on one suspends the org on both."""
    import aiohttp

    from proxy.app import RELAY

    from .conversations import READ_CONFIG, chat, one_call_turns

    config = {
        "fleet": {"redis_url": redis_url, "key_prefix": f"t{random.getrandbits(32):x}:"},
        "guardrails": {"agent_loop_detector": {"scope": "org"}},
    }
    a, b = await start_daemon(**config), await start_daemon(**config)
    fleets = [d.daemon.app[RELAY].loop.fleet for d in (a, b)]
    await eventually(lambda: all(f is not None and f.connected for f in fleets), within=10)
    turns = one_call_turns([READ_CONFIG] * 4)
    async with aiohttp.ClientSession() as s:

        async def post(d: Any, body: dict[str, Any]) -> aiohttp.ClientResponse:
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r

        # The agent's requests alternate between the two daemons (a load balancer).
        for k in range(1, 4):
            assert (await post((a, b)[k % 2], chat(turns[:k]))).status == 200
        refused = await post(a, chat(turns))
        assert refused.status == 429
        assert refused.headers["AtlasBurn-Guardrail"] == "agent_loop_detector"
        await eventually(lambda: b.daemon.kill.check() is not None, within=2)
        other = await post(b, chat([]))
        assert other.status == 429
        assert other.headers["AtlasBurn-Guardrail"] == "agent_loop_detector"
    assert len(fake.requests) == 3
