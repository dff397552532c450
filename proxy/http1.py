"""A lean HTTP/1.1 client for the relay's upstream leg: pooled keep-alive connections, one request
written in one ``transport.write``, the answer parsed by llhttp (``httptools``), the body handed
over chunk by chunk as it arrives, with back-pressure.

Why not ``aiohttp.ClientSession``: the relay already has the request as bytes and filtered headers,
and the answer goes out unchanged, so a session's per-request machinery (request and response
objects, multidicts, cookie jar, tracing, payload registry, timeout contexts, the connector's
bookkeeping) is pure cost on the hot path; it was the largest single share of the daemon's CPU per
request (bench/RESULTS.md). The shipper and everything off the hot path still use aiohttp.

What it does and does not do:

- One exchange at a time per connection; a connection goes back to the pool only after its answer
  was read to the end and both sides keep it alive. Idle connections are kept ``keepalive``
  seconds, most recently used first, and closed by a sweep after that.
- At most ``limit`` connections are in use at once; further requests wait for one, at most
  ``pool_timeout`` seconds (then ``PoolTimeout``).
- An answer's head may be at most ``MAX_HEAD_BYTES`` long (1xx interim heads included) with at
  most ``MAX_HEADERS`` header lines; past either, ``AnswerHeadTooLarge`` (Envoy's defaults for
  upstream answers: 60 KiB, 100 headers; nginx: its 4-8 KiB proxy buffer).
- Timeouts: ``connect_timeout`` for TCP + TLS, ``read_timeout`` for silence while the caller waits
  for the head or the next body bytes (never the total time of a long stream; not while the caller
  itself is slow and reading is paused).
- A reused connection that the server closed while it was idle (no byte of the answer received)
  is retried once on a new connection, but only for a request that may be sent twice (an
  idempotent method or an ``Idempotency-Key`` header), the rule Go's net/http uses: a POST that
  may have reached the provider is never sent again.
- Bodies are not decompressed; 1xx interim answers are skipped; an answer to HEAD has no body;
  an upgrade (101) is a protocol error (the relay never asks for one).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, cast

import httptools

HIGH_WATER = 64 * 1024  # bytes buffered before the socket stops being read
MAX_HEAD_BYTES = 64 * 1024  # an answer's head, interim (1xx) heads included
MAX_HEADERS = 128
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_LENGTH = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


class HTTPClientError(Exception):
    """Base of this client's own failures (timeouts are ``TimeoutError``)."""


class ConnectFailed(HTTPClientError):
    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host, self.port, self.error = host, port, error
        super().__init__(f"cannot connect to {host}:{port}: {error.strerror or error!r}")


class ServerClosed(HTTPClientError):
    """The server closed the connection before the answer was complete."""


class ProtocolError(HTTPClientError):
    """The server sent something that is not HTTP/1.1 as this client speaks it."""


class AnswerHeadTooLarge(ProtocolError):
    """The answer's head passed ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``."""


class AnswerTooLarge(ProtocolError):
    """An answer read whole passed the size it was allowed."""


class PoolTimeout(HTTPClientError):
    """No connection came free within the pool's ``pool_timeout``."""


