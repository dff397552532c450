"""``atlasburn-proxy report``: spend, tokens, requests and refusals from the local store.

``--since`` selects events by their own time (the event's ``ts``: when the request started, or
what a client posted to the local /api/ingest), not by when they reached the store, to the
second: the cutoff is rounded down to a whole second, so an event of the cutoff's second counts.

``unknown cost`` counts the requests whose cost is not known, so that no one reads their $0 as
free: answers (2xx, to a POST that is billed) whose usage was missing or partial (a stream cut
mid-answer: its cost is at least what was counted), and events of models with no price
(``unpriced``, a part of it).

``--by hour`` and ``--by day`` are a time series: one row per hour (``2026-11-30T04:00Z``) or UTC
day (``2026-11-30``) of the events' ``ts`` that has any, oldest first. ``--by fingerprint`` is
one row per (fingerprint, provider, model), the fingerprint whole, so that a repeat that is
legitimate can be copied into ``guardrails.dumb_loop_detector.allow_fingerprints``.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .attribution import TAG_NAME
from .store import REFUSED, UNPRICED, USAGE_UNKNOWN
from .text import inert

# --by hour|day: the leading characters of the event's ts that name its bucket (ts is ISO 8601 UTC).
_BUCKETS = {"hour": 13, "day": 10}
_BUCKET_SUFFIX = {"hour": ":00Z", "day": ""}
# Where each dimension is in a stored event (its ingest body); ``tag:<Name>`` is
# ``$.attributes.tags."<name>"``. ``key`` groups by key_id and shows its name beside it.
_PATHS = {
    "provider": "$.provider",
    "model": "$.model",
    "endpoint": "$.endpoint",
    "fingerprint": "$.fingerprint",
    "app": "$.attributes.app",
    "user": "$.attributes.user",
    "session": "$.attributes.session",
    "key": "$.attributes.key_id",
    "unit": "$.attributes.process.unit",
    "exe": "$.attributes.process.exe",
}
_TAG = re.compile(f"tag:({TAG_NAME})")
# Every --by but tag:<Name>.
GROUPS = (*_PATHS, *_BUCKETS)
NONE = "(none)"  # the row of the events that do not say (no app header, no process found...)


def group_path(by: str) -> str:
    """The JSON path of ``--by``'s value in a stored event (``$.ts`` for hour and day);
    ValueError naming the choices."""
    if by in _BUCKETS:
        return "$.ts"
    path = _PATHS.get(by)
    if path is not None:
        return path
    m = _TAG.fullmatch(by)
    if m is None:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)} or tag:<Name>, got {by!r}")
    return f'$.attributes.tags."{m.group(1).lower()}"'


def _grouped(by: str) -> str:
    """The SQL of the value rows are grouped by (``?`` is ``group_path(by)``): an hour or a
    day is the leading characters of the event's ts (ISO 8601 UTC); a fingerprint goes with
    its provider and model (a JSON array: ``_named`` reads it)."""
    if by in _BUCKETS:
        return f"substr(json_extract(j, ?), 1, {_BUCKETS[by]})"
    if by == "fingerprint":
        return (
            "json_array(json_extract(j, ?), json_extract(j, '$.provider'),"
            " json_extract(j, '$.model'))"
        )
    return "json_extract(j, ?)"


def _named(by: str, value: object, name: object) -> tuple[str, str | None, str | None]:
    """A row's key, and (``--by fingerprint``) its provider and model, from the grouped value
    (``_grouped``) and the key's name (``--by key``)."""
    if by == "fingerprint":
        fp, provider, model = json.loads(str(value))
        return _key(fp, None), _key(provider, None), _key(model, None)
    return _key(value, name if by == "key" else None) + _BUCKET_SUFFIX.get(by, ""), None, None


_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str) -> float | None:
    """Seconds for "90m", "24h", "7d"...; None for "all"; ValueError otherwise."""
    if value == "all":
        return None
    m = _SINCE.match(value.strip())
    if not m:
        raise ValueError(f"expected a duration like 30m, 24h, 7d or 'all', got {value!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    requests: int
    refused: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    unpriced: int
    unknown_cost: int
    # --by fingerprint: the provider and model of the fingerprint's events (None otherwise).
    provider: str | None = None
    model: str | None = None

    def as_dict(self, by: str) -> dict[str, object]:
        named: dict[str, object] = {by: self.key}
        if self.provider is not None or self.model is not None:
            named |= {"provider": self.provider, "model": self.model}
        return {
            **named,
            "requests": self.requests,
            "refused": self.refused,
            "errors": self.errors,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": round(self.cost_usd, 10),
            "unpriced": self.unpriced,
            "unknown_cost": self.unknown_cost,
        }


def cutoff_ts(since_seconds: float, now: float | None = None) -> str:
    """The first second ``--since`` covers, as the start of an event ts
    (``2026-11-29T01:55:24``): ``since_seconds`` before ``now`` (epoch seconds; the clock when
    None), rounded down to a whole second.

    Event timestamps (``...:24Z``, ``...:24.1Z`` ... ``...:24.123456Z``) compare as text in
    time order except within one second (``...:24Z`` sorts after ``...:24.5Z``). Against this
    19-character prefix every form compares right: a ts of the cutoff's second or later starts
    with it or sorts after it, an earlier one sorts before it."""
    start = (time.time() if now is None else now) - since_seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(math.floor(start)))


