"""The forwarding handler, the daemon's hot path: route, read, describe, relay, meter, record.

The response goes back to the client as the provider sent it: same status, same end-to-end headers,
same bytes, chunk by chunk as they arrive (every write awaited, so a slow reader slows the upstream
read instead of filling memory). The upstream client (``http1``) never decompresses, so a compressed
body keeps its ``Content-Encoding`` and ``Content-Length``; the meter reads a decoded copy on the
side.

Stream usage: where a stream reports usage only when asked (OpenAI chat and completions), the
daemon asks for it and filters it back out of what the client sees. That request goes out with
``Accept-Encoding: identity`` (a server may always answer uncompressed) so that the filter works
on plain bytes; an upstream that compresses it all the same is decoded for the client, which then
gets it plain (no ``Content-Encoding``). A target that rejects the option (400/422 naming
``stream_options``) gets the request again exactly as the client sent it, and is not asked again
for an hour (``proxy.refusals``: per provider, deployment or model, and api-version).

Content codings: every request goes up asking only for codings the meter can read
(``proxy.encoding.accepted``), so no answer arrives in one it cannot.

Exactly one event is recorded per relayed request, after the last byte was sent (or the exchange
ended early), from the ``finally`` of ``Relay.handle``; nothing here waits for the disk.

Client disconnects: the server runs with ``handler_cancellation=True``, so a client that goes away
cancels this handler; the ``finally`` closes the upstream connection at once and records what was
seen as partial usage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs, web

from .adapters import ADAPTERS
from .adapters.base import (
    Adapter,
    Meter,
    Metered,
    RequestMeta,
    StreamFilter,
    UsageSource,
    loads,
)
from .adapters.form import FormReader, describe_form, read_form
from .attribution import Attributes, connection_process, with_process
from .attribution.process import DEADLINE as LOOKUP_DEADLINE
from .attribution.request import RequestAttribution, split_app
from .config import Config
from .encoding import DECODE_ERRORS, Inflater, accepted, codings, decode_body, tap
from .errors import ClientBodyTimeout, UpstreamBusy, UpstreamError, UpstreamTimeout
from .events import Event, Recorder, iso_ms
from .fingerprint import fingerprint, form_fingerprint, raw_hasher
from .guardrails import (
    SPEND_LAYER,
    AgentLoopDetector,
    Budgets,
    BudgetSuspension,
    KillSwitch,
    LoopGuard,
    SpendCap,
    Suspension,
)
from .guardrails.agent_loop import AGENT_LOOP_LAYER, CONVERSATION_HINT, EXEMPT_HINT
from .guardrails.dumb_loop import LOOP_LAYER, acked, repeat_hint
from .headers import RESPONSE_DROP, filter_headers, request_head
from .http1 import (
    AnswerHeadTooLarge,
    ConnectFailed,
    HTTPClientError,
    Pool,
    PoolTimeout,
    ProtocolError,
    Response,
    ServerClosed,
)
from .logs import AccessLog, Throttle, request_id
from .metrics import Metrics
from .pricing import Pricer
from .refusals import Refusals, Target
from .routes import BadPath, Route, Router
from .text import inert
from .websocket import WebSocketRelay, is_upgrade

log = logging.getLogger(__name__)

# A non-streamed answer up to this size is read whole and sent in one write; larger bodies and
# streams are relayed chunk by chunk.
BUFFER_LIMIT = 4 * 1024 * 1024

_NO_USAGE = Metered(None, None)
CLIENT_CLOSED = 499  # nginx's status for a client that left before the answer
_UPSTREAM_ERRORS = (TimeoutError, HTTPClientError, OSError)


class BodyTooLarge(Exception):
    pass


class _Exchange:
    """What one request has reached so far, for the event recorded when it ends."""

    __slots__ = (
        "status",
        "complete",
        "meter",
        "up",
        "asked_usage",
        "target",
        "waited",
        "occurrence",
        "ack",
        "billed",
        "attributes",
        "connection",
        "budgets",
    )

    def __init__(self) -> None:
        self.status = 0  # the status the client got; 0 until an answer is under way
        self.complete = False  # the client got the whole answer
        self.meter: Meter | None = None
        self.up: Response | None = None
        self.asked_usage = False  # the daemon asked for stream usage the client did not
        self.target: Target | None = None  # whom it asked (remembered if it refuses)
        self.waited = 0.0  # seconds spent waiting on the provider or the client
        # The fingerprint the loop detector counts once the provider answers 2xx (None: none).
        self.occurrence: str | None = None
        self.ack: asyncio.Future[bool] | None = None  # the fleet counted the occurrence
        self.billed = False  # a POST to an endpoint that is not free: an answer costs
        self.attributes: Attributes | None = None  # who sent it
        self.connection: Any = None  # the client connection's handler (its process lookup)
        self.budgets: tuple[str, ...] = ()  # the budgets its spend counts in


class Relay:
    """Relays requests to the configured upstreams and records one event for each."""

    def __init__(
        self,
        config: Config,
        pool: Pool,
        record: Recorder,
        pricer: Pricer,
        kill: KillSwitch,
        loop: LoopGuard | None = None,
        spend: SpendCap | None = None,
        metrics: Metrics | None = None,
        access: AccessLog | None = None,
        agent: AgentLoopDetector | None = None,
        attribution: RequestAttribution | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.pool = pool
        self.record = record
        self.kill = kill
        self.loop = loop or LoopGuard(config.guardrails.dumb_loop_detector, kill)
        self.agent = agent or AgentLoopDetector(config.guardrails.agent_loop_detector, kill)
        self.spend = spend or SpendCap(config.guardrails.spend_cap)
        self.metrics = metrics
        self.access = access or AccessLog(False)
        # Events waiting for their connection's process lookup, or behind one that does,
        # oldest first: id -> (event, overhead s, request id, connection).
        self.waiting: dict[int, tuple[Event, float, str, Any]] = {}
        self.attribution = attribution or RequestAttribution(None)
        self.budgets = budgets or Budgets(config.guardrails.budgets)
        # Retry-After for a suspension without an end: when the daemon next asks the API.
        self.poll_seconds = config.telemetry.poll_interval_seconds
        # Targets that refused an injected stream_options: not asked again for a while.
        self.refusals = Refusals()
        self._warned_codings: set[str] = set()  # Accept-Encoding codings dropped (logged once)
        self._warned_compressed: set[str] = set()  # providers that compressed despite identity
        # Bodies too large to hold stream upstream as the client sends them, so each holds an
        # upstream connection at the client's pace: they may hold at most half of the pool.
        self.uploads = asyncio.Semaphore(max(1, config.upstream.max_connections // 2))
        self.buffering = _Budget(config.server.max_buffered_total_bytes, self._buffering_full)
        self._full_warned = Throttle(60.0)
        self._agent_failures = Throttle(60.0)
        self.pool_timeout = config.upstream.pool_timeout_seconds
        # WebSocket sessions (``websocket``), where the application set them up.
        self.sockets: WebSocketRelay | None = None
        self.configure(config, pricer)

    def configure(self, config: Config, pricer: Pricer) -> None:
        """What a reload may change while requests run (each request sees one or the other)."""
        self.router = Router(config.providers)
        self.pricer = pricer
        self.max_body = config.server.max_body_bytes
        self.max_buffered = min(config.server.max_buffered_body_bytes, self.max_body)
        self.buffering.total = config.server.max_buffered_total_bytes
        self.forwarded_for = config.server.forwarded_for
        # Request headers never relayed beyond the hop-by-hop ones (bytes, lowercase).
        self._drop = {"keep": frozenset(), "drop": _FORWARDED, "append": _XFF}[self.forwarded_for]
        self._drop_plain = self._drop | _ACCEPT_ENCODING
        if self.sockets is not None:
            self.sockets.configure(config)
        self.attributing = config.attribution.enabled
        if self.attribution.keys is not None:
            self.attribution.keys.names = config.attribution.key_names

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        t0 = time.perf_counter()
        rel = request.rel_url
        app, raw_path = split_app(rel.raw_path)  # /@<app>/v1/...: the app, then the route
        try:
            route = self.router.resolve(raw_path)
        except BadPath:
            return _plain_error(400, "bad_path", "the request path has '.' or '..' segments")
        if route is None:
            return _plain_error(
                404, "no_route", f"no provider serves {rel.path!r}; use /<provider>/... or /v1/..."
            )
        attributes = (
            self.attribution.read(
                request.raw_headers, rel.raw_query_string, app, connection_process(request.protocol)
            )
            if self.attributing
            else None
        )
        if attributes is not None and attributes.process is None:
            if self.budgets.active and self.budgets.over_by_process(started):
                attributes = await _with_awaited_process(attributes, request.protocol)
        if self.sockets is not None and is_upgrade(request):
            return await self.sockets.handle(request, route, started, t0, attributes)
        try:
            body, whole = await _read_body(
                request, self.max_body, self.max_buffered, self.buffering
            )
            read_body = time.perf_counter() - t0  # the client's upload: not our time
        except BodyTooLarge:
            return self._too_large(route)
        except ClientBodyTimeout as exc:
            return self._body_timeout(route, exc)
        if not whole:
            return await self._handle_streamed(
                request, route, body, started, t0, read_body, attributes
            )

        upstream = route.upstream
        # A compressed body goes upstream as it came; the daemon reads a decoded copy (bounded
        # like a plain body) for the model and the fingerprint, and never rewrites it.
        plain = body
        encoding = request.headers.get(hdrs.CONTENT_ENCODING)
        if encoding is not None and body:
            plain = decode_body(body, encoding, self.max_buffered) or b""
        form = read_form(request.headers.get(hdrs.CONTENT_TYPE), plain) if plain else None
        if form is not None:  # a form (an upload): its model and fingerprint from its fields
            parsed = canonical = None
            meta = describe_form(upstream.adapter, route.path, form)
            fp = form_fingerprint(upstream.kind, meta.endpoint, meta.canonical)
            del form
        else:
            parsed = loads(plain) if plain else None
            meta = upstream.adapter.describe(route.path, parsed)
            canonical = meta.canonical if parsed is not None else None
            fp = fingerprint(upstream.kind, meta.endpoint, canonical, plain or body)

        suspension = self.kill.check(started)
        costly = suspension is None and _costly(request, upstream.adapter, meta)
        counted = costly and self.loop.enabled
        if counted:
            suspension = self.loop.check(fp, request.headers)
        if suspension is None and costly and self.agent.enabled and parsed is not None:
            suspension = self._agent_loop(upstream.adapter, meta, parsed)
        if suspension is None and counted and self.loop.fleet is not None:
            # A fingerprint the fleet has seen two short of the threshold: Redis is asked
            # (within a few ms) before it goes through. Any other request waits for nothing.
            suspension = await self.loop.check_fleet(fp, request.headers)
        budgets: tuple[str, ...] = ()
        if suspension is None and self.budgets.active:
            budgets = self.budgets.matching(attributes, upstream.name, meta.model or "")
            if budgets:
                suspension = self.budgets.check(budgets, started)
        if suspension is not None:
            return self._refuse(
                started, t0, read_body, route, meta, fp, suspension, attributes, request.protocol
            )

        ex = _Exchange()
        ex.waited = read_body
        ex.billed = costly
        ex.attributes = attributes
        ex.connection = request.protocol
        ex.budgets = budgets
        if counted and self.loop.counts(request.headers):
            ex.occurrence = fp
        # (Stream usage is asked for only in a body the daemon may rewrite: a plain one.)
        asking = self._asking_usage(request, route, meta, parsed, ex) if plain is body else None
        # What was parsed is not needed past here: let it go before waiting on the provider (a
        # large conversation's objects take several times its size, for as long as it streams).
        del parsed, plain, canonical
        meta = replace(meta, canonical=None)
        try:
            return await self._exchange(request, route, meta, body, asking, ex)
        finally:
            self._finish(started, t0, route, meta, ex, fp)

    def _buffering_full(self) -> None:
        if self.metrics is not None:
            self.metrics.limit_hit("buffered_bodies")
        if self._full_warned.allow()[0]:
            log.warning(
                "request bodies being read fill server.max_buffered_total_bytes (%d): streaming"
                " the next ones upstream as they arrive; further ones this minute are counted in"
                " atlasburn_limit_hits_total",
                self.buffering.total,
            )

    def _answered(self, ex: _Exchange, status: int) -> None:
        """The provider's answer is about to reach the client: a 2xx is the loop detector's
        occurrence, counted now (before the client has it, so that the fleet knows of it by
        the time the client's next request reaches another daemon)."""
        ex.status = status
        if ex.occurrence is not None and 200 <= status < 300:
            ex.ack = self.loop.record(ex.occurrence)
        ex.occurrence = None

    async def _fleet_counted(self, ex: _Exchange) -> None:
        """In a fleet: hold the end of the answer until Redis has counted the occurrence, at
        most ``ACK_WAIT_SECONDS`` (the client's next identical request may go to another daemon
        at once; a slower Redis is not waited for)."""
        ack, ex.ack = ex.ack, None
        if ack is not None and not ack.done():
            if not await acked(ack) and self.loop.fleet is not None:
                self.loop.fleet.late()  # Redis is slow: answers stop waiting for it

    def _agent_loop(self, adapter: Adapter, meta: RequestMeta, parsed: Any) -> Suspension | None:
        """The agent-loop detector's refusal of this conversation, if it loops."""
        try:
            return self.agent.check(adapter, meta.endpoint, parsed)
        except Exception:  # a reader's bug must not cost the request: it goes through
            allowed, held = self._agent_failures.allow()
            if allowed:
                log.exception(
                    "agent-loop detector failed on a %s request (it went through; %d more"
                    " failures since the last line)",
                    meta.endpoint,
                    held,
                )
            return None

    async def _handle_streamed(
        self,
        request: web.Request,
        route: Route,
        first: bytes,
        started: float,
        t0: float,
        read_body: float,
        attributes: Attributes | None,
    ) -> web.StreamResponse:
        """A body too large to hold (over ``server.max_buffered_body_bytes``): it goes to the
        provider as it arrives. Its fingerprint is the hash of its raw bytes, known once it is
        sent, so the loop detector counts it then (a loop is refused from the next request on);
        the model comes from the answer; stream usage is not asked for (the body is not read).
        A form (an audio or image upload) is read as it passes instead (``FormReader``: fields
        kept, files hashed): its model and fingerprint come from it, known once it is sent.

        Such a request holds an upstream connection at the client's pace, so it takes one only
        once its first body bytes are in (a client that announces a body and sends nothing
        holds none), and uploads hold at most half of the pool (``self.uploads``); the body
        timeouts of ``server`` end one that stops sending."""
        upstream = route.upstream
        meta = upstream.adapter.describe(route.path, None)
        hasher = raw_hasher(upstream.kind, meta.endpoint)
        # A form (a large upload) is read as it passes: its fields kept, its files hashed.
        reader = None
        if request.headers.get(hdrs.CONTENT_ENCODING) is None:
            reader = FormReader.open(request.headers.get(hdrs.CONTENT_TYPE))
        suspension = self.kill.check(started)
        budgets: tuple[str, ...] = ()
        if suspension is None and self.budgets.active:  # (the model is known from the answer)
            budgets = self.budgets.matching(attributes, upstream.name, "")
            if budgets:
                suspension = self.budgets.check(budgets, started)
        if suspension is not None:
            hasher.update(first)  # what is known of it: the rest is never read
            fp = "sha256:" + hasher.hexdigest()
            refusal = self._refuse(
                started, t0, read_body, route, meta, fp, suspension, attributes, request.protocol
            )
            refusal.force_close()
            return refusal
        ex = _Exchange()
        ex.waited = read_body
        ex.billed = _costly(request, upstream.adapter, meta)
        ex.attributes = attributes
        ex.connection = request.protocol
        ex.budgets = budgets
        slot = False
        try:
            if not first:
                t = time.perf_counter()
                first = await request.content.readany()
                ex.waited += time.perf_counter() - t  # the client's pace: not our time
            try:
                async with asyncio.timeout(self.pool_timeout):
                    slot = await self.uploads.acquire()
            except TimeoutError:
                raise UpstreamBusy(
                    f"no upstream connection for an upload within {self.pool_timeout:g}s "
                    "(uploads may hold half of upstream.max_connections)"
                ) from None
            stream = _rest_of_body(request, first, self.max_body, hasher, reader)
            return await self._exchange(
                request, route, meta, b"", None, ex, stream, request.content_length
            )
        except BodyTooLarge:
            ex.status = 413
            return self._too_large(route)
        except ClientBodyTimeout as exc:
            ex.status = 408
            return self._body_timeout(route, exc)
        except UpstreamBusy as exc:
            ex.status = 503
            return self._busy(route, exc)
        finally:
            if slot:
                self.uploads.release()
            fp = "sha256:" + hasher.hexdigest()
            form = reader.result() if reader is not None else None
            if form is not None:  # (None too for a body cut short: its raw bytes count)
                meta = describe_form(upstream.adapter, route.path, form)
                fp = form_fingerprint(upstream.kind, meta.endpoint, meta.canonical)
                meta = replace(meta, canonical=None)
            self._finish(started, t0, route, meta, ex, fp)
            if (
                200 <= ex.status < 300
                and self.loop.enabled
                and _costly(request, upstream.adapter, meta)
                and self.loop.counts(request.headers)
            ):
                # known only now: a loop is refused from the next one
                self.loop.observe(fp, share=True)

    def _asking_usage(
        self, request: web.Request, route: Route, meta: RequestMeta, parsed: Any, ex: _Exchange
    ) -> bytes | None:
        """The body that asks for stream usage the client did not ask for (and
        ``ex.asked_usage``, ``ex.target``), or None when there is nothing to ask for."""
        upstream = route.upstream
        if not upstream.inject_stream_usage:
            return None
        asking = upstream.adapter.with_stream_usage(meta, parsed)
        if asking is None:
            return None
        target = Target.of(upstream.name, route.path, request.rel_url.query, parsed)
        if self.refusals.refused(target):
            return None
        ex.asked_usage = True
        ex.target = target
        # A right-sized copy: orjson's buffer is several times the output, and this one is held
        # for as long as the stream lasts.
        return bytes(memoryview(orjson.dumps(asking)))

    def _too_large(self, route: Route) -> web.Response:
        resp = _error(route, 413, "body_too_large", f"request body over {self.max_body} bytes")
        resp.force_close()  # the rest of the body is not read
        return resp

    def _body_timeout(self, route: Route, exc: ClientBodyTimeout) -> web.Response:
        resp = _error(route, 408, "request_timeout", f"request body timed out: {exc}")
        resp.force_close()  # the rest of the body is not read
        return resp

    def _busy(self, route: Route, exc: UpstreamBusy) -> web.Response:
        """503 with Retry-After: the SDKs retry it after a short wait."""
        if self.metrics is not None:
            self.metrics.limit_hit("pool_timeout")
        resp = _error(route, 503, "upstream_busy", str(exc))
        resp.headers["Retry-After"] = "1"
        return resp

    def _finish(
        self, started: float, t0: float, route: Route, meta: RequestMeta, ex: _Exchange, fp: str
    ) -> None:
        """The exchange is over: free the upstream connection, record the event."""
        if ex.up is not None:
            ex.up.release()  # back to the pool only if read to the end, else closed
        metered = _NO_USAGE
        if ex.meter is not None:
            try:
                metered = ex.meter.result()
            except Exception:  # a meter bug must not cost the request its event
                log.exception("usage meter failed for %s %s", route.upstream.name, meta.endpoint)
        event = self._event(started, t0, route, meta, ex, metered, fp)
        self._done(event, t0, ex.waited, ex.connection)

    def _done(self, event: Event, t0: float, waited: float, connection: Any = None) -> None:
        """Everything that follows one finished request: spend, record, metrics, log.

        Spend counts at once (the spend cap, the budgets matched by what is known now). A
        request that ends before its new connection's process lookup (``connection.process``)
        has: its event waits for the lookup (at most its deadline, a fraction of a second; the
        client has its answer already) before it is recorded, so that the first request of a
        connection, and every request of a client that opens one connection per request, names
        its process too; a budget that matches only with the process counts it then. Events
        are recorded in the order their requests ended: one that ends while another waits
        waits behind it (the spool and the access log stay in order)."""
        overhead = time.perf_counter() - t0 - waited
        self._spent(event)
        lookup = _pending_lookup(event, connection)
        if lookup is None and not self.waiting:
            self._recorded(event, overhead, request_id())
            return
        self.waiting[id(event)] = (event, overhead, request_id(), connection)
        if lookup is not None:
            lookup.add_done_callback(lambda _: self._release())

    def _spent(self, event: Event) -> None:
        if event.cost_usd <= 0:
            return
        if self.spend.enabled:
            over = self.spend.add(event.cost_usd)
            if over is not None and self.kill.check() is None:
                self.kill.suspend_now(SPEND_LAYER, over[0], over[1], "local")
        if self.budgets.active:
            # Matched again with the answer's model (the check before the request had only
            # what the request said).
            event.budgets = self.budgets.matching(event.attributes, event.provider, event.model)
            if event.budgets:
                self.budgets.add(event.budgets, event.cost_usd)

    def _release(self) -> None:
        """Record the waiting events from the oldest on, up to the first whose lookup has not
        ended yet."""
        while self.waiting:
            key, (event, overhead, rid, connection) = next(iter(self.waiting.items()))
            if _pending_lookup(event, connection) is not None:
                return
            del self.waiting[key]
            event.attributes = with_process(event.attributes, connection)
            if event.cost_usd > 0 and self.budgets.active:
                now = self.budgets.matching(event.attributes, event.provider, event.model)
                more = tuple(name for name in now if name not in event.budgets)
                if more:  # budgets of a unit: known only now
                    self.budgets.add(more, event.cost_usd)
                    event.budgets += more
            self._recorded(event, overhead, rid)

    def flush_waiting(self) -> None:
        """Record, without their process, the events still waiting for a process lookup (the
        daemon is stopping: the store closes next)."""
        waiting, self.waiting = self.waiting, {}
        for event, overhead, rid, _ in waiting.values():
            self._recorded(event, overhead, rid)

    def _recorded(self, event: Event, overhead: float, rid: str) -> None:
        self.record(event)
        if self.metrics is not None:
            self.metrics.observe(event, overhead)
        self.access.write(event, rid)

    def _refuse(
        self,
        started: float,
        t0: float,
        waited: float,
        route: Route,
        meta: RequestMeta,
        fp: str,
        suspension: Suspension,
        attributes: Attributes | None = None,
        connection: Any = None,
    ) -> web.Response:
        """A 429 in the provider's own shape, which the OpenAI and Anthropic SDKs do not retry."""
        left = suspension.seconds_left(time.time())
        wait = self.poll_seconds if left is None else left
        seconds = max(1, math.ceil(wait))
        if isinstance(suspension, BudgetSuspension):  # this request alone: the org flows
            message = suspension.message(seconds)
        elif suspension.source == "conversation":  # this request alone: nothing is suspended
            message = (
                f"AtlasBurn guardrail {suspension.layer}: {suspension.reason}: "
                f"{CONVERSATION_HINT}; {EXEMPT_HINT}"
            )
        elif self.loop.blocked.get(fp) is suspension:  # scope "fingerprint": this one alone
            message = (
                f"AtlasBurn guardrail {suspension.layer}: {suspension.reason}; requests identical"
                f" to this one are refused for {seconds}s (the org is not suspended); "
                + repeat_hint(suspension.reason, self.loop.exempt_header)
            )
        else:
            message = (
                f"AtlasBurn guardrail: org {suspension.org_id} is suspended by {suspension.layer}"
                f" ({suspension.reason}); retry after {seconds}s. An operator resumes it with"
                " `atlasburn-proxy resume` (or DELETE /api/guardrails/enforce)"
            )
            if suspension.layer == AGENT_LOOP_LAYER:
                message += f"; {EXEMPT_HINT}"
            elif suspension.layer == LOOP_LAYER:
                message += "; " + repeat_hint(suspension.reason, self.loop.exempt_header)
        body = route.upstream.adapter.error_body(429, message, "atlasburn_guardrail")
        response = web.Response(
            status=429,
            body=body,
            content_type="application/json",
            headers={
                "Retry-After": str(seconds),
                "retry-after-ms": str(round(wait * 1000)),
                "x-should-retry": "false",
                "AtlasBurn-Guardrail": suspension.layer,
            },
        )
        self._done(
            Event(
                ts=iso_ms(started),
                provider=route.upstream.name,
                model=inert(meta.model or ""),  # the client chose it: bounded before it is kept
                endpoint=meta.endpoint,
                status=429,
                tokens_in=0,
                tokens_out=0,
                cost_usd=0.0,
                latency_ms=round((time.perf_counter() - t0) * 1000),
                fingerprint=fp,
                stream=meta.stream,
                usage_source=UsageSource.NONE,  # it never left the host: nothing was metered
                priced=True,
                refused_by=suspension.layer,
                attributes=attributes,
            ),
            t0,
            waited,
            connection,
        )
        return response

    async def _exchange(
        self,
        request: web.Request,
        route: Route,
        meta: RequestMeta,
        body: bytes,
        asking: bytes | None,
        ex: _Exchange,
        stream: AsyncIterator[bytes] | None = None,
        length: int | None = None,
    ) -> web.StreamResponse:
        """Send the request (``asking``: the body rewritten to ask for stream usage, or None for
        ``body`` as it came; ``stream``: a body that streams upstream) and relay the answer."""
        upstream = route.upstream
        adapter = upstream.adapter
        sent = body if asking is None else asking
        try:
            up = ex.up = await self._send(request, route, sent, ex.asked_usage, ex, stream, length)
            if ex.asked_usage and up.status in (400, 422):
                try:
                    error = await up.read(BUFFER_LIMIT)
                except _UPSTREAM_ERRORS as exc:
                    raise _upstream_error(exc, upstream.name) from None
                readable = error
                coding = up.coding()
                if coding is not None and error:  # compressed although identity was asked for
                    readable = decode_body(error, coding, BUFFER_LIMIT) or b""
                if b"stream_options" not in readable:
                    return await self._answer_whole(request, route, meta, ex, error)
                assert ex.target is not None
                if not self.refusals.refused(ex.target):  # (else requests already in flight)
                    log.warning(
                        "%s refused stream_options (HTTP %d): not asked for stream usage for "
                        "%gs; its chat streams are recorded without usage unless the client "
                        "asks",
                        ex.target,
                        up.status,
                        self.refusals.ttl,
                    )
                    self.refusals.add(ex.target)
                ex.asked_usage = False
                up.release()
                up = ex.up = await self._send(request, route, body, False, ex)
        except UpstreamTimeout as exc:
            ex.status = 504
            return _error(route, 504, "upstream_timeout", str(exc))
        except UpstreamBusy as exc:
            ex.status = 503
            return self._busy(route, exc)
        except UpstreamError as exc:
            ex.status = 502
            return _error(route, 502, exc.code, str(exc))

        content_type = up.header("content-type") or ""
        is_sse = content_type.startswith("text/event-stream")
        length = up.content_length
        if length is not None and length <= BUFFER_LIMIT and not is_sse:
            if request.method != hdrs.METH_HEAD:
                try:
                    t = time.perf_counter()
                    data = await up.read()
                    ex.waited += time.perf_counter() - t
                except _UPSTREAM_ERRORS as exc:
                    ex.status = 504 if isinstance(exc, TimeoutError) else 502
                    return _error(route, ex.status, "upstream_cut", _describe(exc, upstream.name))
                return await self._answer_whole(request, route, meta, ex, data)

        encoding = up.coding()
        ex.meter = adapter.meter(meta, content_type)
        feed = self._tap(ex.meter, encoding)
        hide: StreamFilter | None = None
        plain: Inflater | None = None  # decodes a stream that should have come plain
        if ex.asked_usage and is_sse and up.status == 200:
            plain = self._plain_stream(upstream.name, encoding)
            if plain is not None or not codings(encoding):
                hide = adapter.hide_stream_usage()
        # The filter changes the length: a Content-Length would then be wrong (and the coding,
        # for a stream decoded here).
        drop = frozenset() if hide is None else _LENGTH if plain is None else _CODED
        headers = _response_headers(up, drop)
        response = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        self._answered(ex, up.status)
        clock = time.perf_counter
        t = clock()
        await response.prepare(request)
        read = up.readany
        waited = clock() - t
        try:
            while True:
                t = clock()
                try:
                    chunk = await read()
                except _UPSTREAM_ERRORS as exc:
                    _abort_client(request, upstream.name, exc)
                    return response
                waited += clock() - t
                if not chunk:
                    break
                feed(chunk)
                if plain is not None and hide is not None:
                    try:
                        for piece in plain.feed(chunk):
                            if piece := hide.feed(piece):
                                t = clock()
                                await response.write(piece)
                                waited += clock() - t
                    except DECODE_ERRORS as exc:
                        _abort_client(request, upstream.name, exc)
                        return response
                    continue
                if hide is not None:
                    chunk = hide.feed(chunk)
                    if not chunk:
                        continue
                t = clock()
                await response.write(chunk)  # a client that went away raises here
                waited += clock() - t
        finally:
            ex.waited += waited
        t = clock()
        if hide is not None and (rest := hide.end()):
            await response.write(rest)
        await self._fleet_counted(ex)
        await response.write_eof()
        ex.waited += clock() - t
        ex.complete = True
        return response

    async def _answer_whole(
        self,
        request: web.Request,
        route: Route,
        meta: RequestMeta,
        ex: _Exchange,
        data: bytes,
    ) -> web.StreamResponse:
        """Send a body that was read whole, in one write."""
        up = ex.up
        assert up is not None
        ex.meter = route.upstream.adapter.meter(meta, up.header("content-type") or "")
        self._tap(ex.meter, up.coding())(data)
        whole = web.Response(status=up.status, reason=up.reason, headers=_response_headers(up))
        whole.body = data
        self._answered(ex, up.status)
        await self._fleet_counted(ex)
        t = time.perf_counter()
        await whole.prepare(request)
        await whole.write_eof()
        ex.waited += time.perf_counter() - t
        ex.complete = True
        return whole

    def _plain_stream(self, provider: str, encoding: str | None) -> Inflater | None:
        """A decoder for a stream the daemon asked to come plain (it must filter it), when it
        came compressed all the same; None when it came plain, or in a coding the daemon
        cannot read (the usage chunk then reaches the client: said in the log)."""
        if not codings(encoding):
            return None
        try:
            inflater: Inflater | None = Inflater(encoding)
        except ValueError:
            inflater = None
        if provider not in self._warned_compressed:
            self._warned_compressed.add(provider)
            log.warning(
                "provider %s compressed a stream asked for identity (%s): %s (logged once per "
                "provider)",
                provider,
                inert(encoding or ""),
                "such streams are decoded here and reach the client plain"
                if inflater is not None
                else "the daemon cannot read it, so the usage chunk it asked for reaches the "
                "client",
            )
        return inflater

    def _accept_encoding(self, request: web.Request) -> bytes | None:
        """The Accept-Encoding line to send instead of the client's, when the client accepts
        codings the meter cannot read (logged once per coding); else None."""
        values = request.headers.getall(hdrs.ACCEPT_ENCODING, ())
        if not values:
            return None
        value, dropped = accepted(", ".join(values))
        if not dropped:
            return None
        new = [inert(c, 64) for c in dropped if c not in self._warned_codings]
        if new and len(self._warned_codings) < 64:  # client-chosen names: a bounded set
            self._warned_codings.update(new)
            log.warning(
                "clients accept content codings the daemon cannot meter (%s): they are left "
                "out of Accept-Encoding on the way up (logged once per coding)",
                ", ".join(new),
            )
        return b"Accept-Encoding: " + value.encode("latin-1", "replace") + b"\r\n"

    def _tap(self, meter: Meter, encoding: str | None) -> Callable[[bytes], None]:
        metrics = self.metrics
        if metrics is None:
            return tap(meter, encoding)
        return tap(meter, encoding, lambda: metrics.limit_hit("inflate"))

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
        self,
        request: web.Request,
        route: Route,
        body: bytes,
        plain: bool,
        ex: _Exchange,
        stream: AsyncIterator[bytes] | None = None,
        length: int | None = None,
    ) -> Response:
        """Send the request upstream; transport failures become UpstreamError/UpstreamTimeout.
        ``plain`` asks for an uncompressed answer (the daemon must rewrite it)."""
        upstream = route.upstream
        connection = request.headers.get(hdrs.CONNECTION)
        accept = b"Accept-Encoding: identity\r\n" if plain else self._accept_encoding(request)
        if accept is not None:
            headers = request_head(request.raw_headers, connection, self._drop_plain) + accept
        else:
            headers = request_head(request.raw_headers, connection, self._drop)
        if self.forwarded_for == "append":
            chain = ", ".join([*request.headers.getall("X-Forwarded-For", ()), str(request.remote)])
            headers += b"X-Forwarded-For: " + chain.encode("latin-1", "replace") + b"\r\n"
        t = time.perf_counter()
        try:
            return await self.pool.request(
                upstream.origin,
                request.method,
                upstream.target(route.path, request.rel_url.raw_query_string),
                headers,
                body,
                stream,
                length,
            )
        except _UPSTREAM_ERRORS as exc:
            if isinstance(exc, AnswerHeadTooLarge) and self.metrics is not None:
                self.metrics.limit_hit("upstream_head")
            raise _upstream_error(exc, upstream.name) from None
        finally:
            elapsed = time.perf_counter() - t
            ex.waited += elapsed
            if self.metrics is not None:
                self.metrics.upstream(upstream.name, elapsed)

    def _event(
        self,
        started: float,
        t0: float,
        route: Route,
        meta: RequestMeta,
        ex: _Exchange,
        metered: Metered,
        fp: str,
    ) -> Event:
        usage = metered.usage
        # Client- and provider-chosen names are bounded before they are labelled, logged,
        # stored, shipped or used as a price cache key (proxy.text).
        model = inert(meta.model or metered.model or "")
        if usage is None:
            if ex.meter is None:  # no answer reached the meter: a daemon-made error, or 499
                source = UsageSource.NONE
            else:
                source = UsageSource.MISSING if ex.complete else UsageSource.PARTIAL
            tokens_in = tokens_out = 0
            cost, priced = 0.0, False
        else:
            if not metered.final:
                source = UsageSource.PARTIAL  # a running count: what was seen, no more
            elif ex.asked_usage:
                source = UsageSource.REQUESTED
            else:
                source = UsageSource.REPORTED
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            # The response names the exact model that served (a dated snapshot): price that
            # (the pricer bounds it like ``model`` before it is a cache key or logged).
            price = self.pricer.price(route.upstream.name, metered.model or model, usage)
            cost, priced = price.cost_usd, price.priced
        return Event(
            ts=iso_ms(started),
            provider=route.upstream.name,
            model=model,
            endpoint=meta.endpoint,
            status=ex.status or CLIENT_CLOSED,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            latency_ms=round((time.perf_counter() - t0) * 1000),
            fingerprint=fp,
            stream=meta.stream,
            usage_source=source,
            priced=priced,
            usage_unknown=ex.billed
            and 200 <= ex.status < 300
            and source in (UsageSource.MISSING, UsageSource.PARTIAL),
            attributes=with_process(ex.attributes, ex.connection),
            budgets=ex.budgets,
        )


