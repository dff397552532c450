"""The store on real SQLite files: durability, group commit, bounds, disk full, retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.adapters.base import UsageSource
from proxy.config import StorageConfig
from proxy.events import Event
from proxy.store import (
    FROM_INGEST,
    LOCAL,
    PENDING,
    REFUSED,
    SCHEMA,
    SHIPPED,
    UNPRICED,
    Store,
)

from .conftest import eventually, fill


def event(i: int, model: str = "gpt-4o-mini") -> Event:
    return Event(
        ts="2026-11-29T01:55:24.123Z",
        provider="openai",
        model=model,
        endpoint="/chat/completions",
        status=200,
        tokens_in=10 + i,
        tokens_out=2,
        cost_usd=0.000001 * i,
        latency_ms=5,
        fingerprint="sha256:" + f"{i:064x}",
        stream=False,
        usage_source=UsageSource.REPORTED,
        priced=True,
    )


def config(path: Path, **kw: object) -> StorageConfig:
    return StorageConfig(path=path, **{"commit_interval_ms": 20, **kw})  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(config(tmp_path / "s.sqlite3"), ship=True)
    s.start()
    yield s
    await s.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_group_commit_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=True)
    s.start()
    for i in range(1000):
        s.enqueue(event(i))
    await eventually(lambda: s.committed_total == 1000, within=5)
    assert s.pending_events == 1000 and s.queued == 0
    await s.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]

    again = await Store.open(config(path), ship=True)
    assert again.pending_events == 1000
    batch = await again.next_batch(300)
    assert batch is not None and len(batch.event_ids) == 300
    # The open batch keeps its identity until it is delivered.
    same = await again.next_batch(300)
    assert same is not None and same.id == batch.id and same.event_ids == batch.event_ids
    await again.delivered(batch)
    nxt = await again.next_batch(300)
    assert nxt is not None and nxt.id != batch.id and nxt.event_ids[0] == batch.event_ids[-1] + 1
    assert again.pending_events == 700
    await again.close()
    assert rows(path, "SELECT state, COUNT(*) FROM events GROUP BY state") == [
        (PENDING, 700),
        (SHIPPED, 300),
    ]


async def test_steady_events_are_committed_in_groups(tmp_path: Path) -> None:
    """Steady traffic that outpaces one commit (an event arriving while the last ones are
    written, as at concurrency 1 under load) is one commit per interval, not commits back to
    back for whatever arrived during the previous one."""
    s = await Store.open(config(tmp_path / "s.sqlite3", commit_interval_ms=100), ship=True)
    s.start()
    try:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 1.0:
            s.enqueue(event(n))
            n += 1
            time.sleep(0.0003)  # noqa: ASYNC251 (the request's own work, on the event loop)
            await asyncio.sleep(0)  # the writer's steps run between requests
        elapsed = time.monotonic() - started
        await eventually(lambda: s.committed_total == n, within=10)
        # About one commit per 100 ms of it; the writer used to commit back to back as long
        # as anything had arrived meanwhile (hundreds of commits here).
        assert s.commits_total <= elapsed / 0.1 + 5, (s.commits_total, n, elapsed)
    finally:
        await s.close()


async def test_local_only_events_are_kept_not_pending(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=False)
    s.start()
    s.enqueue(event(1))
    await s.close()
    assert rows(
        path,
        "SELECT state, json_extract(CAST(body AS TEXT), '$.model'), "
        "json_extract(CAST(body AS TEXT), '$.tokens_in') FROM events",
    ) == [(LOCAL, "gpt-4o-mini", 11)]
    assert s.pending_events == 0


async def test_payload_is_the_ingest_body(store: Store) -> None:
    store.enqueue(event(7))
    await store.flush()
    batch = await store.next_batch(10)
    assert batch is not None
    import json

    [sent] = json.loads(batch.payload())["events"]
    assert sent == event(7).to_ingest()


async def test_spool_bound_drops_what_cost_nothing_before_what_was_paid_for(
    tmp_path: Path,
) -> None:
    """A fresh attack review: 12,000 requests answered 401 (no key needed) pushed a paid,
    unshipped event out of a 5 MB spool. Past the bound, events on which nothing was spent go
    first; the paid ones stay while any such is left."""
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path, max_spool_mb=1.0), ship=False)
    paid = [event(i) for i in range(1, 21)]
    for e in paid:
        s.enqueue(e)
    await s.flush()
    per_event = s.spool_bytes // 20
    flood = (2 * 1024 * 1024) // per_event  # twice the bound, of 401s
    for i in range(flood):
        refused = event(100_000 + i)
        refused.status, refused.tokens_in, refused.tokens_out, refused.cost_usd = 401, 0, 0, 0.0
        s.enqueue(refused)
        if i % 1000 == 999:
            await s.flush()
    await s.flush()
    assert s.spool_bytes <= 1024 * 1024
    kept = rows(
        path,
        "SELECT COUNT(*) FROM events WHERE json_extract(CAST(body AS TEXT), '$.status') = 200",
    )
    assert kept == [(20,)]  # every paid event is still there
    assert s.dropped_total > 0  # the 401s that went are counted
    await s.close()


async def test_spool_bound_drops_oldest_shipped_first_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path, max_spool_mb=1.0), ship=True)
    for i in range(1000):
        s.enqueue(event(i))
    await s.flush()
    batch = await s.next_batch(1000)
    assert batch is not None
    await s.delivered(batch)  # all shipped: the bound deletes these first, without loss
    per_event = s.spool_bytes // 1000
    n = (1024 * 1024) // per_event + 500  # enough unshipped events to pass the bound alone
    for i in range(1000, 1000 + n):
        s.enqueue(event(i))
    await s.flush()
    assert s.spool_bytes <= 1024 * 1024
    kept = rows(path, "SELECT state, COUNT(*), MIN(id) FROM events GROUP BY state")
    assert [k[0] for k in kept] == [PENDING]  # every shipped event went first
    assert s.dropped_total == n - kept[0][1]  # and each unshipped one lost is counted
    assert s.dropped_total > 0
    assert kept[0][2] == 1001 + s.dropped_total  # the oldest went
    await s.close()
    again = await Store.open(config(path), ship=True)
    assert again.dropped_total == s.dropped_total  # the count survives a restart
    await again.close()


async def test_memory_bound_while_the_disk_fails_counts_drops(tmp_path: Path) -> None:
    s = await Store.open(config(tmp_path / "s.sqlite3", max_pending_events=100), ship=True)
    for i in range(150):
        s.enqueue(event(i))
    assert s.queued == 100 and s.dropped_total == 50
    await s.close()


async def test_retention_expires_shipped_and_local(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path, retention_hours=0.0), ship=True)
    s.enqueue(event(1))
    s.enqueue(event(2))
    await s.flush()
    batch = await s.next_batch(1)
    assert batch is not None
    await s.delivered(batch)
    await asyncio.sleep(0.01)
    assert await s.expire() == 1  # the shipped one; the pending one is never expired
    await s.close()
    assert rows(path, "SELECT state FROM events") == [(PENDING,)]


async def test_disk_full_keeps_events_in_memory_and_recovers(small_fs: Path) -> None:
    path = small_fs / "s.sqlite3"
    s = await Store.open(config(path), ship=True)
    s.start()
    filler = fill(small_fs)  # the next commits fail with SQLITE_FULL
    for i in range(500):
        s.enqueue(event(i))
    await eventually(lambda: s.write_errors_total > 0)
    assert s.queued == 500 and s.dropped_total == 0  # held, not lost
    os.unlink(filler)  # space returns
    await eventually(lambda: s.committed_total == 500, within=15)
    assert s.queued == 0 and s.pending_events == 500
    await s.close()
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert rows(path, "SELECT COUNT(*) FROM events") == [(500,)]


async def test_guardrail_state_persists(tmp_path: Path) -> None:
    from proxy.guardrails import KillSwitch

    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=False)
    kill = KillSwitch("org_local", s)
    await kill.suspend(
        "dumb_loop_detector", "fingerprint sha256:x seen 4 times in 60s", 3600, "local"
    )
    await s.close()
    s2 = await Store.open(config(path), ship=False)
    kill2 = KillSwitch("org_local", s2)
    await kill2.load()
    current = kill2.check()
    assert current is not None and current.layer == "dumb_loop_detector"
    assert current.expires_at is not None and 3590 < current.expires_at - time.time() <= 3600
    await kill2.clear("operator", "api")
    await s2.close()
    s3 = await Store.open(config(path), ship=False)
    kill3 = KillSwitch("org_local", s3)
    await kill3.load()
    assert kill3.check() is None
    await s3.close()


async def test_expired_suspension_is_not_restored(tmp_path: Path) -> None:
    from proxy.guardrails import KillSwitch

    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=False)
    await KillSwitch("org_local", s).suspend("spend_cap", "over", 0.05, "local")
    await s.close()
    await asyncio.sleep(0.1)
    s2 = await Store.open(config(path), ship=False)
    kill = KillSwitch("org_local", s2)
    await kill.load()
    assert kill.check() is None and kill.status == "ok"
    await s2.close()


# The schema of 0.1.0 spools (one column per field, the batch id on each row), verbatim.
SCHEMA_V1 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, state INTEGER NOT NULL,
    batch_id TEXT, size INTEGER NOT NULL, body BLOB NOT NULL, ts TEXT NOT NULL,
    provider TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost_usd REAL NOT NULL,
    fingerprint TEXT NOT NULL, stream INTEGER NOT NULL, usage_source TEXT NOT NULL,
    priced INTEGER NOT NULL, refused_by TEXT, origin TEXT NOT NULL
);
CREATE INDEX events_state ON events (state, id);
CREATE INDEX events_batch ON events (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX events_created ON events (created);
CREATE TABLE guardrails (
    org_id TEXT PRIMARY KEY, state TEXT NOT NULL, expires_at REAL, layer TEXT, reason TEXT,
    source TEXT, updated_at REAL NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, who TEXT NOT NULL,
    action TEXT NOT NULL, org_id TEXT NOT NULL, layer TEXT, ttl_seconds REAL, reason TEXT
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


async def test_a_schema_1_spool_is_upgraded_without_losing_anything(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    now = time.time()
    insert = (
        "INSERT INTO events (id, created, state, batch_id, size, body, ts, provider, model, "
        "endpoint, status, tokens_in, tokens_out, cost_usd, fingerprint, stream, usage_source, "
        "priced, refused_by, origin) VALUES (?, ?, ?, ?, 0, ?, '', 'openai', 'm', '/x', 200, "
        "1, 1, ?, 'f', 0, ?, ?, ?, ?)"
    )
    old = [  # id, state, batch, cost, usage_source, priced, refused_by, origin
        (7, SHIPPED, None, 0.5, "reported", 1, None, "proxy"),
        (8, PENDING, "b-under-way", 0.25, "reported", 1, None, "proxy"),
        (9, PENDING, "b-under-way", 0.0, "reported", 0, None, "proxy"),
        (10, PENDING, None, 0.0, "reported", 1, "local", "proxy"),
        (11, PENDING, None, 2.0, "reported", 1, None, "ingest"),
    ]
    for i, state, batch, cost, source, priced, refused, origin in old:
        db.execute(
            insert,
            (i, now, state, batch, b'{"n":%d}' % i, cost, source, priced, refused, origin),
        )
    db.execute("INSERT INTO counters VALUES ('dropped_total', 3)")
    db.execute("INSERT INTO guardrails VALUES ('org', 'suspended', NULL, 'l', 'r', 's', 0)")
    db.commit()
    db.close()

    s = await Store.open(config(path), ship=True)
    try:
        assert (s.pending_events, s.dropped_total) == (4, 3)
        batch = await s.next_batch(100)  # the batch under way keeps its identity and events
        assert batch is not None
        assert (batch.id, batch.event_ids, batch.bodies) == (
            "b-under-way",
            (8, 9),
            (b'{"n":8}', b'{"n":9}'),
        )
        # the relayed spend (not the ingested) is kept for the spend cap's restore
        assert [usd for _, usd in await s.spend_buckets(3600)] == [0.75]
        assert [g.org_id for g in await s.load_guardrails()] == ["org"]
        await s.delivered(batch)
        batch = await s.next_batch(100)
        assert batch is not None and batch.event_ids == (10, 11)
        s.start()
        s.enqueue(event(1))
        await s.flush()
    finally:
        await s.close()
    assert rows(path, "SELECT id, state, flags FROM events ORDER BY id") == [
        (7, SHIPPED, 0),
        (8, SHIPPED, 0),
        (9, SHIPPED, UNPRICED),
        (10, PENDING, REFUSED),
        (11, PENDING, FROM_INGEST),
        (12, PENDING, 0),  # ids go on from where the old table was
    ]
    assert rows(path, "SELECT id FROM events WHERE refused_by = 'local'") == [(10,)]
    assert rows(path, "PRAGMA user_version") == [(4,)]
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("version", [2, 3])
async def test_an_older_spool_gains_the_refusing_layer(tmp_path: Path, version: int) -> None:
    """Refusals are counted by layer (the status page): the layer is kept in its own column
    (schema 4), never in the stored body (which is shipped as it is); older refusals have none.
    A schema 2 spool also gains budget_spend (schema 3)."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        SCHEMA.replace(",\n    refused_by TEXT", "\n    -- ")
        + ("DROP TABLE budget_spend;" if version == 2 else "")
        + f"PRAGMA user_version = {version};"
    )
    assert "refused_by" not in [r[1] for r in db.execute("PRAGMA table_info(events)")]
    db.execute(
        "INSERT INTO events (created, state, size, flags, body) VALUES (1, 0, 42, 1, ?)", (b"{}",)
    )
    db.commit()
    db.close()
    s = await Store.open(config(path), ship=True)
    try:
        s.start()
        s.enqueue(replace(event(1), status=429, refused_by="manual"))
        s.enqueue(event(2))
        await s.flush()
        batch = await s.next_batch(10)
        assert batch is not None and b"manual" not in batch.payload()
    finally:
        await s.close()
    assert rows(path, "SELECT id, flags & 1, refused_by FROM events ORDER BY id") == [
        (1, REFUSED, None),
        (2, REFUSED, "manual"),
        (3, 0, None),
    ]
    assert rows(path, "SELECT COUNT(*) FROM budget_spend") == [(0,)]
    assert rows(path, "PRAGMA user_version") == [(4,)]


