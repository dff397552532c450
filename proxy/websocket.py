"""WebSocket upgrades (the OpenAI Realtime API, ``GET /v1/realtime?model=...``): relayed to the
configured upstream frame for frame, and metered as one event per session.

Routing is the relay's: the path picks the provider (``routes``), never a ``Host`` header or an
absolute URL, and the upstream URL is built from the configured origin. The client's end-to-end
headers go upstream as for any request (its ``Authorization`` among them), without the hop-by-hop
ones, the client's own ``Sec-WebSocket-*`` handshake (the daemon's connection upstream makes its
own; the subprotocols the client offers are offered upstream, and the one the upstream picks is
the one the client gets) and ``AtlasBurn-API-Key``.

Order: the kill flag is checked before anything is sent upstream (a refusal is the usual 429 in
the provider's shape); then the daemon opens the upstream WebSocket, and only once the upstream
answered 101 does the client get its 101. A handshake the upstream refuses reaches the client as
the upstream's HTTP answer (status, end-to-end headers and a body of at most
``REFUSED_BODY_LIMIT`` bytes); an upstream that cannot be reached is a 502/504 in the provider's
shape.

Relay: text, binary, ping and pong messages go across unchanged, each awaited before the next is
read, so a side that does not read slows the other down (the TCP window), and no message larger
than ``server.max_body_bytes`` is accepted from either side (the side that sent it is closed
with 1009). When either side sends a close frame, its code and reason go to the other side,
whose close answers it; when a side fails (its connection lost, a protocol error, a message too
large), the other side is closed too (1014 "bad gateway" towards the client, 1001 towards the
upstream).
A stopping daemon closes every session with 1001 before it waits for in-flight requests.

Metering: the server's text frames feed a ``RealtimeMeter`` (``adapters.realtime``); one event is
recorded per session, as soon as one side closed or failed (before the closing handshakes, so it
is there by the time the client sees its close): endpoint ``/realtime``, status 101, latency the
session's duration, tokens summed over every ``response.done``. A session that ended abnormally
records what it had seen, marked partial; a session upgraded whose usage is missing or partial
is of unknown cost (``Event.usage_unknown``), as a plain request is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from .adapters.base import UsageSource
from .adapters.realtime import RealtimeMeter
from .attribution import Attributes, with_process
from .config import Config
from .events import Event, iso_ms
from .fingerprint import fingerprint
from .headers import REQUEST_DROP, filter_headers, is_own, without_session
from .routes import Route
from .text import inert

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger(__name__)

# The body of a handshake the upstream refused, relayed up to this size (an error in JSON).
REFUSED_BODY_LIMIT = 64 * 1024
# Seconds a closing handshake may take on each side before its connection is closed anyway.
CLOSE_TIMEOUT = 5.0
# The handshake headers each hop makes for itself.
_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_RESPONSE_DROP = frozenset({"content-length", "content-type", "date", "server"}) | _HANDSHAKE
_FORWARDED = {
    "keep": frozenset[str](),
    "drop": frozenset({"x-forwarded-for", "forwarded", "x-real-ip"}),
    "append": frozenset({"x-forwarded-for"}),
}
ENDPOINT_FALLBACK = "/realtime"


def is_upgrade(request: web.Request) -> bool:
    """A WebSocket handshake: ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade``
    (any other upgrade, or one on another method, stays plain HTTP: Upgrade is hop-by-hop)."""
    if request.method != hdrs.METH_GET:
        return False
    upgrade = request.headers.get(hdrs.UPGRADE, "")
    if "websocket" not in {t.strip().lower() for t in upgrade.split(",")}:
        return False
    connection = request.headers.get(hdrs.CONNECTION, "")
    return "upgrade" in {t.strip().lower() for t in connection.split(",")}


class _Redirected(Exception):
    """The upstream answered the handshake with a redirect: relayed, never followed."""


class _Handshakes:
    """What each upstream handshake answered, keyed by the task that made it: aiohttp's
    ``ws_connect`` raises on a refusal with the status and headers only, so the body is read
    here, from the request tracing hook that sees the response first. ``ws_connect`` follows
    redirects (it has no switch for it): the redirect hook stops it with ``_Redirected``."""

    def __init__(self) -> None:
        self.seen: dict[asyncio.Task[Any] | None, tuple[int, str, list[tuple[str, str]], bytes]]
        self.seen = {}
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(self._ended)
        self.trace.on_request_redirect.append(self._redirected)

    async def _redirected(
        self,
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestRedirectParams,
    ) -> None:
        try:
            await self._ended(session, ctx, params)  # type: ignore[arg-type]
        finally:
            params.response.close()
        raise _Redirected

    async def _ended(
        self,
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        response = params.response
        body = b""
        if response.status != 101:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                while len(body) < REFUSED_BODY_LIMIT:
                    chunk = await response.content.read(REFUSED_BODY_LIMIT - len(body))
                    if not chunk:
                        break
                    body += chunk
        headers = [(k, v) for k, v in response.headers.items()]
        self.seen[asyncio.current_task()] = (response.status, response.reason or "", headers, body)

    def pop(self) -> tuple[int, str, list[tuple[str, str]], bytes] | None:
        return self.seen.pop(asyncio.current_task(), None)


class WebSocketRelay:
    """Relays WebSocket sessions for the ``Relay`` (its routes, guardrails, pricer, recorder)."""

    def __init__(self, relay: Relay, config: Config) -> None:
        self.relay = relay
        self.max_message = config.server.max_body_bytes
        self.forwarded_for = config.server.forwarded_for
        self.handshakes = _Handshakes()
        up = config.upstream
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            # Connecting and the handshake are bounded; a session may then be silent for as
            # long as both sides like (the provider ends idle sessions itself).
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=up.connect_timeout_seconds,
                sock_read=up.read_timeout_seconds,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            # Nothing added that the client did not send (aiohttp would add its own User-Agent,
            # Accept and Accept-Encoding).
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING),
            trace_configs=[self.handshakes.trace],
        )
        self.open: set[web.WebSocketResponse] = set()

    def configure(self, config: Config) -> None:
        self.max_message = config.server.max_body_bytes
        self.forwarded_for = config.server.forwarded_for

    async def close(self) -> None:
        await self.session.close()

    async def shutdown(self) -> None:
        """The daemon is stopping: close every session (1001) instead of waiting for it."""
        for ws in list(self.open):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon stopping")

    async def handle(
        self,
        request: web.Request,
        route: Route,
        started: float,
        t0: float,
        attributes: Attributes | None = None,
    ) -> web.StreamResponse:
        relay = self.relay
        upstream = route.upstream
        meta = upstream.adapter.describe(route.path, None)
        endpoint = meta.endpoint if meta.endpoint != "/" else ENDPOINT_FALLBACK
        query = request.rel_url.query
        model = query.get("model") or query.get("deployment") or ""
        fp = fingerprint(upstream.kind, endpoint, {"model": model}, b"")
        suspension = relay.kill.check(started)
        budgets: tuple[str, ...] = ()
        if suspension is None and relay.budgets.active:
            budgets = relay.budgets.matching(attributes, upstream.name, model)
            if budgets:
                suspension = relay.budgets.check(budgets, started)
        if suspension is not None:
            meta = replace(meta, endpoint=endpoint, model=model, stream=True)
            return relay._refuse(
                started, t0, 0.0, route, meta, fp, suspension, attributes, request.protocol
            )

        session = _Session(self, route, started, t0, endpoint, model, fp)
        session.attributes = attributes
        session.connection = request.protocol
        session.budgets = budgets
        try:
            return await session.run(request)
        finally:
            session.record()


class _Session:
    """One relayed WebSocket session, and the event it records."""

    def __init__(
        self,
        owner: WebSocketRelay,
        route: Route,
        started: float,
        t0: float,
        endpoint: str,
        model: str,
        fp: str,
    ) -> None:
        self.owner = owner
        self.route = route
        self.started = started
        self.t0 = t0
        self.endpoint = endpoint
        self.model = model
        self.fp = fp
        self.meter = RealtimeMeter()
        self.status = 0
        self.upgraded = False  # the client got its 101
        self.clean = False  # a side closed with a close frame (else: a failure, or cancelled)
        self.recorded = False
        self.waited = 0.0  # seconds the daemon waited on the provider during the handshake
        self.attributes: Attributes | None = None  # who opened it
        self.connection: Any = None  # the client connection's handler (its process lookup)
        self.budgets: tuple[str, ...] = ()  # the budgets its spend counts in

    async def run(self, request: web.Request) -> web.StreamResponse:
        owner = self.owner
        relay = owner.relay
        upstream = self.route.upstream
        url = URL(
            f"{upstream.origin.scheme}://{upstream.origin.host_header}"
            + upstream.target(self.route.path, request.rel_url.raw_query_string),
            encoded=True,
        )
        drop = _FORWARDED[owner.forwarded_for]
        headers = filter_headers(
            [
                (name, kept)
                for name, value in request.headers.items()
                if not is_own(name)
                for kept in [_without_session(value) if name.lower() == "cookie" else value]
                if kept or name.lower() != "cookie"  # (a line of session cookies only: none)
            ],
            request.headers.get(hdrs.CONNECTION),
            REQUEST_DROP,
            _HANDSHAKE | drop,
        )
        if owner.forwarded_for == "append":
            chain = [*request.headers.getall("X-Forwarded-For", ()), str(request.remote)]
            headers.append(("X-Forwarded-For", ", ".join(chain)))
        offered = [
            p.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for p in value.split(",")
            if p.strip()
        ]
        t = time.perf_counter()
        try:
            up = await owner.session.ws_connect(
                url,
                headers=headers,
                protocols=offered,
                autoclose=False,
                autoping=False,
                max_msg_size=owner.max_message,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return self._refused(exc.status)
        except _Redirected:
            return self._refused(0)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            owner.handshakes.pop()
            self.status = 504 if isinstance(exc, TimeoutError) else 502
            name = upstream.name
            if isinstance(exc, TimeoutError):
                message, code = f"upstream {name} timed out", "upstream_timeout"
            else:
                message = f"upstream {name} refused the WebSocket: {type(exc).__name__}"
                code = "upstream_error"
            body = upstream.adapter.error_body(self.status, message, code)
            return web.Response(status=self.status, body=body, content_type="application/json")
        finally:
            self.waited = time.perf_counter() - t
            if relay.metrics is not None:
                relay.metrics.upstream(upstream.name, self.waited)
        answer = owner.handshakes.pop()
        try:
            client = web.WebSocketResponse(
                protocols=(up.protocol,) if up.protocol else (),
                autoclose=False,
                autoping=False,
                max_msg_size=owner.max_message,
                compress=False,
                timeout=CLOSE_TIMEOUT,
            )
            if answer is not None:
                for name, value in filter_headers(
                    answer[2], None, _RESPONSE_DROP | frozenset(REQUEST_DROP)
                ):
                    client.headers.add(name, value)
            self.status = 101
            await client.prepare(request)
        except BaseException:
            await up.close(code=WSCloseCode.GOING_AWAY)
            raise
        self.upgraded = True
        owner.open.add(client)
        try:
            await self._relay(client, up)
        finally:
            owner.open.discard(client)
            self.record()
            await _close_quietly(client, WSCloseCode.GOING_AWAY)
            await _close_quietly(up, WSCloseCode.GOING_AWAY)
        return client

    def _refused(self, status: int) -> web.Response:
        """The upstream refused the handshake (or redirected it: ``status`` 0): its answer, as
        it gave it."""
        answer = self.owner.handshakes.pop()
        self.status = status or (answer[0] if answer is not None else 0)
        if answer is None or self.status == 101:  # a 101 that is not a valid WebSocket answer
            self.status = 502
            upstream = self.route.upstream
            message = f"upstream {upstream.name} answered the WebSocket handshake wrongly"
            body = upstream.adapter.error_body(502, message, "upstream_bad_answer")
            return web.Response(status=502, body=body, content_type="application/json")
        status, reason, headers, body = answer
        response = web.Response(status=status, reason=reason or None, body=body)
        for name, value in filter_headers(headers, None, frozenset(REQUEST_DROP) | {"date"}):
            if name.lower() != "server":
                response.headers.add(name, value)
        return response

    async def _relay(
        self, client: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse
    ) -> None:
        """Both directions until one side closes or fails; then the other side is closed."""
        meter = self.meter
        downstream = asyncio.ensure_future(_pump(up, client, meter.feed))
        upstream = asyncio.ensure_future(_pump(client, up, None))
        try:
            done, _ = await asyncio.wait(
                {downstream, upstream}, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            downstream.cancel()
            upstream.cancel()
            raise
        first = downstream if downstream in done else upstream
        closed = first.result()
        self.clean = closed is not None
        self.record()
        # The other side's close answers the first side's (or says why the session ended).
        if first is upstream:  # the client closed, or failed
            code, reason = closed or (WSCloseCode.GOING_AWAY, b"client went away")
            try:  # (close() ends the upstream pump's receive, and waits for the answer)
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await up.close(code=code, message=reason)
                    await downstream
            except TimeoutError:
                pass
            finally:
                downstream.cancel()
            if closed is not None:
                await _close_quietly(client, _sendable(up.close_code, code))
        else:  # the upstream closed, or failed
            # (cancelled first: the server side's close() would not wait for the answer while
            # another task is receiving)
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upstream
            code, reason = closed or (WSCloseCode.BAD_GATEWAY, b"upstream failed")
            await _close_quietly(client, code, reason)
            if closed is not None:
                await _close_quietly(up, _sendable(client.close_code, code))

    def record(self) -> None:
        """Record the session's event (once): at the first close or failure, or at the end."""
        if self.recorded:
            return
        self.recorded = True
        relay = self.owner.relay
        meter = self.meter
        try:
            usage = meter.usage()
        except Exception:  # a meter bug must not cost the session its event
            log.exception("realtime meter failed for %s", self.route.upstream.name)
            usage = None
        model = inert(self.model or meter.model or "")
        if usage is None:
            if not self.upgraded:
                source = UsageSource.NONE
            else:
                source = UsageSource.MISSING if self.clean else UsageSource.PARTIAL
            tokens_in = tokens_out = 0
            cost, priced = 0.0, False
        else:
            source = UsageSource.REPORTED if self.clean else UsageSource.PARTIAL
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            price = relay.pricer.price(self.route.upstream.name, meter.model or model, usage)
            cost, priced = price.cost_usd, price.priced
        event = Event(
            ts=iso_ms(self.started),
            provider=self.route.upstream.name,
            model=model,
            endpoint=self.endpoint,
            status=self.status or 499,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            latency_ms=round((time.perf_counter() - self.t0) * 1000),
            fingerprint=self.fp,
            stream=self.upgraded,  # (a handshake not upgraded got a plain HTTP answer)
            usage_source=source,
            priced=priced,
            usage_unknown=source in (UsageSource.MISSING, UsageSource.PARTIAL),
            attributes=with_process(self.attributes, self.connection),
            budgets=self.budgets,
        )
        # The session's own time is the client's and the provider's, not the daemon's.
        waited = time.perf_counter() - self.t0 if self.upgraded else self.waited
        relay._done(event, self.t0, waited, self.connection)


