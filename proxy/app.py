"""Builds the aiohttp application and runs it: the shared resources and their lifetimes.

``make_app`` wires the routes; ``services`` (a cleanup context) opens, in order, the store, the
kill switch, the local API key, the upstream ``ClientSession``, the pricer, the relay and the
shipper, and closes them in the order that loses nothing: by the time it runs, aiohttp has stopped
accepting and let in-flight requests finish, so every event is queued; then the store commits
what is queued, the shipper makes its last bounded attempt, and the store closes.

``Daemon`` binds the listener and stops it gracefully; the CLI and the tests both run the daemon
through it, so tests exercise the real server settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from . import __version__
from .api import GuardrailsAPI, LocalAPI, error
from .attribution.keys import KeyIds, key_secret
from .attribution.process import ProcessFinder
from .attribution.request import RequestAttribution
from .auth import KeyChecker, local_key
from .browsers import BrowserGuard
from .config import Config
from .errors import ClientBodyTimeout
from .events import Event, Recorder
from .guardrails import Budgets, KillSwitch, LoopGuard, SpendCap
from .http1 import Pool
from .logs import AccessLog, setup_logging
from .metrics import CONTENT_TYPE, Metrics
from .price_data import PriceRefresher
from .pricing import Pricer
from .relay import Relay
from .server import Runner
from .shipper import Shipper
from .store import Store
from .tasks import spawn
from .ui.page import StatusPage, secured
from .ui.sessions import Sessions
from .websocket import WebSocketRelay

if TYPE_CHECKING:
    from .guardrails.fleet import Fleet

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
READY = web.AppKey("ready", asyncio.Event)  # set while serving: store open, not draining
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", Pool)
RELAY = web.AppKey("relay", Relay)
STORE = web.AppKey("store", Store)
KILL = web.AppKey("kill", KillSwitch)
API = web.AppKey("api", LocalAPI)
GUARDRAILS_API = web.AppKey("guardrails_api", GuardrailsAPI)
SHIPPER = web.AppKey("shipper", Shipper)
BROWSERS = web.AppKey("browsers", BrowserGuard)
PRICE_DATA = web.AppKey("price_data", PriceRefresher)
STATUS_PAGE = web.AppKey("status_page", StatusPage)


def _guarded(handler: Handler) -> Handler:
    """``handler`` behind the Host and Origin checks (``browsers``): a web page's request is
    refused before any route, key check or guardrail counts it. A request body that times out
    where no handler answers for it gets 408 here. (Each route's handler is wrapped once, where
    an aiohttp middleware would build a wrapper for every request.)"""

    async def guarded(request: web.Request) -> web.StreamResponse:
        refused = request.app[BROWSERS].refusal(request.headers)
        if refused is not None:
            code, message = refused
            limit = "foreign_host" if code == "forbidden_host" else "cross_site"
            request.app[METRICS].limit_hit(limit)
            return error(403, code, message)
        try:
            return await handler(request)
        except ClientBodyTimeout as exc:  # a body read by the local API (the relay answers)
            response = error(408, "request_timeout", f"request body timed out: {exc}")
            response.force_close()
            return response

    return guarded


def make_pool(config: Config) -> Pool:
    """The upstream client (``http1``): keep-alive connections, no decompression (bodies are
    relayed as sent), no cookies, no environment proxies or .netrc credentials, nothing added to
    the request but ``Host`` and ``Content-Length``, and timeouts that bound connecting and
    silence but never a long stream's total time."""
    up = config.upstream
    return Pool(
        limit=up.max_connections,
        connect_timeout=up.connect_timeout_seconds,
        read_timeout=up.read_timeout_seconds,
        keepalive=30.0,
        pool_timeout=up.pool_timeout_seconds,
    )