async def _with_awaited_process(attributes: Attributes, connection: Any) -> Attributes | None:
    """``attributes`` with the connection's process, once its lookup has ended (waited for at
    most ``LOOKUP_DEADLINE``): for a budget by unit that is over, which must see it."""
    lookup = getattr(connection, "process", None)
    if lookup is not None and not lookup.done():
        await asyncio.wait((lookup,), timeout=LOOKUP_DEADLINE)
    return with_process(attributes, connection)


def _pending_lookup(event: Event, connection: Any) -> asyncio.Future[Any] | None:
    """The connection's process lookup, if the event could use it and it is not done yet."""
    if event.attributes is None or event.attributes.process is not None:
        return None
    lookup = getattr(connection, "process", None)
    return lookup if lookup is not None and not lookup.done() else None


def _costly(request: web.Request, adapter: Adapter, meta: RequestMeta) -> bool:
    """Whether the loop detectors look at this request: a POST (what costs: a GET /v1/models
    poll is not a loop) to an endpoint that is not free (count_tokens)."""
    return request.method == hdrs.METH_POST and meta.endpoint not in adapter.free_endpoints


class _Budget:
    """Bytes of request bodies being read whole, all connections together, and the bound
    (``server.max_buffered_total_bytes``); ``full`` is called when a body finds no room."""

    __slots__ = ("total", "used", "full")

    def __init__(self, total: int, full: Callable[[], None]) -> None:
        self.total = total
        self.used = 0
        self.full = full

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            self.full()
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


