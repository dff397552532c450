"""The client side of every connection: aiohttp's connection handler with the daemon's limits.

aiohttp reads requests well but bounds little: an idle keep-alive connection lives an hour, a
request head or body may trickle in forever, any number of connections may be open, and a
graceful stop waits twice its timeout. Every read from a client is bounded here, the way nginx
bounds it:

- Head. A request head must arrive whole within ``header_timeout`` of its first byte (or, on a
  new connection, of the connection itself): a client that sends one byte every few seconds is
  closed (nginx's ``client_header_timeout``). Heads that are too large get 414/431 (JSON).
- Body. A body may pause at most ``body_timeout`` between two reads (nginx's
  ``client_body_timeout``), and must keep an average pace of ``BODY_MIN_RATE`` bytes a second
  after that first allowance (Apache's ``mod_reqtimeout``: ``body=20,MinRate=500``): one byte
  every few seconds is not a body. Time the daemon itself stopped reading (back-pressure from a
  slow provider) never counts against the client. The handler reading the body gets
  ``ClientBodyTimeout`` and answers 408.
- Idle. A keep-alive connection waits at most ``keepalive_timeout`` for its next request
  (nginx's ``keepalive_timeout``); once its first byte is in, the head timeout applies instead.
- Answer. A client that takes no byte of its answer for ``send_timeout`` while the daemon has
  some waiting for it is closed (nginx's ``send_timeout``): a client that stops reading a stream
  would otherwise hold its connection to the provider for as long as it likes. Its request is
  recorded like any client that left.
- Count. At most ``max_connections`` client connections are open. A new connection past the
  bound closes the oldest idle keep-alive connection, else the one that has been slow for the
  longest: still sending its head, or sending its body below the minimum pace, after
  ``SLOW_GRACE`` (a slow client's, most likely an attack's), else the one whose client has not
  taken its answer for the longest (over ``SLOW_GRACE``), else the body arriving slowest (at any
  pace: a client on this host sends a body in milliseconds, and bodies paced just above the
  minimum must not lock everyone out). A connection whose request is read and being answered
  to a client that takes it is never closed for room, so when every one is busy the new
  connection gets a 503 with ``Retry-After: 1`` (which the SDKs retry) and is closed. The
  default bound comes from the open-file limit: half of it (each request under way also holds a
  connection to the provider), at most 4,096.
- WebSockets. Once a connection is upgraded (``proxy.websocket``), its frames are neither a
  request head nor a body: only the answer deadline (``send_timeout``) applies; a session may be
  quiet for as long as both sides like.
- Stop. A graceful stop gives in-flight requests ``shutdown_grace_seconds`` in all, then cancels
  them (each still records its event) and closes.

One timer per connection watches the head and body deadlines; it is armed when a head or body
begins and re-armed only when it fires early, so a request costs a clock read per socket read
and at most two timer handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .api import error
from .attribution import Process
from .attribution.process import ProcessFinder
from .config import ServerConfig
from .errors import ClientBodyTimeout
from .metrics import Metrics

log = logging.getLogger(__name__)

# Limits of the request head. A request line longer than MAX_LINE is 414; a header line longer
# than MAX_FIELD, or more than MAX_HEADERS headers, is 431. (Different numbers: aiohttp's parser
# raises the same exception for both, with the limit it hit.)
MAX_LINE = 16384
MAX_FIELD = 8190
MAX_HEADERS = 128
# A request body is read from the socket until this much (x2) waits unread: with large uploads
# streamed upstream, this (not the body size) is what each one holds.
READ_BUFFER = 16384
# A body must average at least this many bytes a second once its first body_timeout is over.
BODY_MIN_RATE = 500
# A request head or body is judged slow, for making room, once it has been arriving this long
# (seconds): a newcomer does not close the one that opened, or sent its head, a moment before.
SLOW_GRACE = 1.0
# A connection refused for room is answered 503 and closed once the client closed its side, or
# after this many seconds.
REFUSED_LINGER = 1.0
# After the grace period, a cancelled request may take this long to record its event.
CANCEL_GRACE = 1.0
# File descriptors kept aside from the client connections' share: the listener, the store and
# its WAL, logs, the shipper, idle upstream connections beyond the busy ones.
RESERVED_FDS = 64
# The derived bound stops here (systemd's hard limit of 524,288 would allow 262,112 connections,
# each a few KiB of buffers): four times the default upstream pool, for keep-alive clients.
AUTO_MAX_CONNECTIONS = 4096


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go's runtime and
    HAProxy do: the soft 1,024 of many systems is a leftover of select()); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a container may refuse: keep what we have
            pass
    return soft


def client_connection_limit(configured: int) -> int:
    """``server.max_client_connections``, or (0) half the open files this process may have, at
    most ``AUTO_MAX_CONNECTIONS``."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1_048_576
    return max(16, min(AUTO_MAX_CONNECTIONS, (soft - RESERVED_FDS) // 2))


class _Limits:
    """What every connection of one server shares: the timeouts, the open connections (oldest
    first) and their bound, and what the limits did (for /metrics and the log)."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.open: dict[_Handler, None] = {}
        self._warned = 0.0
        # Set to look up each loopback client's process (``proxy.attribution.process``).
        self.finder: ProcessFinder | None = None
        self.configure(config)

    def configure(self, config: ServerConfig) -> None:
        """What a reload changes (connections already open keep their armed deadlines)."""
        self.header_timeout = config.header_timeout_seconds
        self.body_timeout = config.body_timeout_seconds
        self.send_timeout = config.send_timeout_seconds
        self.max_connections = client_connection_limit(config.max_client_connections)

    def hit(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.limit_hit(limit)

    def admit(self, new: _Handler) -> None:
        """Count a new connection; past the bound, close one to make room."""
        self.open[new] = None
        if len(self.open) <= self.max_connections:
            return
        # The oldest idle connection; else the one slow for the longest (its head, or its body
        # below the minimum pace, for over SLOW_GRACE); else the one whose client has taken
        # none of its answer for the longest; else the slowest body.
        idle: _Handler | None = None
        slow: _Handler | None = None
        paced: _Handler | None = None
        stalled: _Handler | None = None
        idle_at = slow_at = stalled_at = float("inf")
        paced_rate = float("inf")
        now = new.last_rx
        for conn in self.open:
            if conn is new:
                continue
            if conn.is_idle():
                if conn.last_rx < idle_at:
                    idle, idle_at = conn, conn.last_rx
            elif conn.head_since is not None and not conn.busy():
                if conn.head_since < min(slow_at, now - SLOW_GRACE):
                    slow, slow_at = conn, conn.head_since
            elif (rate := conn.body_rate(now)) is not None and rate < BODY_MIN_RATE:
                if conn.body_since < slow_at:
                    slow, slow_at = conn, conn.body_since
            elif idle is None and slow is None:
                since = conn.paused_since
                if since is not None and since < min(stalled_at, now - SLOW_GRACE):
                    stalled, stalled_at = conn, since
                if rate is not None and rate < paced_rate:
                    paced, paced_rate = conn, rate
        victim, why = new, "every connection busy"
        if idle is not None:
            victim, why = idle, "idle"
        elif slow is not None:
            victim, why = slow, "slow"
        elif stalled is not None:
            victim, why = stalled, "a client not taking its answer"
        elif paced is not None:
            victim, why = paced, f"a body arriving at {paced_rate:.0f} bytes/s"
        self.hit("client_connections")
        clock = time.monotonic()
        if clock - self._warned >= 60:
            self._warned = clock
            log.warning(
                "client connections at server.max_client_connections (%d): closing one (%s); "
                "further closings this minute are counted in atlasburn_limit_hits_total",
                self.max_connections,
                why,
            )
        if victim is new:
            new.refuse(self.max_connections)
        else:
            victim.force_close()
        self.open.pop(victim, None)

    def gone(self, conn: _Handler) -> None:
        self.open.pop(conn, None)


_REFUSED_HEAD = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
)


class _Handler(RequestHandler):
    """aiohttp's connection handler with the deadlines described above, a graceful stop with one
    deadline, and errors about the request head that say what went wrong, in JSON: 414 and 431
    instead of a plain-text 400."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = manager.limits
        self.head_since: float | None = None  # a request head is (or may be) on its way
        self.last_rx = 0.0  # when bytes last arrived
        self._body: StreamReader | None = None  # the current request's unfinished body
        self.body_since = 0.0  # when it began (moved on by the time reading was paused)
        self._body_bytes = 0
        self._paused_at: float | None = None  # when the daemon stopped reading it
        self._unsent = 0  # bytes waiting for the client when writing was last seen to progress
        self._sent_at: float | None = None  # when that was (None: the client takes what it gets)
        self.paused_since: float | None = None  # when writing last paused (None: flowing)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._close_when_done = False  # the request's answer is the connection's last
        # The client's process (loopback clients, when the limits have a finder): a future, done
        # once the lookup (in a thread, started with the connection) is; None without a finder.
        self.process: asyncio.Future[Process | None] | None = None

    # -- states

    def busy(self) -> bool:
        return self._request_in_progress or bool(self._messages)

    def is_idle(self) -> bool:
        """A keep-alive connection between requests, with no byte of the next one: aiohttp
        waits for its next request (not a request read and about to be handled)."""
        waiter = self._waiter
        return (
            self.head_since is None
            and waiter is not None
            and not waiter.done()
            and not self.busy()
            and self._request_count > 0
        )

    def body_rate(self, now: float) -> float | None:
        """Bytes a second the current request body has averaged since its head (the daemon's
        own pauses left out); None when no body is arriving, or for its first ``SLOW_GRACE``.
        For making room, under ``BODY_MIN_RATE`` is slow (the first ``body_timeout``'s
        allowance does not apply)."""
        body = self._body
        if body is None or body.is_eof() or self._paused_at is not None:
            return None
        elapsed = now - self.body_since
        return self._body_bytes / elapsed if elapsed >= SLOW_GRACE else None

    def refuse(self, limit: int) -> None:
        """Answer a connection there is no room for with a 503 (JSON, ``Retry-After: 1``),
        whatever it sends, and close it: at once for sending, after ``REFUSED_LINGER`` seconds
        at most for reading (what it sends meanwhile is dropped; closing with its request
        unread would reset the connection, and the client could lose the answer)."""
        self._force_close = True  # aiohttp reads no request from it
        transport = self.transport
        if transport is not None:
            body = orjson.dumps(
                {
                    "error": {
                        "code": "too_many_connections",
                        "message": f"the daemon has server.max_client_connections ({limit})"
                        " client connections open, each one busy; retry shortly",
                    }
                }
            )
            transport.write(_REFUSED_HEAD % len(body) + body)
            if transport.can_write_eof():
                transport.write_eof()
            self._loop.call_later(REFUSED_LINGER, transport.close)

    # -- aiohttp's hooks

    async def start(self) -> None:
        await super().start()
        # aiohttp leaves the transport to whoever set _force_close; here that is the timer,
        # which let the handler answer first (408).
        if self._close_when_done and self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_rx = now = self._loop.time()
        self.head_since = now  # the first request's head is due within header_timeout
        self._arm(now + self.limits.header_timeout)
        self.limits.admit(self)
        finder = self.limits.finder
        if finder is not None:  # only schedules: the lookup runs in the finder's thread
            self.process = finder.lookup(
                transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        self.limits.gone(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close:  # closing (or refused): nothing more is read
            return
        if not data:  # aiohttp re-parses what it holds after a pause: nothing arrived
            super().data_received(data)
            return
        self.last_rx = now = self._loop.time()
        if self._upgraded:  # a WebSocket since its handshake: frames are no request head or body
            super().data_received(data)
            return
        body = self._body
        if body is not None and not body.is_eof():
            self._body_bytes += len(data)
        elif self.head_since is None:  # the first byte of a request head
            self.head_since = now
            self._arm(now + self.limits.header_timeout)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a head arrived whole
            self.head_since = None
            payload = self._messages[-1][1]
            if isinstance(payload, StreamReader) and not payload.is_eof():
                self._body = payload
                self.body_since = now
                self._body_bytes = 0
                self._paused_at = None
                self._arm(now + self.limits.body_timeout)

    def pause_reading(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._resumed()
        super().resume_reading(resume_parser)

    def _resume_reading_for_buffer(self) -> None:
        self._resumed()
        super()._resume_reading_for_buffer()

    def _pause_reading_for_buffer(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._loop.time()
        super()._pause_reading_for_buffer()

    def pause_writing(self) -> None:
        super().pause_writing()
        now = self._loop.time()
        self.paused_since = now
        self._sent_at = now
        self._unsent = self._write_buffer()
        self._arm(now + self.limits.send_timeout)

    def resume_writing(self) -> None:
        self._sent_at = self.paused_since = None
        super().resume_writing()

    def _write_buffer(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _resumed(self) -> None:
        if self._paused_at is not None:
            now = self._loop.time()
            self.body_since += now - self._paused_at  # the daemon's pause is not the client's
            self.last_rx = max(self.last_rx, now)
            self._paused_at = None

    def _process_keepalive(self) -> None:
        # aiohttp's idle timeout also closes a connection whose next request head has begun to
        # arrive; from the first byte on, the head timeout decides instead.
        if self.head_since is None:
            super()._process_keepalive()
        else:
            self._keepalive_handle = None

    # -- the deadline timer

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return  # it fires first and re-arms for what is due then
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self._force_close:
            return
        now = self._loop.time()
        limits = self.limits
        if self._sent_at is not None:  # the client is not taking its answer as fast as it comes
            unsent = self._write_buffer()
            if unsent < self._unsent:  # it took some since: progress
                self._unsent, self._sent_at = unsent, now
            elif now >= self._sent_at + limits.send_timeout:
                limits.hit("send_timeout")
                log.info(
                    "closed a connection from %s: it took none of its answer for %gs",
                    self._peer(),
                    limits.send_timeout,
                )
                # abort, not close: close would wait for the unsent answer to be taken first;
                # and a reset (SO_LINGER 0), not a FIN: the kernel would otherwise keep the
                # unsent bytes, and retry them, for minutes after the socket is closed.
                transport = self.transport
                if transport is not None:
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    transport.abort()
                self.force_close()
                return
            self._arm(self._sent_at + limits.send_timeout)
        if self.head_since is not None:
            due = self.head_since + limits.header_timeout
            if now >= due:
                limits.hit("header_timeout")
                log.info(
                    "closed a connection from %s: no whole request head within %gs",
                    self._peer(),
                    limits.header_timeout,
                )
                self.force_close()
            else:
                self._arm(due)
            return
        body = self._body
        if body is None or body.is_eof():
            self._body = None
            return  # between requests (aiohttp's idle timeout) or waiting on the provider
        if self._paused_at is not None:  # the daemon is not reading: nothing is due
            self._arm(now + limits.body_timeout)
            return
        silent = self.last_rx + limits.body_timeout
        slow = self.body_since + limits.body_timeout + self._body_bytes / BODY_MIN_RATE
        due = min(silent, slow)
        if now < due:
            self._arm(due)
            return
        limits.hit("body_timeout")
        why = (
            f"no request body bytes for {limits.body_timeout:g}s"
            if silent <= slow
            else f"request body slower than {BODY_MIN_RATE} bytes/s"
        )
        log.info("timed out a request body from %s: %s", self._peer(), why)
        self._body = None
        if self._request_in_progress:
            body.set_exception(ClientBodyTimeout(why))  # the handler answers 408
            # ... and the connection closes after it: aiohttp would otherwise linger to read
            # the rest of the body, get the same exception and log it as unhandled.
            self._force_close = self._close_when_done = True
        else:
            self.force_close()  # nobody reads it (a body after an answer)

    def _peer(self) -> str:
        peer = self.peername
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- a graceful stop with one deadline

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Stop this connection: a request under way gets ``timeout`` seconds to finish, then is
        cancelled and gets ``CANCEL_GRACE`` to record its event. (aiohttp's own waits
        ``timeout`` for the request and then ``timeout`` again for the cancelled handler.)"""
        self._force_close = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._request_in_progress:
            self._handler_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._handler_waiter
            except TimeoutError:
                self._handler_waiter = None
        task = self._task_handler
        if self._current_request is not None:
            self._current_request._cancel(asyncio.CancelledError())
        if task is not None and not task.done():
            task.cancel()  # the request's handler with it: its cleanup records the event
            await asyncio.wait({task}, timeout=CANCEL_GRACE)
        self.force_close()

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        # A target that is not a path (CONNECT host:port, OPTIONS *, an absolute URL) matches
        # no route: aiohttp's own answer would be text, and CONNECT's connection stay open.
        if not request.rel_url.path.startswith("/"):
            request_handler = _not_a_path
        return await super()._handle_request(request, start_time, request_handler)

    # -- errors about the request head

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            if exc.args[1:2] == (MAX_LINE,):
                status, code, text = 414, "uri_too_long", f"request line over {MAX_LINE} bytes"
            else:
                status, code = 431, "header_fields_too_large"
                text = f"a request header over {MAX_FIELD} bytes"
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status, code, text = 431, "header_fields_too_large", f"over {MAX_HEADERS} headers"
        else:
            code, text = "bad_request", f"malformed HTTP request: {message or exc}"
        # The log names the kind of error only: the parser's message may quote the request.
        log.info("refused a malformed request from %s: %s", request.remote, code)
        resp = error(status, code, text)
        resp.force_close()
        return resp


async def _not_a_path(request: BaseRequest) -> web.StreamResponse:
    resp = error(
        400,
        "bad_request",
        "the request target must be a path (/v1/..., /<provider>/...): this daemon is not a"
        " forward proxy",
    )
    resp.force_close()
    return resp


class _Server(web.Server):
    limits: _Limits

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """aiohttp's AppRunner, serving through ``_Handler`` with the limits of ``config``."""

    def __init__(self, app: web.Application, config: ServerConfig, metrics: Metrics) -> None:
        super().__init__(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_grace_seconds,
            keepalive_timeout=config.keepalive_timeout_seconds,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            read_bufsize=READ_BUFFER,
            # Request bodies are relayed as the client encoded them; the relay reads a bounded
            # decoded copy for itself (aiohttp would inflate them without a bound).
            auto_decompress=False,
        )
        self.limits = _Limits(config, metrics)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, making _Handler connections
        server.limits = self.limits  # type: ignore[attr-defined]
        return server

    @property
    def client_connections(self) -> int:
        return len(self.limits.open)