def query(
    path: Path,
    by: str,
    since_seconds: float | None,
    now: float | None = None,
    db: sqlite3.Connection | None = None,
    first_id: int = 0,
) -> list[Row]:
    """Rows grouped ``by`` one column, biggest spend first, of the events whose ``ts`` is at
    most ``since_seconds`` before ``now`` (epoch seconds; the clock when None), to the second
    (``cutoff_ts``); every event for None. Events that have no value for ``by`` (no app
    named...) are one row, ``NONE``, so that the rows add up to the total. ``db``: a connection
    to use (``stats`` passes its read-only, time-bounded one; left open), else ``path`` is
    opened read-only; ``first_id``: rows before it are not read (``stats.first_id``). Raises
    FileNotFoundError, ValueError for ``by``."""
    where = group_path(by)
    if db is None and not path.exists():
        raise FileNotFoundError(path)
    cutoff = "" if since_seconds is None else cutoff_ts(since_seconds, now)
    own = db is None
    if db is None:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # The event fields are read from the stored ingest body (JSON text in a BLOB: cast, or
        # SQLite 3.45+ would read it as JSONB); what the body does not carry is in the row's
        # flags (store.REFUSED, store.UNPRICED).
        rows = db.execute(
            f"SELECT {_grouped(by)}, COUNT(*), "
            f"SUM(flags & {REFUSED} != 0), "
            f"SUM(json_extract(j, '$.status') >= 400 AND flags & {REFUSED} = 0), "
            "SUM(json_extract(j, '$.tokens_in')), SUM(json_extract(j, '$.tokens_out')), "
            f"SUM(json_extract(j, '$.cost_usd')), SUM(flags & {UNPRICED} != 0), "
            f"SUM(flags & {UNPRICED | USAGE_UNKNOWN} != 0), "
            "MAX(json_extract(j, '$.attributes.key_name')) "
            "FROM (SELECT CAST(body AS TEXT) AS j, flags FROM events WHERE id >= ?) "
            "WHERE json_extract(j, '$.ts') >= ? "
            "GROUP BY 1 ORDER BY 7 DESC, 2 DESC, 1",
            (where, first_id, cutoff),
        ).fetchall()
        if by in _BUCKETS:  # a time series: oldest first
            rows.sort(key=lambda r: str(r[0]))
    finally:
        if own:
            db.close()
    return [
        Row(
            key=named[0],
            requests=int(r[1] or 0),
            refused=int(r[2] or 0),
            errors=int(r[3] or 0),
            tokens_in=int(r[4] or 0),
            tokens_out=int(r[5] or 0),
            cost_usd=float(r[6] or 0),
            unpriced=int(r[7] or 0),
            unknown_cost=int(r[8] or 0),
            provider=named[1],
            model=named[2],
        )
        for r in rows
        for named in [_named(by, r[0], r[9])]
    ]


def _key(value: object, name: object) -> str:
    if value is None:
        return NONE
    # Inert: a spool written by an older version may hold any model a client sent.
    key = inert(str(value))
    return f"{key} ({inert(str(name))})" if name is not None else key


def total(rows: list[Row]) -> Row:
    return Row(
        "total",
        sum(r.requests for r in rows),
        sum(r.refused for r in rows),
        sum(r.errors for r in rows),
        sum(r.tokens_in for r in rows),
        sum(r.tokens_out for r in rows),
        sum(r.cost_usd for r in rows),
        sum(r.unpriced for r in rows),
        sum(r.unknown_cost for r in rows),
    )


def render(
    rows: list[Row], by: str, since: str, since_seconds: float | None, now: float | None = None
) -> str:
    """The report as a table for a terminal: ``since`` as the user gave it, the first second
    covered (``cutoff_ts``), one line per row and the total; keys cut to 48 characters, except
    a fingerprint, shown whole with its provider and model (cut to 48)."""
    start = "the beginning" if since_seconds is None else cutoff_ts(since_seconds, now) + "Z"
    lines = [f"Spend since {start} ({since}), by {by}"]
    named = by == "fingerprint"
    header = (
        by,
        *(("provider", "model") if named else ()),
        "requests",
        "refused",
        "errors",
        "tokens in",
        "tokens out",
        "cost USD",
        "unpriced",
        "unknown cost",
    )
    cells = [header] + [
        (
            inert(r.key, 80 if named else 48),
            *((inert(r.provider or "", 48), inert(r.model or "", 48)) if named else ()),
            f"{r.requests:,}",
            f"{r.refused:,}",
            f"{r.errors:,}",
            f"{r.tokens_in:,}",
            f"{r.tokens_out:,}",
            f"{r.cost_usd:,.6f}",
            f"{r.unpriced:,}",
            f"{r.unknown_cost:,}",
        )
        for r in [*rows, total(rows)]
    ]
    texts = 3 if named else 1  # left-aligned columns
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, c in enumerate(cells):
        if n == len(cells) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(
                c[i].ljust(widths[i]) if i < texts else c[i].rjust(widths[i])
                for i in range(len(header))
            ).rstrip()
        )
    return "\n".join(lines)
