"""The store: one SQLite file holding the event spool and the guardrail state.

Events arrive from the hot path through ``enqueue`` (a deque append: nothing on the response path
waits for the disk). One writer task commits everything queued, in one transaction, every
``storage.commit_interval_ms``: group commit, one fsync per interval however busy the daemon is.

Durability: WAL journal with ``synchronous=FULL``, so a commit is on disk when it returns. The
loss window is the events not yet committed: at most one commit interval of finished responses,
after a process crash and after a power loss alike.

Nothing here may break traffic: a failed write (disk full, I/O error, locked file) is logged and
counted, and the events stay queued for the next attempt; only past ``max_pending_events`` in
memory, or past ``max_spool_mb`` on disk, are events dropped, oldest first (on disk, those on
which nothing was spent before the others), each one counted and logged — never silently.
Shipped events go before unshipped ones. An event that cannot be encoded (which
``events.parse_event`` never lets in) is quarantined: dropped, counted and logged with the
reason, while the events around it are written. The writer task survives whatever one of its
rounds raises (logged, counted as a write error, retried after a back-off): it never leaves the
daemon serving with a spool that silently stopped.

Event states: PENDING (to ship), SHIPPED (delivered; kept for reports until retention ends),
LOCAL (local-only mode: kept for reports), POISONED (the API refused it alone; kept for
inspection). A batch is a row of ``batches``: the pending events in one id range; it keeps its
identity across retries and restarts until it is delivered or split.

Cost per event on the writer thread, the hot path's one shared core: one narrow row (the ingest
JSON plus what reports need) and one index entry; a batch is two statements whatever its size; spend
per minute (the spend cap's restart memory) is kept in its own small table, summed at each commit,
and so is the spend per budget and minute (``Event.budgets``: the budgets' restart memory).
Rows need no time index: ids grow with time, so a time bound is found by a binary search on ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from .adapters.base import UsageSource
from .config import StorageConfig
from .events import Event, InvalidEvent, check_encodable
from .statefiles import StateDir

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING, SHIPPED, LOCAL, POISONED = 0, 1, 2, 3

SCHEMA_VERSION = 4  # 3: budget_spend; 4: events.refused_by

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    state INTEGER NOT NULL,
    size INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    body BLOB NOT NULL,
    refused_by TEXT  -- local-only (schema 4): the guardrail layer that refused it, else NULL
);
CREATE INDEX IF NOT EXISTS events_state ON events (state, id);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS spend (
    minute INTEGER PRIMARY KEY,
    usd REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS budget_spend (
    budget TEXT NOT NULL,
    minute INTEGER NOT NULL,
    usd REAL NOT NULL,
    PRIMARY KEY (budget, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS guardrails (
    org_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    expires_at REAL,
    layer TEXT,
    reason TEXT,
    source TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    org_id TEXT NOT NULL,
    layer TEXT,
    ttl_seconds REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# events.flags: what reports need beyond the ingest body.
REFUSED = 1  # refused by a guardrail (never reached the provider)
UNPRICED = 2  # usage known but no price for the model
FROM_INGEST = 4  # posted to the local /api/ingest, not relayed here
FREE = 8  # nothing was spent: not answered 2xx, and cost 0 (dropped first past max_spool_mb)
USAGE_UNKNOWN = 16  # a billed 2xx answer whose usage was missing or partial (Event.usage_unknown)

_INSERT = (
    "INSERT INTO events (created, state, size, flags, body, refused_by) VALUES (?, ?, ?, ?, ?, ?)"
)
_ROW_OVERHEAD = 40  # bytes of a row besides its body, roughly
_ADD_SPEND = (
    "INSERT INTO spend (minute, usd) VALUES (?, ?) "
    "ON CONFLICT (minute) DO UPDATE SET usd = usd + excluded.usd"
)
_ADD_BUDGET_SPEND = (
    "INSERT INTO budget_spend (budget, minute, usd) VALUES (?, ?, ?) "
    "ON CONFLICT (budget, minute) DO UPDATE SET usd = usd + excluded.usd"
)
_HAS_USAGE = frozenset({UsageSource.REPORTED, UsageSource.REQUESTED})
_SPEND_KEPT_SECONDS = 2 * 86400

_CHUNK = 5000
_MAX_WRITE_DELAY = 5.0  # seconds between attempts while writes keep failing
# After a checkpoint, SQLite trims the WAL file down to this size.
WAL_SIZE_LIMIT = 16 * 1024 * 1024
_MAINTENANCE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    event_ids: tuple[int, ...]
    bodies: tuple[bytes, ...]
    resumed: bool = False  # under way before this call (a retry, a part of a split batch)

    def payload(self) -> bytes:
        """``{"events": [...]}`` from the stored ingest bodies, without re-encoding them."""
        return b'{"events":[' + b",".join(self.bodies) + b"]}"


@dataclass(frozen=True, slots=True)
class GuardrailRow:
    org_id: str
    state: str
    expires_at: float | None
    layer: str | None
    reason: str | None
    source: str | None


async def _whole(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled (the shipper is, at shutdown):
    a transaction on the shared connection must never be left open halfway, or every later
    BEGIN fails; ``work`` holds the store's lock until it is done. The caller still gets its
    CancelledError at once."""
    return await asyncio.shield(work)