def make_app(config: Config, record: Recorder | None = None) -> web.Application:
    """The application; ``record`` (tests) also sees every event the store is given."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[READY] = asyncio.Event()
    app[METRICS] = Metrics()
    app[BROWSERS] = BrowserGuard(config.server)

    async def services(app: web.Application) -> AsyncIterator[None]:
        ship = bool(config.atlasburn.api_base)
        # The key first: a refused key file (StateFileError) must not leave the store open.
        key = local_key(config.atlasburn.api_key.reveal(), config.storage.path.parent, create=True)
        assert key is not None
        secret = key_secret(config.storage.path.parent, create=True)
        assert secret is not None
        attribution = RequestAttribution(KeyIds(secret, config.attribution.key_names))
        store = await Store.open(config.storage, ship=ship)
        store.start()
        app[STORE] = store
        kill = KillSwitch(config.atlasburn.org_id, store)
        await kill.load()
        app[KILL] = kill
        guards = config.guardrails
        loop = LoopGuard(guards.dumb_loop_detector, kill)
        spend = SpendCap(guards.spend_cap)
        if spend.enabled:
            spend.restore(await store.spend_buckets(86400))
        budgets = Budgets(guards.budgets)
        budgets.restore(await store.budget_buckets(86400))
        fleet = None
        if config.fleet.redis_url:
            from .guardrails.fleet import Fleet  # redis-py only for a fleet: 7 MB of memory

            fleet = Fleet(config.fleet, config.atlasburn.org_id, kill, loop, spend, budgets)
            fleet.start()  # in the background: traffic never waits for Redis
        keys = KeyChecker(key)
        app[API] = LocalAPI(
            keys, store, kill, config.atlasburn.org_id, config.server.max_body_bytes, loop
        )
        app[GUARDRAILS_API] = GuardrailsAPI(app[API], store, kill, keys.who)
        app[API].sessions = sessions = Sessions()
        pool = make_pool(config)
        app[POOL] = pool
        pricer = Pricer.from_config(config.providers, config.pricing)
        recorder = store.enqueue if record is None else _both(store.enqueue, record)
        metrics = app[METRICS]
        access = AccessLog(config.logging.access, config.logging.format)
        access.start()
        relay = Relay(
            config,
            pool,
            recorder,
            pricer,
            kill,
            loop,
            spend,
            metrics,
            access,
            attribution=attribution,
            budgets=budgets,
        )
        app[RELAY] = relay
        app[STATUS_PAGE] = StatusPage(
            app[API], sessions, kill, config.storage.path, lambda: app[RELAY].budgets
        )
        relay.sockets = sockets = WebSocketRelay(relay, config)
        shipper = Shipper(config, store, kill) if ship else None
        if shipper is not None:
            app[SHIPPER] = shipper
            shipper.start()
            kill.listeners.append(shipper.report_suspension)
        metrics.add_state(lambda: _state(app, store, kill, loop, relay.pricer, shipper, fleet))
        metrics.add_pool(pool.stats)
        metrics.add_budgets(lambda: app[RELAY].budgets.state())
        refresher = PriceRefresher(config.price_data, lambda c: app[RELAY].pricer.use(c))
        app[PRICE_DATA] = refresher
        refreshing = (
            spawn(refresher.run(), name="price data") if config.price_data.refresh_url else None
        )
        app[READY].set()
        try:
            yield
        finally:
            app[READY].clear()
            if refreshing is not None:
                refreshing.cancel()
            # Each step runs even if one before it raised (logged; the first is raised at the
            # end): above all the store closes, or aiosqlite's thread keeps the process alive.
            relay.flush_waiting()  # events waiting for a process lookup: recorded now
            steps: list[Callable[[], Awaitable[object]]] = [access.stop, store.flush]
            if shipper is not None:
                steps.append(shipper.stop)
            if fleet is not None:
                steps.append(fleet.stop)
            failed: Exception | None = None
            for step in (*steps, store.close, pool.close, sockets.close):
                try:
                    await step()
                except Exception as exc:
                    log.exception("stopping: %s failed", getattr(step, "__qualname__", step))
                    failed = failed or exc
            if failed is not None:
                raise failed

    app.cleanup_ctx.append(services)

    async def close_sockets(app: web.Application) -> None:
        # Before in-flight requests are waited for: a WebSocket session would last the grace.
        relay = app.get(RELAY)
        if relay is not None and relay.sockets is not None:
            await relay.sockets.shutdown()

    app.on_shutdown.append(close_sockets)

    async def relay(request: web.Request) -> web.StreamResponse:
        return await request.app[RELAY].handle(request)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        return await request.app[RELAY].expect(request)

    async def ingest(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return error(405, "method_not_allowed", "use POST")
        return await request.app[API].ingest(request)

    async def readyz(request: web.Request) -> web.Response:
        if request.app[READY].is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "draining"}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        body = request.app[METRICS].render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", _guarded(healthz))
    app.router.add_get("/readyz", _guarded(readyz))
    app.router.add_get("/metrics", _guarded(metrics))

    async def enforce(request: web.Request) -> web.StreamResponse:
        return await request.app[GUARDRAILS_API].handle(request)

    app.router.add_route("*", "/api/ingest", _guarded(secured(ingest)))
    app.router.add_route("*", "/api/guardrails/enforce", _guarded(secured(enforce)))
    _status_page(app)
    # [\s\S], not ".": a path may hold a newline (%0A decoded), and a path no route matches gets
    # aiohttp's own text/plain 404 instead of the relay's answer in the provider's shape.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _guarded(relay), expect_handler=expect)
    return app


def _status_page(app: web.Application) -> None:
    """The routes of the status page (``proxy.ui.page``)."""

    def route(name: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            handler: Handler = getattr(request.app[STATUS_PAGE], name)
            return await handler(request)

        return _guarded(secured(handle))

    app.router.add_get("/ui", route("page"))
    app.router.add_get("/ui/login", route("login"), allow_head=False)  # HEAD uses no token
    app.router.add_get(r"/ui/{name:[a-z]+\.(?:js|css)}", route("asset"))
    app.router.add_route("*", "/api/stats", route("stats"))
    app.router.add_route("*", "/api/ui/login-tokens", route("login_tokens"))


def _state(
    app: web.Application,
    store: Store,
    kill: KillSwitch,
    loop: LoopGuard,
    pricer: Pricer,
    shipper: Shipper | None,
    fleet: Fleet | None,
) -> dict[str, float]:
    values = {
        "atlasburn_ready": float(app[READY].is_set()),
        "atlasburn_suspended": float(kill.check() is not None),
        "atlasburn_spool_pending_events": store.pending_events,
        "atlasburn_spool_queued_events": store.queued,
        "atlasburn_spool_bytes": store.spool_bytes,
        "atlasburn_loop_tracked_fingerprints": len(loop.detector),
        "atlasburn_events_committed": store.committed_total,
        "atlasburn_store_commits": store.commits_total,
        "atlasburn_events_dropped": store.dropped_total,
        "atlasburn_events_poisoned": store.poisoned_total,
        "atlasburn_store_write_errors": store.write_errors_total,
        "atlasburn_unpriced_events": pricer.unpriced_total,
        "atlasburn_pricing_errors": pricer.errors_total,
    }
    if shipper is not None:
        values["atlasburn_ship_batches"] = shipper.batches_shipped
        values["atlasburn_ship_failures"] = shipper.failures_total
        values["atlasburn_events_shipped"] = shipper.events_shipped
    if fleet is not None:
        values.update(fleet.state())
    return {k: float(v) for k, v in values.items()}


# Keys a reload applies while running; any other change waits for a restart (and is named).
LIVE_KEYS = (
    "attribution",
    "providers",
    "pricing",
    "guardrails",
    "logging",
    "server.max_body_bytes",
    "server.max_buffered_body_bytes",
    "server.max_buffered_total_bytes",
    "server.forwarded_for",
    "server.drain_seconds",
    "server.allowed_hosts",
    "server.allowed_origins",
    "server.header_timeout_seconds",
    "server.body_timeout_seconds",
    "server.send_timeout_seconds",
    "server.max_client_connections",
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ (a section's fields, one level down)."""
    keys = []
    for section in (
        "server",
        "upstream",
        "logging",
        "storage",
        "atlasburn",
        "telemetry",
        "guardrails",
        "fleet",
        "providers",
        "pricing",
        "price_data",
        "attribution",
    ):
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        if hasattr(a, "__slots__"):
            keys += [f"{section}.{f}" for f in a.__slots__ if getattr(a, f) != getattr(b, f)]
        else:
            keys.append(section)
    return keys