async def _pump(src: Any, dst: Any, feed: Callable[[str], None] | None) -> tuple[int, bytes] | None:
    """Relay ``src``'s messages to ``dst`` until ``src`` sends a close frame (its code and
    reason) or fails (None). ``feed`` sees every text message."""
    while True:
        msg = await src.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            if feed is not None:
                feed(msg.data)
            await dst.send_str(msg.data)
        elif kind is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif kind is WSMsgType.PING:
            await dst.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            return _sendable(msg.data, WSCloseCode.OK), (msg.extra or "").encode()
        else:  # CLOSING (closed from here), CLOSED, ERROR
            if kind is WSMsgType.ERROR:
                log.info("websocket side failed: %s", msg.data)
            return None


def _without_session(value: str) -> str:
    return without_session(value.encode("latin-1", "replace")).decode("latin-1")


def _sendable(code: int | None, fallback: int) -> int:
    """A close code that may go on the wire (1005, 1006 and 1015 may not, RFC 6455 §7.4.1)."""
    if code is None or code in (1005, 1006, 1015) or not (1000 <= code <= 4999):
        return fallback
    return code


async def _close_quietly(ws: Any, code: int, reason: bytes = b"") -> None:
    """Close ``ws`` (and wait up to ``CLOSE_TIMEOUT`` for its answer) unless it is closed."""
    if ws.closed:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=reason)