# Schema 1 (to 0.1.0): one column per event field and the batch id on every row.
_FROM_V1 = f"""
BEGIN IMMEDIATE;
DROP INDEX IF EXISTS events_state;
DROP INDEX IF EXISTS events_batch;
DROP INDEX IF EXISTS events_created;
ALTER TABLE events RENAME TO events_v1;
{SCHEMA}
INSERT INTO events (id, created, state, size, flags, body, refused_by)
    SELECT id, created, state, length(body) + {_ROW_OVERHEAD},
        (refused_by IS NOT NULL) * {REFUSED}
        + (priced = 0 AND usage_source IN ('reported', 'requested')) * {UNPRICED}
        + (origin = 'ingest') * {FROM_INGEST},
        body, refused_by
    FROM events_v1;
INSERT INTO batches (id, first_id, last_id)
    SELECT batch_id, MIN(id), MAX(id) FROM events_v1
    WHERE batch_id IS NOT NULL AND state = {PENDING} GROUP BY batch_id;
INSERT INTO spend (minute, usd)
    SELECT CAST(created / 60 AS INTEGER) * 60, SUM(cost_usd) FROM events_v1
    WHERE origin = 'proxy' AND cost_usd > 0 GROUP BY 1;
DELETE FROM sqlite_sequence WHERE name = 'events';
UPDATE sqlite_sequence SET name = 'events' WHERE name = 'events_v1';
DROP TABLE events_v1;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


async def _migrate(db: aiosqlite.Connection) -> None:
    """Create the schema, or bring an older spool up to date in one transaction."""
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    if row is not None and row[0] >= SCHEMA_VERSION:
        return
    async with db.execute("SELECT name FROM pragma_table_info('events')") as cur:
        columns = {r[0] for r in await cur.fetchall()}
    if "provider" in columns:
        log.warning("store: upgrading the spool to schema %d (once)", SCHEMA_VERSION)
        await _script(db, _FROM_V1)
        return
    # Schema 2 and later add to it: new tables (CREATE ... IF NOT EXISTS) and columns. The
    # refusing layer (schema 4) was not kept before: older refusals keep NULL (layer unknown).
    added = ""
    if columns and "refused_by" not in columns:
        log.warning("store: upgrading the spool to schema %d (once)", SCHEMA_VERSION)
        added = "ALTER TABLE events ADD COLUMN refused_by TEXT;\n"
    await _script(
        db,
        f"BEGIN IMMEDIATE;\n{added}{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;\n",
    )


async def _script(db: aiosqlite.Connection, script: str) -> None:
    """Run a migration script (one transaction): rolled back whole if any statement fails."""
    try:
        await db.executescript(script)
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise


class Store:
    """The spool and guardrail state. ``enqueue`` is safe to call from the hot path."""

    def __init__(self, db: aiosqlite.Connection, config: StorageConfig, ship: bool) -> None:
        self._db = db
        self._config = config
        self._ship = ship  # False: local-only mode, events are kept as LOCAL
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()  # the queue got its first event (or many)
        self._stop = asyncio.Event()  # closing: stop waiting for the group-commit interval
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._flushing = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.max_bytes = int(config.max_spool_mb * 1024 * 1024)
        self.spool_bytes = 0
        self.pending_events = 0
        # Counters (also persisted: a restart does not reset what was lost).
        self.committed_total = 0
        self.commits_total = 0  # transactions that committed events
        self.dropped_total = 0
        self.write_errors_total = 0
        self.poisoned_total = 0
        self._last_maintenance = 0.0
        self._write_failing = False
        self._writer_failing = False
        self._counters_dirty = False  # dropped_total moved since the counters were saved

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, config: StorageConfig, *, ship: bool) -> Store:
        """Open (or create) the store at ``storage.path``. Events name models and spend: the
        directory and the files are checked and made private before SQLite opens them
        (``statefiles``; ``StateFileError`` if they are not safe to use)."""
        path = Path(config.path)
        state = StateDir.check(path.parent, create=True)
        assert state is not None  # create=True never gives None
        state.prepare_database(path.name)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",
                "PRAGMA busy_timeout=5000",
                f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}",
                "PRAGMA foreign_keys=OFF",
            ):
                await db.execute(pragma)
            await _migrate(db)
            store = cls(db, config, ship)
            await store._load_totals()
        except BaseException:
            await db.close()
            raise
        return store

    async def _load_totals(self) -> None:
        async with self._db.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(state = ?), 0) FROM events", (PENDING,)
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        self.spool_bytes, self.pending_events = int(row[0]), int(row[1])
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            for name, value in await cur.fetchall():
                if name in ("dropped_total", "poisoned_total"):
                    setattr(self, name, int(value))

    def start(self) -> None:
        from .tasks import spawn

        self._writer = spawn(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        """Commit what is queued (the writer drains), then close the file — always, even when
        the last commit raised: aiosqlite's thread is not a daemon thread, and an open
        connection would keep the process alive after SIGTERM. What the commit raised is raised
        after the file is closed."""
        self._closing = True
        self._stop.set()
        self._wake.set()
        try:
            if self._writer is not None:
                await self._writer
            await self.flush()
        finally:
            async with self._lock:
                try:
                    await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.warning("store: final checkpoint failed: %s", exc)
                finally:
                    await self._db.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` when the body or the commit raised.
        A transaction is never left open on the shared connection (every later ``BEGIN`` would
        fail: the spool would stop for good). The caller holds ``_lock``."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            await self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                try:
                    await self._db.execute("ROLLBACK")
                except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is gone
                    log.warning("store: rollback failed: %s", exc)
            raise

    # ------------------------------------------------------------------ writing

    def enqueue(self, event: Event) -> None:
        """Queue an event for the next group commit (O(1); never blocks, never raises)."""
        queue = self._queue
        queue.append(event)
        if len(queue) > self._config.max_pending_events:
            queue.popleft()
            self._count_dropped(1, "the store cannot keep up (or cannot write)")
        if len(queue) == 1 or len(queue) >= 1000:
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _write_loop(self) -> None:
        interval = self._config.commit_interval_ms / 1000
        delay = interval
        while not self._closing:
            try:
                if not self._queue:
                    self._wake.clear()
                    await self._pause(_MAINTENANCE_SECONDS, self._wake)
                else:
                    # Group commit: let one interval's events gather (longer while writes fail).
                    await self._pause(delay, self._stop)
                    ok = await self.flush(only_queued=True)
                    delay = interval if ok else min(delay * 2, _MAX_WRITE_DELAY)
                await self._maintain()
                self._writer_failing = False
            except Exception:
                # Whatever a round raises (a bug, not a disk error: those are handled below),
                # the writer goes on: a dead writer would leave the daemon ready while every
                # later event silently piles up in memory.
                self.write_errors_total += 1
                delay = min(max(delay, interval) * 2, _MAX_WRITE_DELAY)
                if not self._writer_failing:
                    log.exception(
                        "store: the writer failed; it goes on, retrying with a back-off of up to"
                        " %.0f s",
                        _MAX_WRITE_DELAY,
                    )
                else:
                    log.error("store: the writer failed again (%d errors)", self.write_errors_total)
                self._writer_failing = True
                await self._pause(delay, self._stop)

    @staticmethod
    async def _pause(seconds: float, until: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(until.wait(), seconds)
        except TimeoutError:
            pass

    async def flush(self, *, only_queued: bool = False) -> bool:
        """Commit every queued event now. False when the write failed (events stay queued).

        ``only_queued``: only the events queued when it began (the group commit). Events that
        arrive during a commit wait for the next interval: otherwise, under steady one-at-a-time
        traffic, a new event arrives during every transaction and the writer commits one or two
        events at a time back to back, each commit waking aiosqlite's thread several times."""
        async with self._flushing:  # one flush at a time: each event is written once
            left = len(self._queue) if only_queued else -1
            while self._queue and left != 0:
                taken = min(len(self._queue), _CHUNK)
                if not await self._flush():
                    return False
                if left > 0:
                    left = max(0, left - taken)
            return True

    async def _flush(self) -> bool:
        # At most _CHUNK events per transaction, so that encoding a backlog (after the disk
        # came back) never holds the event loop for long.
        events = list(itertools.islice(self._queue, _CHUNK))
        now = time.time()
        state = PENDING if self._ship else LOCAL
        rows: list[tuple[Any, ...]] = []
        bad: list[tuple[Event, Exception]] = []
        spent = 0.0
        budgets: dict[str, float] = {}  # budget name -> USD of this commit's events
        for e in events:
            # Whatever one event makes fail is that event's: it is quarantined, not the batch.
            try:
                row = self._row(e, now, state)
                cost = float(e.cost_usd) if e.origin == "proxy" else 0.0
            except Exception as exc:
                bad.append((e, exc))
                continue
            rows.append(row)
            spent += cost
            if cost > 0:
                for name in e.budgets:
                    budgets[name] = budgets.get(name, 0.0) + cost
        if bad:
            # (Even when no event is left: the transaction then saves the dropped count.)
            events = self._quarantine(len(events), bad)
        size = sum(r[2] for r in rows)
        try:
            async with self._lock, self._transaction():
                await self._db.executemany(_INSERT, rows)
                if self._counters_dirty:
                    await self._save_counters()
                if spent > 0:
                    await self._db.execute(_ADD_SPEND, (int(now // 60) * 60, spent))
                if budgets:
                    minute = int(now // 60) * 60
                    await self._db.executemany(
                        _ADD_BUDGET_SPEND, [(b, minute, usd) for b, usd in budgets.items()]
                    )
        except (sqlite3.Error, OSError) as exc:
            self.write_errors_total += 1
            if not self._write_failing:
                log.error(
                    "store: cannot write %d events (kept in memory, retrying): %s", len(events), exc
                )
            self._write_failing = True
            return False
        if self._write_failing:
            log.warning(
                "store: writing again after failures (%d errors so far)", self.write_errors_total
            )
            self._write_failing = False
        for _ in range(len(events)):
            self._queue.popleft()
        self._counters_dirty = False
        self.committed_total += len(events)
        self.commits_total += 1
        self.spool_bytes += size
        if self._ship:
            self.pending_events += len(events)
        if self.spool_bytes > self.max_bytes:
            await self._enforce_bound()
        return True

    @staticmethod
    def _row(e: Event, now: float, state: int) -> tuple[Any, ...]:
        # A copy of orjson's output: its buffer is allocated in 4 KiB (or larger power-of-two)
        # steps and not shrunk, so each row of a flush would hold 4 KiB for a 300-byte body.
        body = bytes(memoryview(orjson.dumps(e.to_ingest())))
        flags = 0
        if e.refused_by is not None:
            flags = REFUSED
        elif not e.priced and e.usage_source in _HAS_USAGE:
            flags = UNPRICED
        if e.usage_unknown:
            flags |= USAGE_UNKNOWN
        if e.origin != "proxy":
            flags |= FROM_INGEST
        if not e.cost_usd and not 200 <= e.status < 300:
            flags |= FREE
        return (now, state, len(body) + _ROW_OVERHEAD, flags, body, e.refused_by)

    def _quarantine(self, head: int, bad: list[tuple[Event, Exception]]) -> list[Event]:
        """Take the events that could not be encoded (each with what encoding raised) out of
        the first ``head`` events of the queue, each counted as dropped and logged with the
        reason; the others of those ``head``, in order. Nothing may await between reading the
        head and this: the queue's head is rebuilt without them."""
        for event, exc in bad:
            why = f"{type(exc).__name__}: {exc}"
            try:
                check_encodable(event)  # names the field, where encoding is what failed
            except InvalidEvent as invalid:
                why = str(invalid)
            except Exception:
                pass
            self._count_dropped(
                1,
                f"cannot encode it ({why}): {event.provider} {event.model!r}"
                f" {event.endpoint} status {event.status} at {event.ts}",
            )
        dropped = {id(event) for event, _ in bad}
        events = [self._queue.popleft() for _ in range(head)]
        good = [event for event in events if id(event) not in dropped]
        self._queue.extendleft(reversed(good))
        self._counters_dirty = True  # saved with this flush's commit
        return good

    def _count_dropped(self, n: int, why: str) -> None:
        self.dropped_total += n
        log.error("store: dropped %d event(s): %s (%d dropped in all)", n, why, self.dropped_total)

    # ------------------------------------------------------------------ bounds and upkeep

    async def _enforce_bound(self) -> None:
        """Past max_spool_mb: delete shipped events first, then the oldest of those on which
        nothing was spent (errors and refusals: a flood of them must not push out what was
        paid for), then the oldest others (the last two counted as dropped)."""
        async with self._lock:
            excess = self.spool_bytes - self.max_bytes
            freed, _ = await self._delete_oldest((SHIPPED,), excess)
            excess -= freed
            lost = 0
            unsent = (PENDING, LOCAL, POISONED)
            for free_only in (True, False):
                if excess <= 0:
                    break
                freed, count = await self._delete_oldest(unsent, excess, free_only)
                excess -= freed
                lost += count
            if lost:
                self._count_dropped(
                    lost, f"the spool passed max_spool_mb={self._config.max_spool_mb}"
                )
                await self._save_counters()

    async def _delete_oldest(
        self, states: Sequence[int], nbytes: int, free_only: bool = False
    ) -> tuple[int, int]:
        marks = ",".join("?" * len(states))
        freed = count = pending = 0
        free = f" AND flags & {FREE}" if free_only else ""
        async with self._db.execute(
            f"SELECT id, size, state FROM events WHERE state IN ({marks}){free} ORDER BY id",
            tuple(states),
        ) as cur:
            ids = []
            async for row_id, size, state in cur:
                if freed >= nbytes:
                    break
                ids.append(row_id)
                freed += size
                count += 1
                pending += state == PENDING
        if ids:
            async with self._transaction():
                await self._db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
            self.spool_bytes -= freed
            self.pending_events -= pending
        return freed, count

    async def _save_counters(self) -> None:
        await self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [("dropped_total", self.dropped_total), ("poisoned_total", self.poisoned_total)],
        )

    async def _maintain(self) -> None:
        """Once a minute: retention, and a WAL checkpoint that truncates the WAL file (SQLite's
        own checkpoints at 1000 pages bound it in between, and journal_size_limit trims it)."""
        now = time.monotonic()
        if now - self._last_maintenance < _MAINTENANCE_SECONDS:
            return
        self._last_maintenance = now
        try:
            await self.expire()
            async with self._lock:
                await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, OSError) as exc:
            log.warning("store: maintenance failed (retrying later): %s", exc)

    async def expire(self) -> int:
        """Delete shipped and local events older than the retention period, oldest first (ids
        grow with time: the scan stops at the first event young enough to keep)."""
        return await _whole(self._expire())

    async def _expire(self) -> int:
        now = time.time()
        cutoff = now - self._config.retention_hours * 3600
        deleted = 0
        async with self._lock:
            while True:
                async with self._db.execute(
                    "SELECT id, size, created FROM events WHERE state IN (?, ?) "
                    "ORDER BY id LIMIT 1000",
                    (SHIPPED, LOCAL),
                ) as cur:
                    rows = list(await cur.fetchall())
                old = [(row_id, size) for row_id, size, created in rows if created < cutoff]
                if not old:
                    break
                async with self._transaction():
                    await self._db.executemany(
                        "DELETE FROM events WHERE id = ?", [(i,) for i, _ in old]
                    )
                self.spool_bytes -= sum(size for _, size in old)
                deleted += len(old)
                if len(old) < len(rows):
                    break
            await self._db.execute(
                "DELETE FROM spend WHERE minute < ?", (now - _SPEND_KEPT_SECONDS,)
            )
            await self._db.execute(
                "DELETE FROM budget_spend WHERE minute < ?", (now - _SPEND_KEPT_SECONDS,)
            )
        return deleted

    # ------------------------------------------------------------------ shipping

    async def next_batch(self, limit: int) -> Batch | None:
        """The batch to send: the one already under way (same identity), else a new one of the
        oldest pending events."""
        async with self._lock:
            while True:
                async with self._db.execute(
                    "SELECT id, first_id, last_id FROM batches ORDER BY first_id LIMIT 1"
                ) as cur:
                    row = await cur.fetchone()
                resumed = row is not None
                if row is not None:
                    batch_id, first, last = row
                else:
                    async with self._db.execute(
                        "SELECT id FROM events WHERE state = ? ORDER BY id LIMIT ?",
                        (PENDING, limit),
                    ) as cur:
                        ids = [r[0] for r in await cur.fetchall()]
                    if not ids:
                        return None
                    batch_id, first, last = uuid.uuid4().hex, ids[0], ids[-1]
                    await self._db.execute(
                        "INSERT INTO batches (id, first_id, last_id) VALUES (?, ?, ?)",
                        (batch_id, first, last),
                    )
                async with self._db.execute(
                    "SELECT id, body FROM events WHERE state = ? AND id BETWEEN ? AND ? "
                    "ORDER BY id",
                    (PENDING, first, last),
                ) as cur:
                    rows = await cur.fetchall()
                if rows:
                    return Batch(
                        batch_id,
                        tuple(r[0] for r in rows),
                        tuple(bytes(r[1]) for r in rows),
                        resumed,
                    )
                # Every event of the batch was dropped by the spool bound: forget it.
                await self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    async def _settle(self, batch: Batch, state: int) -> None:
        """The batch's events leave PENDING for ``state``, and the batch is done."""
        async with self._transaction():
            await self._db.execute(
                "UPDATE events SET state = ? WHERE state = ? AND id BETWEEN ? AND ?",
                (state, PENDING, batch.event_ids[0], batch.event_ids[-1]),
            )
            await self._db.execute("DELETE FROM batches WHERE id = ?", (batch.id,))

    async def delivered(self, batch: Batch) -> None:
        """The API took the batch (2xx): its events leave the spool (kept for reports)."""
        await _whole(self._delivered(batch))

    async def _delivered(self, batch: Batch) -> None:
        async with self._lock:
            await self._settle(batch, SHIPPED)
        self.pending_events -= len(batch.event_ids)

    async def split(self, batch: Batch, parts: int) -> list[str]:
        """Split a refused batch into ``parts`` new batches (contiguous, as even as can be), to
        find the event the API refuses."""
        return await _whole(self._split(batch, parts))

    async def _split(self, batch: Batch, parts: int) -> list[str]:
        ids = batch.event_ids
        parts = max(1, min(parts, len(ids)))
        size, extra = divmod(len(ids), parts)
        ranges = []
        start = 0
        for k in range(parts):
            end = start + size + (k < extra)
            ranges.append((uuid.uuid4().hex, ids[start], ids[end - 1]))
            start = end
        async with self._lock, self._transaction():
            await self._db.execute("DELETE FROM batches WHERE id = ?", (batch.id,))
            await self._db.executemany(
                "INSERT INTO batches (id, first_id, last_id) VALUES (?, ?, ?)", ranges
            )
        return [r[0] for r in ranges]

    async def poison(self, batch: Batch, why: str) -> None:
        """The API refuses this one event: keep it for inspection, out of the way of the rest."""
        await _whole(self._poison(batch, why))

    async def _poison(self, batch: Batch, why: str) -> None:
        async with self._lock:
            await self._settle(batch, POISONED)
            self.poisoned_total += len(batch.event_ids)
            self.pending_events -= len(batch.event_ids)
            await self._save_counters()
        log.error(
            "ingest refused event id %s (%s): kept in the store as poisoned for inspection "
            "(%d poisoned in all)",
            ",".join(map(str, batch.event_ids)),
            why,
            self.poisoned_total,
        )

    async def spend_buckets(self, seconds: float) -> list[tuple[float, float]]:
        """The daemon's own spend per minute over the last ``seconds``, oldest first."""
        async with self._db.execute(
            "SELECT minute, usd FROM spend WHERE minute >= ? ORDER BY minute",
            (int((time.time() - seconds) // 60) * 60,),
        ) as cur:
            return [(float(m), float(usd)) for m, usd in await cur.fetchall()]

    async def budget_buckets(self, seconds: float) -> dict[str, list[tuple[float, float]]]:
        """Each budget's spend per minute over the last ``seconds``, oldest first, by name."""
        out: dict[str, list[tuple[float, float]]] = {}
        async with self._db.execute(
            "SELECT budget, minute, usd FROM budget_spend WHERE minute >= ? ORDER BY minute",
            (int((time.time() - seconds) // 60) * 60,),
        ) as cur:
            for name, minute, usd in await cur.fetchall():
                out.setdefault(str(name), []).append((float(minute), float(usd)))
        return out

    # ------------------------------------------------------------------ guardrail state

    async def load_guardrails(self) -> list[GuardrailRow]:
        async with self._db.execute(
            "SELECT org_id, state, expires_at, layer, reason, source FROM guardrails"
        ) as cur:
            return [GuardrailRow(*row) for row in await cur.fetchall()]

    async def audit(
        self,
        who: str,
        action: str,
        org_id: str,
        layer: str | None,
        ttl_seconds: float | None,
        reason: str | None,
    ) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT INTO audit (at, who, action, org_id, layer, ttl_seconds, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), who, action, org_id, layer, ttl_seconds, reason),
            )

    async def save_guardrail(self, row: GuardrailRow) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT INTO guardrails (org_id, state, expires_at, layer, reason, source, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (org_id) DO UPDATE SET "
                "state = excluded.state, expires_at = excluded.expires_at, "
                "layer = excluded.layer, reason = excluded.reason, source = excluded.source, "
                "updated_at = excluded.updated_at",
                (
                    row.org_id,
                    row.state,
                    row.expires_at,
                    row.layer,
                    row.reason,
                    row.source,
                    time.time(),
                ),
            )