class PoolClosed(HTTPClientError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: Literal["http", "https"]
    host: str
    port: int
    host_header: str  # the Host header: host, [v6], with :port unless the scheme's default

    @classmethod
    def make(cls, scheme: str, host: str, port: int | None) -> Origin:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        default = 443 if scheme == "https" else 80
        real = port or default
        shown = f"[{host}]" if ":" in host else host
        header = shown if real == default else f"{shown}:{real}"
        return cls(scheme, host, real, header)  # type: ignore[arg-type]


class _Conn(asyncio.Protocol):
    """One upstream connection and the state of its current exchange."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.parser: httptools.HttpResponseParser | None = None
        self.write_waiter: asyncio.Future[None] | None = None  # set while the socket is full
        self._reset(False)

    def _reset(self, skip_body: bool) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.head = False  # the final (non-1xx) head has been parsed
        self.complete = False  # the whole answer has been received
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.got_bytes = False
        self.skip_body = skip_body
        self.no_reuse = skip_body  # after a HEAD the parser's framing is not to be trusted
        self.interim = False
        self.head_bytes = 0  # bytes received while the final head was incomplete
        self.header_bytes = 0  # bytes of the header lines parsed (interim heads included)
        self.header_count = 0
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transport is not an asyncio.Transport subclass, but is one in all but name)
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not TCP (a test's unix socket)
                pass

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes nobody asked for (on an idle connection, or after the answer): the framing
            # can no longer be trusted.
            self._fail(ProtocolError("unexpected bytes after the answer"))
            self._close()
            return
        self.got_bytes = True
        self.last_data = self.loop.time()
        try:
            parser.feed_data(data)
            if not self.head:
                # llhttp holds a header's bytes until its line ends: bound what it may hold.
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    raise AnswerHeadTooLarge(f"answer head over {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the server switched protocols"))
            self._close()
        except AnswerHeadTooLarge as exc:
            self._fail(exc)
            self._close()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, AnswerHeadTooLarge):  # raised in on_header
                self._fail(cause)
            else:
                self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))
            self._close()
        else:
            if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        self.resume_writing()
        if self.parser is None or self.complete:
            return  # idle: the pool drops it when it next looks
        if self.head and self._until_close():
            self.on_message_complete()  # a body delimited by the end of the connection
            return
        self._fail(ServerClosed("the server closed the connection" + (f": {exc}" if exc else "")))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: stop parsing
            self.no_reuse = True
            raise ProtocolError("more than one answer to one request")

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > MAX_HEADERS:
            raise AnswerHeadTooLarge(f"answer head over {MAX_HEADERS} headers")
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEAD_BYTES:
            raise AnswerHeadTooLarge(f"answer head over {MAX_HEAD_BYTES} bytes")
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            self.headers = []
            self.reason = ""
            return  # (head_bytes and header_count go on: interim heads count)
        self.status = status
        self.head = True
        if not self.parser.should_keep_alive():  # HTTP/1.0, or Connection: close
            self.no_reuse = True
        if self.skip_body:
            self.on_message_complete()  # an answer to HEAD: headers only, whatever they say
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after an answer to HEAD
            self.no_reuse = True
            return
        self.body.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.complete:
            return
        self.complete = True
        self._drop_timer()
        self._wake()

    # -- the exchange

    def _until_close(self) -> bool:
        """The body ends when the connection does (no length, not chunked)."""
        for name, _ in self.headers:
            low = name.lower()
            if low == "content-length" or low == "transfer-encoding":
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._drop_timer()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _drop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is None or self.complete:
            return
        timeout = self.pool.read_timeout
        assert timeout is not None
        due = self.last_data + timeout
        if self.loop.time() >= due:
            self._fail(TimeoutError("the upstream went silent"))
            self._close()
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    async def wait(self) -> None:
        """Until something happens: bytes, the end, an error, or a read timeout."""
        self.waiter = waiter = self.loop.create_future()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        timeout = self.pool.read_timeout
        if timeout and self.timer is None:
            self.timer = self.loop.call_at(self.last_data + timeout, self._on_timer)
        await waiter

    def send(
        self,
        method: str,
        target: str,
        headers: bytes,
        body: bytes | None,
        length: int | None = -1,
    ) -> None:
        """Write the request head and ``body``. A streamed body (written next, with
        ``write_body``) has ``body=None`` and ``length``: its Content-Length, or None for
        chunked transfer-encoding."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ServerClosed("the server closed the connection")
        if self.paused:  # the last answer ended just as reading was paused
            transport.resume_reading()
        self._drop_timer()
        self._reset(method == "HEAD")
        self.parser = httptools.HttpResponseParser(self)
        start = f"{method} {target} HTTP/1.1\r\nHost: {self.origin.host_header}\r\n"
        if length is None:
            end = b"Transfer-Encoding: chunked\r\n\r\n"
        elif length >= 0:
            end = b"Content-Length: %d\r\n\r\n" % length
        elif body or method not in _NO_LENGTH:
            end = b"Content-Length: %d\r\n\r\n" % (len(body) if body else 0)
        else:
            end = b"\r\n"
        head = start.encode("utf-8", "surrogateescape") + headers + end
        self.last_data = self.loop.time()
        if body:
            if len(body) < 16384:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)

    async def write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream a request body, waiting whenever the socket's buffer is full. Stops early if
        the server already answered (an early error) or failed."""
        for_write = self.transport
        if for_write is None:
            raise ServerClosed("the server closed the connection")
        async for chunk in body:
            if self.head or self.error is not None or for_write.is_closing():
                self.no_reuse = True  # the rest of the body was never sent
                return
            if chunk:
                if chunked:
                    for_write.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    for_write.write(chunk)
            if self.write_waiter is not None:
                await self.write_waiter
        if chunked and not for_write.is_closing():
            for_write.write(b"0\r\n\r\n")
        self.last_data = self.loop.time()  # the read timeout starts when the request is sent

    def pause_writing(self) -> None:
        if self.write_waiter is None:
            self.write_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.write_waiter = self.write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reusable(self, now: float) -> bool:
        return (
            self.transport is not None
            and not self.lost
            and not self.transport.is_closing()
            and now - self.idle_since < self.pool.keepalive
        )


class Response:
    """An upstream answer whose head has arrived; the body is read with ``readany``/``read``.
    Exactly one of ``release`` (read to the end) or ``close`` ends it."""

    __slots__ = ("_conn", "_pool", "status", "reason", "headers", "_lookup", "_done")

    def __init__(self, pool: Pool, conn: _Conn) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers  # in order, repeats kept
        self._lookup: dict[str, str] | None = None
        self._done = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lowercase), or None."""
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = {}
            for key, value in self.headers:
                lookup.setdefault(key.lower(), value)
        return lookup.get(name)

    def coding(self) -> str | None:
        """``Content-Encoding``: every line of it joined, in order (a CDN may add its coding in a
        line of its own; lines of one list header are one list, RFC 9110 section 5.3), or None."""
        values = [value for key, value in self.headers if key.lower() == "content-encoding"]
        return ", ".join(values) if values else None

    @property
    def content_length(self) -> int | None:
        if self.header("transfer-encoding") is not None:
            return None
        raw = self.header("content-length")
        if raw is None or not raw.isdigit():
            return None
        return int(raw)

    async def readany(self) -> bytes:
        """The bytes received since the last call (waiting for some); b"" at the end."""
        conn = self._conn
        while True:
            body = conn.body
            if body:
                data = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                conn.buffered = 0
                return data
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body, whole; ``AnswerTooLarge`` once it passes ``limit`` bytes."""
        parts = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if limit is not None and size > limit:
                raise AnswerTooLarge(f"answer body over {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can be reused."""
        if not self._done:
            self._done = True
            self._pool._release(self._conn)

    def close(self) -> None:
        """Done early: the connection is closed (a half-read answer is never reused)."""
        if not self._done:
            self._done = True
            self._pool._discard(self._conn)


