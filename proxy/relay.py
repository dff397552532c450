"""The forwarding handler, the daemon's hot path: route, read, describe, relay, meter, record.

The response goes back to the client as the provider sent it: same status, same end-to-end headers,
same bytes, chunk by chunk as they arrive (every write awaited, so a slow reader slows the upstream
read instead of filling memory). The client session never decompresses, so a compressed body keeps
its ``Content-Encoding`` and ``Content-Length``; the meter reads a decoded copy on the side.

Exactly one event is recorded per relayed request, after the last byte was sent (or the exchange
ended early), from the ``finally`` of ``Relay.handle``; nothing here waits for the disk.

Client disconnects: the server runs with ``handler_cancellation=True``, so a client that goes away
cancels this handler; the ``finally`` closes the upstream connection at once and records what was
seen as partial usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable

import aiohttp
from aiohttp import hdrs, web

from .adapters import ADAPTERS
from .adapters.base import Meter, Metered, RequestMeta, Usage, UsageSource, loads
from .config import Config
from .errors import UpstreamError, UpstreamTimeout
from .events import Event, Recorder, iso_ms
from .fingerprint import fingerprint
from .headers import REQUEST_DROP, RESPONSE_DROP, filter_headers
from .routes import BadPath, Route, Router

log = logging.getLogger(__name__)

# A non-streamed answer up to this size is read whole and sent in one write; larger bodies and
# streams are relayed chunk by chunk.
BUFFER_LIMIT = 4 * 1024 * 1024

# aiohttp would otherwise add these when the client did not send them, changing the request.
SKIP_AUTO_HEADERS = frozenset(
    {hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE}
)

_NO_USAGE = Metered(None, None)
CLIENT_CLOSED = 499


class BodyTooLarge(Exception):
    pass


class Relay:
    """Relays requests to the configured upstreams and records one event for each."""

    def __init__(self, config: Config, session: aiohttp.ClientSession, record: Recorder) -> None:
        self.router = Router(config.providers)
        self.session = session
        self.record = record
        self.max_body = config.server.max_body_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        t0 = time.perf_counter()
        rel = request.rel_url
        try:
            route = self.router.resolve(rel.raw_path)
        except BadPath:
            return _plain_error(400, "bad_path", "the request path has '.' or '..' segments")
        if route is None:
            return _plain_error(
                404,
                "no_route",
                f"no provider serves {rel.path!r}; use /<provider>/... or /v1/...",
            )
        upstream = route.upstream
        adapter = upstream.adapter
        try:
            body = await _read_body(request, self.max_body)
        except BodyTooLarge:
            resp = _error(route, 413, "body_too_large", f"request body over {self.max_body} bytes")
            resp.force_close()  # the rest of the body is not read
            return resp

        parsed = loads(body) if body else None
        meta = adapter.describe(route.path, parsed)
        canonical = meta.canonical if parsed is not None else None
        fp = fingerprint(upstream.kind, meta.endpoint, canonical, body)

        status = 0  # the status the client got; 0 until an answer is under way
        metered = _NO_USAGE
        complete = False
        meter: Meter | None = None
        up: aiohttp.ClientResponse | None = None
        try:
            try:
                up = await self._send(request, route, body)
            except UpstreamTimeout as exc:
                status = 504
                return _error(route, 504, "upstream_timeout", str(exc))
            except UpstreamError as exc:
                status = 502
                return _error(route, 502, "upstream_unreachable", str(exc))

            content_type = up.headers.get(hdrs.CONTENT_TYPE, "")
            meter = adapter.meter(meta, content_type)
            tap = _tap(meter, up.headers.get(hdrs.CONTENT_ENCODING))
            headers = filter_headers(
                up.headers.items(), up.headers.get(hdrs.CONNECTION), RESPONSE_DROP
            )
            length = up.content_length
            if (
                length is not None
                and length <= BUFFER_LIMIT
                and request.method != hdrs.METH_HEAD
                and not content_type.startswith("text/event-stream")
            ):
                try:
                    data = await up.read()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
                    return _error(route, status, "upstream_cut", _describe(exc, upstream.name))
                tap(data)
                whole = web.Response(status=up.status, reason=up.reason, headers=headers)
                whole.body = data
                status = up.status
                await whole.prepare(request)
                await whole.write_eof()
                complete = True
                return whole

            response = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
            status = up.status
            await response.prepare(request)
            read = up.content.readany
            while True:
                try:
                    chunk = await read()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    _abort_client(request, upstream.name, exc)
                    return response
                if not chunk:
                    break
                tap(chunk)
                await response.write(chunk)  # a client that went away raises here
            await response.write_eof()
            complete = True
            return response
        finally:
            if up is not None and not complete:
                up.close()  # never return a half-read connection to the pool
            if meter is not None:
                try:
                    metered = meter.result()
                except Exception:  # a meter bug must not cost the request its event
                    log.exception("usage meter failed for %s %s", upstream.name, meta.endpoint)
            # A client that left before any answer still cost a request upstream: 499, as nginx
            # logs it.
            self.record(
                _event(started, t0, route, meta, status or CLIENT_CLOSED, metered, complete, fp)
            )

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an announced oversized body before the client sends
        it (curl asks this way for any body over 1 MiB), else let the client go on."""
        length = request.content_length
        if length is not None and length > self.max_body:
            try:
                route = self.router.resolve(request.rel_url.raw_path)
            except BadPath:
                route = None
            message = f"request body over {self.max_body} bytes"
            if route is None:
                resp = _plain_error(413, "body_too_large", message)
            else:
                resp = _error(route, 413, "body_too_large", message)
            resp.force_close()
            return resp
        if request.version == aiohttp.HttpVersion11:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(text="only 'Expect: 100-continue' is supported")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def _send(
        self, request: web.Request, route: Route, body: bytes
    ) -> aiohttp.ClientResponse:
        """Send the request upstream; transport failures become UpstreamError/UpstreamTimeout."""
        upstream = route.upstream
        headers = filter_headers(
            request.headers.items(), request.headers.get(hdrs.CONNECTION), REQUEST_DROP
        )
        try:
            return await self.session.request(
                request.method,
                upstream.url(route.path, request.rel_url.raw_query_string),
                headers=headers,
                data=body if body or request.body_exists else None,
                allow_redirects=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(_describe(exc, upstream.name)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(_describe(exc, upstream.name)) from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or BodyTooLarge as soon as it is known to pass ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    if not request.body_exists:
        return b""
    if length is not None:
        return await request.content.readexactly(length)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _tap(meter: Meter, encoding: str | None) -> Callable[[bytes], None]:
    """A function that feeds the meter a decoded copy of each body chunk and never raises."""
    broken = False
    decode: Callable[[bytes], bytes] | None = None
    try:
        decode = _decoder(encoding)
    except ValueError as exc:
        log.warning("cannot meter a response body: %s", exc)
        broken = True

    def tap(chunk: bytes) -> None:
        nonlocal broken
        if broken:
            return
        try:
            meter.feed(decode(chunk) if decode is not None else chunk)
        except Exception:
            broken = True
            log.warning("cannot meter a response body (encoding %r)", encoding, exc_info=True)

    return tap


def _decoder(encoding: str | None) -> Callable[[bytes], bytes] | None:
    enc = (encoding or "").strip().lower()
    if not enc or enc == "identity":
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if enc == "deflate":
        return _Inflate().decompress
    try:
        import brotli  # type: ignore[import-not-found]  # optional, as in aiohttp
    except ImportError:
        brotli = None
    if enc == "br" and brotli is not None:
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    raise ValueError(f"unsupported content-encoding {enc!r}")


class _Inflate:
    """``deflate`` is zlib-wrapped per the RFC, but some servers send raw deflate: accept both."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj()
        self._started = False

    def decompress(self, data: bytes) -> bytes:
        if not self._started:
            self._started = True
            try:
                return self._obj.decompress(data)
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._obj.decompress(data)


def _event(
    started: float,
    t0: float,
    route: Route,
    meta: RequestMeta,
    status: int,
    metered: Metered,
    complete: bool,
    fp: str,
) -> Event:
    usage = metered.usage
    if usage is not None:
        source = UsageSource.REPORTED
    else:
        usage = Usage()
        source = UsageSource.MISSING if complete else UsageSource.PARTIAL
    return Event(
        ts=iso_ms(started),
        provider=route.upstream.name,
        model=meta.model or metered.model or "",
        endpoint=meta.endpoint,
        status=status,
        tokens_in=usage.input_tokens,
        tokens_out=usage.output_tokens,
        cost_usd=0.0,
        latency_ms=round((time.perf_counter() - t0) * 1000),
        fingerprint=fp,
        stream=meta.stream,
        usage_source=source,
        priced=False,
    )


def _abort_client(request: web.Request, provider: str, exc: BaseException) -> None:
    """The upstream failed mid-answer: end the client's connection without a clean end of body,
    so the client sees a truncated response (as it would talking to the provider) instead of a
    stream that looks complete."""
    log.warning("upstream %s failed mid-response: %s", provider, _describe(exc, provider))
    transport = request.transport
    if transport is not None:
        transport.close()


def _describe(exc: BaseException, provider: str) -> str:
    """A message for a transport failure that names no URL (a query may carry a key)."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"upstream {provider} timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to upstream {provider} ({exc.host}:{exc.port}): {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"upstream {provider} closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"upstream {provider} sent a truncated or malformed body"
    return f"upstream {provider} failed: {type(exc).__name__}"


def _error(route: Route, status: int, code: str, message: str) -> web.Response:
    """An error the daemon itself answers, in the provider's own error shape."""
    body = route.upstream.adapter.error_body(status, message, code)
    return web.Response(status=status, body=body, content_type="application/json")


def _plain_error(status: int, code: str, message: str) -> web.Response:
    """An error for a request no provider owns (OpenAI's shape, the most widely parsed)."""
    body = ADAPTERS["openai"].error_body(status, message, code)
    return web.Response(status=status, body=body, content_type="application/json")
