"""Shipping to the AtlasBurn API: batches, identity across retries, backoff, Retry-After,
refused keys, poison events, server-side suspension, and the last attempt at shutdown."""

from __future__ import annotations

import logging
import time

import aiohttp
import pytest

from proxy.events import FIELDS

from .conftest import RunningDaemon, StartDaemon, cpu_wait, eventually, shipping
from .fakes.ingest import FakeIngest, ingest_event
from .fakes.provider import FakeProvider


async def send(daemon: RunningDaemon, n: int, start: int = 0) -> list[int]:
    """``n`` distinct requests (a nonce in each, so distinct fingerprints); their statuses."""
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(start, start + n):
            async with s.post(
                daemon.url + "/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": f"nonce {i}"},
            ) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


def fingerprints(daemon: RunningDaemon) -> set[str]:
    return {e.fingerprint for e in daemon.events}


async def test_events_are_shipped_in_batches(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(**shipping(ingest, batch_max_events=10))
    assert await send(d, 25) == [200] * 25
    await eventually(lambda: len(ingest.delivered()) == 25)
    assert ingest.delivered_fingerprints() == fingerprints(d)
    assert all(len(c.events) <= 10 for c in ingest.calls)
    assert all(c.key == ingest.api_key and c.idempotency_key for c in ingest.calls)
    assert len({c.idempotency_key for c in ingest.calls}) == len(ingest.calls)
    event = ingest.delivered()[0]
    assert tuple(event) == FIELDS  # exactly the schema, nothing local
    assert (event["provider"], event["model"], event["endpoint"], event["tokens_in"]) == (
        "openai",
        "text-embedding-3-small",
        "/embeddings",
        5,
    )
    assert event["cost_usd"] == 1e-07
    await eventually(lambda: d.daemon.store.pending_events == 0)


async def test_outage_then_recovery_delivers_everything(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    ingest.down = True
    d = await start_daemon(**shipping(ingest, batch_max_events=8))
    assert await send(d, 30) == [200] * 30  # traffic is unaffected
    await eventually(lambda: len(ingest.calls) >= 4)
    assert ingest.delivered() == []
    # A batch keeps its identity across retries.
    first_key = ingest.calls[0].idempotency_key
    assert ingest.calls[1].idempotency_key == first_key
    ingest.down = False
    await eventually(lambda: ingest.delivered_fingerprints() == fingerprints(d))
    delivered = ingest.delivered()
    assert len(delivered) == 30  # at least once, and here exactly once: nothing was accepted
    assert [c.idempotency_key for c in ingest.calls if c.status == 200][0] == first_key


async def test_retry_after_is_honored(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    ingest.plan = [("retry-after", 429, 2), ("retry-after", 503, 2)]
    d = await start_daemon(**shipping(ingest))
    waited = [(time.monotonic(), cpu_wait())]  # (when, this process's wait for a CPU so far)

    def delivered() -> bool:
        waited.append((time.monotonic(), cpu_wait()))
        return len(ingest.delivered()) == 1

    await send(d, 1)
    await eventually(delivered, within=20, every=0.05)
    assert [c.status for c in ingest.calls] == [429, 503, 200]
    for a, b in zip(ingest.calls, ingest.calls[1:], strict=False):
        # Within 10%, leaving out the time this process waited for a CPU meanwhile.
        before = max(w for t, w in waited if t <= a.at)
        after = min(w for t, w in waited if t >= b.at)
        assert 2.0 <= b.at - a.at < 2.2 + (after - before), (b.at - a.at, after - before)


async def test_refused_key_is_loud_and_slow(
    fake: FakeProvider,
    ingest: FakeIngest,
    start_daemon: StartDaemon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = shipping(ingest)
    config["atlasburn"]["api_key"] = "abn_test_wrong_key"
    with caplog.at_level(logging.ERROR, logger="proxy.shipper"):
        d = await start_daemon(**config)
        await send(d, 3)
        await eventually(lambda: len(ingest.calls) == 1)
        await eventually(lambda: d.daemon.store.pending_events == 3)
        import asyncio

        await asyncio.sleep(1.0)  # well past many flush intervals
    assert len(ingest.calls) == 1  # at most one attempt a minute
    assert any("refused the key (HTTP 401)" in r.getMessage() for r in caplog.records)
    assert "abn_test_wrong_key" not in caplog.text


async def test_poison_event_is_isolated_and_the_rest_flow(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    ingest.down = True  # everything spooled before the first answer that counts
    d = await start_daemon(**shipping(ingest, batch_max_events=8, flush_interval_ms=100))
    await send(d, 8)
    store = d.daemon.store
    await eventually(lambda: store.pending_events == 8)
    poisoned = sorted(fingerprints(d))[3]
    ingest.poison = {poisoned}
    ingest.calls.clear()
    ingest.down = False
    await eventually(lambda: len(ingest.delivered()) == 7)
    assert ingest.delivered_fingerprints() == fingerprints(d) - {poisoned}
    await eventually(lambda: (store.poisoned_total, store.pending_events) == (1, 0))
    # A batch of up to 64 is split into single events: the bad one is refused at most twice (in
    # its batch, then alone).
    refused = [c for c in ingest.calls if any(e["fingerprint"] == poisoned for e in c.events)]
    assert 1 <= len(refused) <= 2 and all(c.status == 422 for c in refused)
    assert len(refused[-1].events) == 1


async def test_poison_in_a_large_batch_is_alone_after_three_refusals(
    ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(**shipping(ingest, batch_max_events=400, flush_interval_ms=100))
    events = [
        ingest_event(i, tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=1) for i in range(400)
    ]
    poisoned = events[123]["fingerprint"]
    ingest.poison = {poisoned}
    async with aiohttp.ClientSession() as s:  # one call: one commit, one batch of 400
        async with s.post(
            d.url + "/api/ingest",
            json={"events": events},
            headers={"AtlasBurn-API-Key": ingest.api_key},
        ) as r:
            assert r.status == 200, await r.text()
    store = d.daemon.store
    await eventually(lambda: (store.poisoned_total, store.pending_events) == (1, 0), within=20)
    assert ingest.delivered_fingerprints() == {e["fingerprint"] for e in events} - {poisoned}
    refused = [c for c in ingest.calls if any(e["fingerprint"] == poisoned for e in c.events)]
    # the batch of 400, then its part of 20 (400 = 20 parts of 20), then the event alone
    assert [(len(c.events), c.status) for c in refused] == [(400, 422), (20, 422), (1, 422)]
    assert len(ingest.calls) == 1 + 20 + 20


async def test_server_suspension_blocks_traffic_and_polling_learns_the_resume(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    ingest.guardrail_status = "suspended"
    d = await start_daemon(**shipping(ingest))
    assert await send(d, 1) == [200]
    await eventually(lambda: d.daemon.kill.status == "suspended")
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 429
            assert r.headers["AtlasBurn-Guardrail"] == "atlasburn_api"
            assert r.headers["x-should-retry"] == "false"
            assert r.headers["Retry-After"] == "1"  # the poll interval, rounded up
    assert len(fake.requests) == 1  # the refused request never reached the provider
    # With nothing left to ship, the shipper asks with empty batches...
    await eventually(lambda: any(c.events == [] for c in ingest.calls))
    ingest.guardrail_status = "ok"
    # ... and so learns the resume.
    await eventually(lambda: d.daemon.kill.status == "ok")
    assert await send(d, 1, start=1) == [200]
    refused = [e for e in ingest.delivered() if e["status"] == 429]
    assert len(refused) == 1 and refused[0]["tokens_in"] == 0


async def test_shutdown_ships_what_is_spooled(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(**shipping(ingest, flush_interval_ms=3_600_000))
    await send(d, 5)
    assert ingest.calls == []
    await d.daemon.stop()
    assert ingest.delivered_fingerprints() == fingerprints(d)


async def test_unshipped_events_survive_a_restart(
    fake: FakeProvider, ingest: FakeIngest, start_daemon: StartDaemon, tmp_path: object
) -> None:
    ingest.down = True
    config = shipping(ingest, shutdown_flush_seconds=0.3)
    config["storage"]["path"] = str(tmp_path) + "/kept/spool.sqlite3"  # type: ignore[operator]
    first = await start_daemon(**config)
    await send(first, 6)
    await first.daemon.stop()
    assert ingest.delivered() == []
    ingest.down = False
    second = await start_daemon(**config)
    await eventually(lambda: ingest.delivered_fingerprints() == fingerprints(first))
    # The ingest has the batch before the daemon has read its answer and marked it delivered.
    await eventually(lambda: second.daemon.store.pending_events == 0)