def _may_repeat(method: str, headers: bytes, stream: AsyncIterator[bytes] | None) -> bool:
    """Whether a request may be sent twice: an idempotent method or an Idempotency-Key, and a
    body still at hand. (Asked only on the rare resend, not on every request.)"""
    return stream is None and (method in IDEMPOTENT or b"idempotency-key:" in headers.lower())


class Pool:
    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float | None,
        read_timeout: float | None,
        keepalive: float = 30.0,
        pool_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.pool_timeout = pool_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Conn]] = {}
        self._busy: set[_Conn] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0  # connections ever opened
        self.opened_to: dict[Origin, int] = {}  # by origin (metrics)

    @property
    def in_use(self) -> int:
        return len(self._busy)

    @property
    def idle(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def stats(self) -> dict[str, tuple[int, int, int]]:
        """Per origin ("host:port"): connections in use, idle, and opened since start."""
        out: dict[str, tuple[int, int, int]] = {}
        for origin, opened in self.opened_to.items():
            busy = sum(1 for c in self._busy if c.origin == origin)
            idle = len(self._idle.get(origin, ()))
            out[f"{origin.host}:{origin.port}"] = (busy, idle, opened)
        return out

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: bytes,
        body: bytes | None,
        stream: AsyncIterator[bytes] | None = None,
        length: int | None = None,
    ) -> Response:
        """Send one request and wait for the head of its answer. ``headers`` are the header
        lines (``Name: value\\r\\n`` each) without Host and Content-Length, which this adds.
        The body is ``body``, or ``stream`` (of ``length`` bytes; chunked when None), sent as
        it is produced; an exception from ``stream`` aborts the request."""
        while True:
            conn = await self._acquire(origin)
            try:
                if stream is None:
                    conn.send(method, target, headers, body)
                else:
                    conn.send(method, target, headers, None, length)
                    await conn.write_body(stream, length is None)
                while not conn.head:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait()
            except ServerClosed:
                self._discard(conn)
                if conn.reused and not conn.got_bytes and _may_repeat(method, headers, stream):
                    continue  # closed while idle: the request never reached a live server
                raise
            except BaseException:
                self._discard(conn)
                raise
            return Response(self, conn)

    async def _acquire(self, origin: Origin) -> _Conn:
        if self._closed:
            raise PoolClosed("the upstream pool is closed")
        if len(self._busy) >= self.limit:
            try:
                async with asyncio.timeout(self.pool_timeout):
                    await self._wait_for_room()
            except TimeoutError:
                raise PoolTimeout(
                    f"no upstream connection came free within {self.pool_timeout:g}s "
                    f"({self.limit} in use: upstream.max_connections)"
                ) from None
        idle = self._idle.get(origin)
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if conn.reusable(now):
                    conn.reused = True
                    self._busy.add(conn)
                    return conn
                conn._close()
        conn = _Conn(self, origin)
        self._busy.add(conn)  # counts against the limit while it connects
        try:
            await self._connect(conn)
        except BaseException:
            self._busy.discard(conn)
            self._wake_waiter()
            conn._close()
            raise
        self.opened += 1
        self.opened_to[origin] = self.opened_to.get(origin, 0) + 1
        return conn

    async def _wait_for_room(self) -> None:
        while len(self._busy) >= self.limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_waiter()  # woken for a free connection, but leaving: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._closed:
                raise PoolClosed("the upstream pool is closed")

    async def _connect(self, conn: _Conn) -> None:
        origin = conn.origin
        tls = origin.scheme == "https"
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=self._ssl if tls else None,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise TimeoutError(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(origin.host, origin.port, exc) from None

    def _release(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        if (
            self._closed
            or conn.no_reuse
            or not conn.complete
            or conn.parser is None
            or conn.transport is None
            or conn.transport.is_closing()
        ):
            conn._close()
        else:
            conn.parser = None
            conn.idle_since = self.loop.time()
            self._idle.setdefault(conn.origin, []).append(conn)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self.keepalive, self._sweep)
        self._wake_waiter()

    def _discard(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        conn._drop_timer()
        conn._close()
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for longer than ``keepalive``."""
        self._sweeper = None
        now = self.loop.time()
        for origin, conns in list(self._idle.items()):
            keep = [c for c in conns if c.reusable(now)]
            for c in conns:
                if c not in keep:
                    c._close()
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        if self._idle:
            self._sweeper = self.loop.call_later(self.keepalive / 2, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn._close()
        self._idle.clear()
        for conn in list(self._busy):
            conn._fail(PoolClosed("the upstream pool is closed"))
            conn._close()
        self._busy.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports run connection_lost
