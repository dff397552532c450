"""The numbers of the status page (``GET /api/stats``), read from the store like ``report``.

One query layer: the totals and the rows by model and by app are ``report.query``'s (the same
SQL, the same ``(none)`` row for events that do not say, the same ``unknown cost``); this module
adds what a page needs besides: spend over time, refusals by layer, repeated fingerprints.

A snapshot covers one range, ending now, in buckets aligned to the bucket size in UTC:

    hour  the last hour in 5-minute buckets (12)
    day   the last day in hourly buckets (24)
    week  the last week in daily buckets (7)

so the first bucket may start up to one bucket before the range does; every number of the
snapshot (totals included) covers exactly the buckets shown, from the first bucket's start.

Reads run on a read-only SQLite connection of their own (never the daemon's writer), off the
event loop (the caller runs ``snapshot`` in a thread), and are bounded in time: past
``max_seconds`` SQLite is interrupted and ``StatsTimeout`` raised (a huge spool answers 503, it
never holds a thread for minutes). Rows stored before the range are skipped by id
(``first_id``); the rows in it are read whole, several times (the ts, model and app are in the
stored JSON): a week of 100k events takes about 1.5 s on a 2-core machine, the last hour of it
20 ms. Events are read when committed (``storage.commit_interval_ms``).
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from . import report
from .store import REFUSED
from .text import inert

# range -> (seconds covered, bucket seconds)
RANGES = {"hour": (3600, 300), "day": (86400, 3600), "week": (7 * 86400, 86400)}
MAX_SERIES = 8  # names per stacked chart: the 7 that spent most, then "(other)"
OTHER = "(other)"
UNKNOWN_LAYER = "(unknown)"  # a refusal stored before the layer was kept (schema 2)
TOP_FINGERPRINTS = 10
MAX_SECONDS = 5.0  # a week of 100k events takes 1.5 s on a 2-core machine
_PROGRESS_STEPS = 10_000  # SQLite VM steps between deadline checks (well under a millisecond)

_EVENTS = "(SELECT CAST(body AS TEXT) AS j, flags, refused_by FROM events WHERE id >= ?)"
# An event's ts is at most this long after the row's ``created``: the relay's is the request's
# start (before it is stored), and /api/ingest refuses a ts more than 5 minutes ahead.
_TS_AHEAD = 300


class StatsTimeout(Exception):
    """The store took longer than the bound to answer."""


def buckets(range_name: str, now: float) -> list[int]:
    """Epoch seconds of the bucket starts of ``range_name`` (``RANGES``) ending with the bucket
    that holds ``now``; KeyError for an unknown range."""
    span, step = RANGES[range_name]
    last = math.floor(now / step) * step
    count = span // step
    return [last - (count - 1 - i) * step for i in range(count)]


def snapshot(
    path: Path, range_name: str, now: float | None = None, max_seconds: float = MAX_SECONDS
) -> dict[str, Any]:
    """The page's numbers (JSON-ready) for ``range_name``:

    ``{"range", "step_seconds", "buckets": [epoch s...], "totals": report row,
    "by_model": [report rows], "by_app": [report rows],
    "series": {"requests": [n per bucket], "by_model": [{"name", "cost_usd": [per bucket]}],
    "by_app": [...]}, "refusals": [{"layer", "requests"}],
    "fingerprints": [{"fingerprint", "provider", "model", "app", "requests", "refused",
    "cost_usd", "last_ts"}]}``

    Costs in USD. Raises FileNotFoundError (no store yet), KeyError (range), StatsTimeout."""
    now = time.time() if now is None else now
    starts = buckets(range_name, now)
    step = RANGES[range_name][1]
    since = now - starts[0]
    if not path.exists():
        raise FileNotFoundError(path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    deadline = time.monotonic() + max_seconds
    db.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
    try:
        first = first_id(db, starts[0])
        by_model = report.query(path, "model", since, now, db, first)
        by_app = report.query(path, "app", since, now, db, first)
        cutoff = (first, report.cutoff_ts(since, now))
        answer: dict[str, Any] = {
            "range": range_name,
            "step_seconds": step,
            "buckets": starts,
            "totals": _row(report.total(by_model), "total"),
            "by_model": [_row(r, "model") for r in by_model],
            "by_app": [_row(r, "app") for r in by_app],
            "series": _series(db, starts, step, cutoff),
            "refusals": _refusals(db, cutoff),
            "fingerprints": _repeats(db, cutoff),
        }
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            raise StatsTimeout(f"the store took over {max_seconds}s to answer") from None
        raise
    finally:
        db.close()
    return answer


def first_id(db: sqlite3.Connection, start: float) -> int:
    """The first row that may hold an event of ``start`` (epoch s) or later: rows stored more
    than ``_TS_AHEAD`` before it cannot, so the JSON of older rows is never read. (A binary
    search over ids, which grow with ``created``: a few reads of the primary key.)"""
    row = db.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
    low, high = (int(row[0]), int(row[1]) + 1) if row and row[0] is not None else (0, 0)
    bound = start - _TS_AHEAD
    while low < high:  # the first id whose created >= bound (rows deleted: the next one up)
        mid = (low + high) // 2
        found = db.execute(
            "SELECT id, created FROM events WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
        ).fetchone()
        if found is None:
            high = mid
        elif found[1] >= bound:
            high = mid
        else:
            low = int(found[0]) + 1
    return low


def _row(row: report.Row, by: str) -> dict[str, Any]:
    d = row.as_dict("name")
    if by == "total":
        del d["name"]
    return d


def _series(
    db: sqlite3.Connection, starts: list[int], step: int, cutoff: tuple[int, str]
) -> dict[str, Any]:
    index = {b: i for i, b in enumerate(starts)}
    requests = [0] * len(starts)
    stacks: dict[str, dict[str, list[float]]] = {}
    for by in ("by_model", "by_app"):
        where = report.group_path(by[3:])
        rows = db.execute(
            # The event's own time, to the second: '2026-11-29T01:55:24.123Z' -> epoch seconds.
            "SELECT CAST(strftime('%s', substr(json_extract(j, '$.ts'), 1, 19)) AS INTEGER)"
            " / ? * ?, json_extract(j, ?), COUNT(*), SUM(json_extract(j, '$.cost_usd'))"
            f" FROM {_EVENTS} WHERE json_extract(j, '$.ts') >= ? GROUP BY 1, 2",
            (step, step, where, *cutoff),
        ).fetchall()
        spent: dict[str, list[float]] = {}
        for bucket, name, count, cost in rows:
            i = index.get(bucket)
            if i is None:
                continue
            key = report.NONE if name is None else inert(str(name))
            spent.setdefault(key, [0.0] * len(starts))[i] += float(cost or 0)
            if by == "by_model":
                requests[i] += int(count)
        stacks[by] = spent
    return {
        "requests": requests,
        "by_model": _stack(stacks["by_model"]),
        "by_app": _stack(stacks["by_app"]),
    }


def _stack(spent: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One series per name, biggest spend first; past ``MAX_SERIES`` the rest add up to
    ``(other)`` (so the stack's height is still the total)."""
    names = sorted(spent, key=lambda n: (-sum(spent[n]), n))
    if len(names) > MAX_SERIES:
        kept, rest = names[: MAX_SERIES - 1], names[MAX_SERIES - 1 :]
        other = [sum(spent[n][i] for n in rest) for i in range(len(spent[rest[0]]))]
        spent = {**{n: spent[n] for n in kept}, OTHER: other}
        names = [*kept, OTHER]
    return [{"name": n, "cost_usd": [round(v, 10) for v in spent[n]]} for n in names]