async def _read_body(
    request: web.Request, limit: int, buffered: int, budget: _Budget
) -> tuple[bytes, bool]:
    """The request body and True when it was read whole; or, for a body over ``buffered``
    bytes, or one that finds no room in ``budget`` while it is read, what was read of it (maybe
    nothing) and False: the rest is to be streamed. Raises BodyTooLarge as soon as the body is
    known to pass ``limit``."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise BodyTooLarge
        if length > buffered:
            return b"", False
        if length <= request.client_max_size:  # (else a reload raised the limit: read here)
            if not length:
                return await request.read(), True
            if not budget.take(length):
                return b"", False
            try:
                return await request.read(), True  # aiohttp reads exactly Content-Length
            finally:
                budget.give(length)
    if not request.body_exists:
        return b"", True
    chunks: list[bytes] = []  # chunked (no length announced), or over aiohttp's own limit
    size = 0
    try:
        async for chunk in request.content.iter_any():
            if not budget.take(len(chunk)):  # the rest is streamed, after what came so far
                return b"".join([*chunks, chunk]), False
            size += len(chunk)
            chunks.append(chunk)
            if size > buffered:
                if size > limit:
                    raise BodyTooLarge
                return b"".join(chunks), False
        return b"".join(chunks), True
    finally:
        budget.give(size)


async def _rest_of_body(
    request: web.Request, first: bytes, limit: int, hasher: Any, form: FormReader | None
) -> AsyncIterator[bytes]:
    """``first`` and then the rest of the body as it arrives, hashed on the way (and fed to
    ``form``, a form's reader, if not None); BodyTooLarge once it passes ``limit``."""
    size = len(first)
    if first:
        hasher.update(first)
        if form is not None:
            form.feed(first)
        yield first
    # Pieces of at most 64 KiB: each is written upstream before the next is read, so a slow
    # provider holds back the client instead of filling memory.
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        hasher.update(chunk)
        if form is not None:
            form.feed(chunk)
        yield chunk


_LENGTH = frozenset({"content-length"})
_CODED = frozenset({"content-length", "content-encoding"})
_ACCEPT_ENCODING = frozenset({b"accept-encoding"})
_XFF = frozenset({b"x-forwarded-for"})
_FORWARDED = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


def _response_headers(up: Response, extra: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    return filter_headers(up.headers, up.header("connection"), RESPONSE_DROP, extra)


def _upstream_error(exc: BaseException, provider: str) -> UpstreamError:
    """The one place transport exceptions become the daemon's own."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(_describe(exc, provider))
    if isinstance(exc, PoolTimeout):
        return UpstreamBusy(str(exc))
    if isinstance(exc, ProtocolError):
        return UpstreamError(_describe(exc, provider), "upstream_bad_answer")
    return UpstreamError(_describe(exc, provider))


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
    if isinstance(exc, TimeoutError):
        return f"upstream {provider} timed out"
    if isinstance(exc, ConnectFailed):
        reason = exc.error.strerror or type(exc.error).__name__
        return f"cannot connect to upstream {provider} ({exc.host}:{exc.port}): {reason}"
    if isinstance(exc, ServerClosed):
        return f"upstream {provider} closed the connection"
    if isinstance(exc, HTTPClientError):
        return f"upstream {provider} sent a malformed answer ({exc})"
    return f"upstream {provider} failed: {type(exc).__name__}"


def _error(route: Route, status: int, code: str, message: str) -> web.Response:
    """An error the daemon itself answers, in the provider's own error shape."""
    body = route.upstream.adapter.error_body(status, message, code)
    return web.Response(status=status, body=body, content_type="application/json")


def _plain_error(status: int, code: str, message: str) -> web.Response:
    """An error for a request no provider owns (OpenAI's shape, the most widely parsed)."""
    body = ADAPTERS["openai"].error_body(status, message, code)
    return web.Response(status=status, body=body, content_type="application/json")