async def test_a_cancelled_shipping_step_leaves_no_transaction_open(store: Store) -> None:
    """The shipper is cancelled at shutdown, maybe in the middle of marking a batch delivered:
    that transaction still ends, so the last shipping attempt after it can begin its own."""
    for i in range(10):
        store.enqueue(event(i))
    await store.flush()
    batch = await store.next_batch(5)
    assert batch is not None
    task = asyncio.ensure_future(store.delivered(batch))
    await asyncio.sleep(0)  # under way: its BEGIN is queued on the connection
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    following = await store.next_batch(5)
    assert following is not None and following.event_ids != batch.event_ids
    await store.delivered(following)  # "cannot start a transaction within a transaction" before
    assert await store.next_batch(5) is None


def fingerprints(path: Path) -> list[str]:
    return [
        str(fp)
        for (fp,) in rows(
            path, "SELECT json_extract(CAST(body AS TEXT), '$.fingerprint') FROM events ORDER BY id"
        )
    ]


async def test_an_event_that_cannot_be_encoded_is_dropped_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack review H2: an event the store cannot encode (an integer past 64 bits) stayed at
    the head of the queue and killed the writer; every later event was lost silently."""
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=True)
    s.start()
    poison = event(2)
    poison.latency_ms = 2**70
    for e in (event(1), poison, event(3)):
        s.enqueue(e)
    await eventually(lambda: s.committed_total == 2)
    for i in range(4, 14):
        s.enqueue(event(i))
    await eventually(lambda: s.committed_total == 12)
    assert (s.queued, s.dropped_total, s.write_errors_total) == (0, 1, 0)
    assert s._writer is not None and not s._writer.done()
    assert (
        "store: dropped 1 event(s): cannot encode it (latency_ms: cannot be encoded as JSON:"
        " Integer exceeds 64-bit range): openai 'gpt-4o-mini' /chat/completions status 200"
        " at 2026-11-29T01:55:24.123Z (1 dropped in all)"
    ) in caplog.messages
    # A chunk of nothing but such events: dropped, and the count is saved all the same.
    s.enqueue(poison)
    await eventually(lambda: s.dropped_total == 2)
    await s.close()  # returns: the file is closed
    assert fingerprints(path) == ["sha256:" + f"{i:064x}" for i in (1, *range(3, 14))]
    again = await Store.open(config(path), ship=True)
    assert again.dropped_total == 2  # the count survives a restart
    await again.close()


async def test_close_closes_the_file_when_its_last_commit_raises(tmp_path: Path) -> None:
    """Shutdown: whatever the last commit raises, the connection is closed (aiosqlite's
    thread would keep the process alive), and the error still reaches the caller."""
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path), ship=True)
    s.enqueue(event(1))
    db = s._db
    spend = sqlite3.connect(path)
    spend.execute("DROP TABLE spend")  # the commit's spend update now fails ...
    spend.execute("CREATE VIEW spend AS SELECT 1 AS minute, 2 AS usd")  # ... not as a write error
    spend.commit()
    spend.close()
    s.enqueue(event(5))
    await s.close()
    assert not db._running and db._connection is None


async def test_the_writer_survives_a_round_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A round of the writer that raises something unexpected (here the spool bound's delete,
    refused by a trigger) is logged and counted, and the writer goes on: before, it ended, and
    the daemon stayed ready while every later event piled up in memory."""
    path = tmp_path / "s.sqlite3"
    s = await Store.open(config(path, max_spool_mb=1.0), ship=True)
    s.start()
    db = sqlite3.connect(path)
    db.execute("CREATE TRIGGER keep BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'kept'); END")
    db.commit()
    per_event = 340  # bytes of a row, about
    n = (1024 * 1024) // per_event + 500  # past the bound
    for i in range(n):
        s.enqueue(event(i))
    await eventually(lambda: s.write_errors_total >= 1, within=10)
    later = n + 100
    for i in range(n, later):
        s.enqueue(event(i))
    await eventually(lambda: s.committed_total == later, within=10)
    assert s._writer is not None and not s._writer.done()
    assert any(
        m.startswith("store: the writer failed; it goes on, retrying with a back-off of up to 5 s")
        for m in caplog.messages
    )
    db.execute("DROP TRIGGER keep")
    db.commit()
    db.close()
    s.enqueue(event(later))
    await eventually(lambda: s.spool_bytes <= 1024 * 1024 and s.queued == 0, within=10)
    assert s.dropped_total > 0  # the bound works again: the oldest unshipped went, counted
    await s.close()
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
