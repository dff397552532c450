"""Log lines: logfmt (the default) or JSON, one line each, and the per-request access line.

Every line has ``ts``, ``level``, ``logger`` and ``msg``; the access line adds the request's
fields (request id, provider, model, endpoint, status, tokens, cost, latency, ...). No header,
query string or body is ever logged, so no key can be. When access lines are off (config, or a
level above info) nothing is formatted for them at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from typing import Any

import orjson

from .events import Event, iso_ms

ACCESS = logging.getLogger("atlasburn.access")


def _logfmt_value(value: Any) -> str:
    """A logfmt value: bare when it is printable and has no space, ``=``, ``"`` or backslash,
    else quoted with ``\\`` and ``\"`` escaped and every non-printable character escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    text = str(value)
    if text.isprintable():
        if text and not any(c in text for c in ' ="\\'):
            return text
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    else:
        escaped = "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in text)
    return f'"{escaped}"'


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    """One character as a JSON-style escape (``\\n``, ``\\u001b``; a UTF-16 surrogate pair above
    the BMP), which logfmt readers (go-logfmt, Loki) decode: nothing a client chose can end the
    line, move a terminal's cursor or reorder what an operator reads."""
    known = _ESCAPES.get(ch)
    if known is not None:
        return known
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _printable_json(line: str) -> str:
    """A JSON text with every non-printable character escaped (orjson escapes only C0 controls:
    DEL, C1 controls such as U+009B, bidi and other format characters and U+2028 would reach the
    terminal raw). Such characters only occur inside strings, where ``\\uNNNN`` means the same."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _escape(c) for c in line)


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.created * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None)
        if fields:
            parts.extend(f"{k}={_logfmt_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + _logfmt_value(self.formatException(record.exc_info))
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _printable_json(orjson.dumps(out, default=str).decode())


def setup_logging(level: str, fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is off (access_log=None); ours is atlasburn.access.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_PREFIX = os.urandom(3).hex()
_COUNTER = itertools.count(1)


class Throttle:
    """At most one log line per ``seconds`` for one kind of event that a client can repeat at
    will: ``allow()`` says whether this one may be logged, and how many were held back since
    the last one (to say so in it)."""

    __slots__ = ("seconds", "_last", "_held")

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._last = -float("inf")
        self._held = 0

    def allow(self) -> tuple[bool, int]:
        now = time.monotonic()
        if now - self._last < self.seconds:
            self._held += 1
            return False, 0
        held, self._held, self._last = self._held, 0, now
        return True, held


def request_id() -> str:
    """A short id unique to this process run: random prefix + counter."""
    return f"{_PREFIX}{next(_COUNTER):x}"


class AccessLog:
    """The line per request, written in batches: lines are formatted straight into a buffer
    (no LogRecord, no handler lock, no flush per line) and written to stderr every
    ``FLUSH_SECONDS`` or every ``FLUSH_LINES`` lines, in the configured format."""

    FLUSH_SECONDS = 0.2
    FLUSH_LINES = 512

    def __init__(self, enabled: bool, fmt: str = "logfmt") -> None:
        self.enabled = enabled
        self.json = fmt == "json"
        self._lines: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        from .tasks import spawn

        self._task = spawn(self._flusher(), name="access-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                sys.stderr.write("".join(lines))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr gone: logging must never break traffic

    def write(self, event: Event, rid: str) -> None:
        if not self.enabled or not ACCESS.isEnabledFor(logging.INFO):
            return
        ts = iso_ms(time.time())
        # Who sent it, where known (attribution): app, the key's id (never the key), the unit.
        attributes = event.attributes
        app = key_id = unit = None
        if attributes is not None:
            app, key_id = attributes.app, attributes.key_id
            if attributes.process is not None:
                unit = attributes.process.unit
        if self.json:
            line = orjson.dumps(
                {
                    "ts": ts,
                    "level": "info",
                    "logger": "atlasburn.access",
                    "msg": "request",
                    "request_id": rid,
                    "provider": event.provider,
                    "model": event.model,
                    "endpoint": event.endpoint,
                    "status": event.status,
                    "stream": event.stream,
                    "tokens_in": event.tokens_in,
                    "tokens_out": event.tokens_out,
                    "cost_usd": event.cost_usd,
                    "latency_ms": event.latency_ms,
                    "usage": event.usage_source.value,
                    "refused_by": event.refused_by,
                    "app": app,
                    "key_id": key_id,
                    "unit": unit,
                }
            ).decode()  # (every string in it is inert already: proxy.text)
        else:
            line = (
                f"ts={ts} level=info logger=atlasburn.access msg=request request_id={rid}"
                f" provider={_logfmt_value(event.provider)} model={_logfmt_value(event.model)}"
                f" endpoint={_logfmt_value(event.endpoint)} status={event.status}"
                f" stream={'true' if event.stream else 'false'} tokens_in={event.tokens_in}"
                f" tokens_out={event.tokens_out} cost_usd={event.cost_usd!r}"
                f" latency_ms={event.latency_ms} usage={event.usage_source.value}"
                f" refused_by={_logfmt_value(event.refused_by)}"
            )
            if app is not None:
                line += f" app={_logfmt_value(app)}"
            if key_id is not None:
                line += f" key_id={key_id}"
            if unit is not None:
                line += f" unit={_logfmt_value(unit)}"
        self._lines.append(line + "\n")
        if len(self._lines) >= self.FLUSH_LINES:
            self.flush()