def _refusals(db: sqlite3.Connection, cutoff: tuple[int, str]) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT refused_by, COUNT(*) FROM "
        f"{_EVENTS} WHERE flags & {REFUSED} != 0 AND json_extract(j, '$.ts') >= ? "
        "GROUP BY 1 ORDER BY 2 DESC, 1",
        cutoff,
    ).fetchall()
    return [
        {"layer": UNKNOWN_LAYER if layer is None else inert(str(layer)), "requests": int(n)}
        for layer, n in rows
    ]


def _repeats(db: sqlite3.Connection, cutoff: tuple[int, str]) -> list[dict[str, Any]]:
    """The fingerprints seen more than once, most repeated first: what a loop looks like."""
    rows = db.execute(
        "SELECT json_extract(j, '$.fingerprint'), json_extract(j, '$.provider'),"
        " json_extract(j, '$.model'), json_extract(j, '$.attributes.app'), COUNT(*),"
        f" SUM(flags & {REFUSED} != 0), SUM(json_extract(j, '$.cost_usd')),"
        " MAX(json_extract(j, '$.ts'))"
        f" FROM {_EVENTS} WHERE json_extract(j, '$.ts') >= ?"
        " GROUP BY 1, 2, 3, 4 HAVING COUNT(*) > 1 ORDER BY 5 DESC, 7 DESC, 1 LIMIT ?",
        (*cutoff, TOP_FINGERPRINTS),
    ).fetchall()
    return [
        {
            "fingerprint": inert(str(fp)),
            "provider": inert(str(provider)),
            "model": inert(str(model)),
            "app": report.NONE if app is None else inert(str(app)),
            "requests": int(n),
            "refused": int(refused or 0),
            "cost_usd": round(float(cost or 0), 10),
            "last_ts": inert(str(last)),
        }
        for fp, provider, model, app, n, refused, cost, last in rows
    ]