async def reload(app: web.Application, new: Config) -> tuple[list[str], list[str]]:
    """Apply ``new`` to a running daemon: (keys applied, keys that need a restart)."""
    old = app[CONFIG]
    changed = changed_keys(old, new)
    live = [k for k in changed if k.startswith(LIVE_KEYS)]
    restart = [k for k in changed if k not in live]
    relay = app[RELAY]
    if any(k.startswith(("providers", "pricing")) for k in live):
        pricer = Pricer.from_config(new.providers, new.pricing, app[PRICE_DATA].catalog)
        # Counters are monotonic across reloads.
        pricer.unpriced_total = relay.pricer.unpriced_total
        pricer.errors_total = relay.pricer.errors_total
    else:
        pricer = relay.pricer
    guards = new.guardrails
    relay.loop.configure(guards.dumb_loop_detector)
    relay.agent.configure(guards.agent_loop_detector)
    relay.spend.configure(guards.spend_cap)
    if guards.spend_cap.enabled and not old.guardrails.spend_cap.enabled:
        relay.spend.restore(await app[STORE].spend_buckets(86400))
    relay.budgets.configure(guards.budgets)
    relay.access.enabled = new.logging.access
    relay.access.json = new.logging.format == "json"
    relay.configure(new, pricer)
    app[BROWSERS] = BrowserGuard(new.server)
    if any(k.startswith("logging.") for k in live):
        setup_logging(new.logging.level, new.logging.format)
    app[CONFIG] = _keep(old, new, restart)
    return live, restart


def _keep(old: Config, new: Config, restart: list[str]) -> Config:
    """The config now in force: the new one, but the old value of every restart-only section."""
    sections = {k.split(".", 1)[0] for k in restart}
    kept = {s: getattr(old, s) for s in sections if s != "server"}
    server = new.server
    if "server" in sections:
        server = replace(
            new.server,
            listen=old.server.listen,
            shutdown_grace_seconds=old.server.shutdown_grace_seconds,
            keepalive_timeout_seconds=old.server.keepalive_timeout_seconds,
        )
    return replace(new, server=server, **kept)


def _both(first: Recorder, second: Recorder) -> Recorder:
    def record(event: Event) -> None:
        first(event)
        second(event)

    return record


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


def _lookups(finder: ProcessFinder | None) -> dict[str, float]:
    """The process lookups' counters for /metrics (none while process attribution is off)."""
    if finder is None:
        return {}
    return {
        "atlasburn_process_lookups": float(finder.lookups),
        "atlasburn_process_lookups_found": float(finder.found),
        "atlasburn_process_lookups_not_found": float(finder.not_found),
        "atlasburn_process_lookups_skipped": float(finder.skipped),
    }


class Daemon:
    """One running daemon: ``start`` binds and serves, ``stop`` drains and closes."""

    def __init__(self, config: Config, record: Recorder | None = None) -> None:
        self.config = config
        self.app = make_app(config, record)
        self.runner = Runner(self.app, config.server, self.app[METRICS])
        limits = self.runner.limits
        self._attribute_processes(config)
        self.app[METRICS].add_state(
            lambda: {
                "atlasburn_client_connections": float(len(limits.open)),
                "atlasburn_client_connections_limit": float(limits.max_connections),
                **_lookups(limits.finder),
            }
        )
        self.port = 0

    async def start(self) -> None:
        listen = self.config.server.listen
        await self.runner.setup()
        site = web.TCPSite(self.runner, listen.host, listen.port, backlog=1024)
        await site.start()
        self.port = self.runner.addresses[0][1]
        log.info("listening on %s:%d", listen.host, self.port)

    @property
    def url(self) -> str:
        host = self.config.server.listen.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def kill(self) -> KillSwitch:
        return self.app[KILL]

    async def drain(self) -> None:
        """Answer /readyz with 503 for ``server.drain_seconds`` (load balancers and Kubernetes
        stop sending), then stop: stop accepting, let in-flight requests finish within the grace
        period, flush the spool, close."""
        self.app[READY].clear()
        delay = self.app[CONFIG].server.drain_seconds
        if delay:
            await asyncio.sleep(delay)
        await self.stop()

    async def reload(self, config: Config) -> tuple[list[str], list[str]]:
        applied = await reload(self.app, config)
        self.runner.limits.configure(self.app[CONFIG].server)
        old = self._attribute_processes(self.app[CONFIG])
        if old is not None:
            await asyncio.to_thread(old.close)
        return applied

    def _attribute_processes(self, config: Config) -> ProcessFinder | None:
        """Look up each loopback client's process (``[attribution] process``) from now on, or
        stop; the finder no longer used, if any (to close)."""
        limits = self.runner.limits
        wanted = config.attribution.enabled and config.attribution.process
        if wanted and limits.finder is None:
            limits.finder = ProcessFinder()
        elif not wanted and limits.finder is not None:
            old, limits.finder = limits.finder, None
            return old
        return None

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        self.app[READY].clear()
        await self.runner.cleanup()
        finder, self.runner.limits.finder = self.runner.limits.finder, None
        if finder is not None:
            await asyncio.to_thread(finder.close)
