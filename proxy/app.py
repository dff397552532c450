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

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import __version__
from .api import GuardrailsAPI, LocalAPI, error
from .auth import KeyChecker, local_key
from .config import Config
from .events import Event, Recorder
from .guardrails import KillSwitch, LoopGuard, SpendCap
from .pricing import Pricer
from .relay import Relay
from .shipper import Shipper
from .store import Store

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
RELAY = web.AppKey("relay", Relay)
STORE = web.AppKey("store", Store)
KILL = web.AppKey("kill", KillSwitch)
API = web.AppKey("api", LocalAPI)
GUARDRAILS_API = web.AppKey("guardrails_api", GuardrailsAPI)
SHIPPER = web.AppKey("shipper", Shipper)


def make_session(config: Config) -> aiohttp.ClientSession:
    """The upstream client: no decompression (bodies are relayed as sent), no cookies kept
    between clients, no environment proxies or .netrc credentials, timeouts that bound connecting
    and silence but never a long stream's total time."""
    up = config.upstream
    connector = aiohttp.TCPConnector(
        limit=up.max_connections,
        limit_per_host=0,
        ttl_dns_cache=60,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=up.connect_timeout_seconds,
            sock_read=up.read_timeout_seconds,
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        raise_for_status=False,
    )


def make_app(config: Config, record: Recorder | None = None) -> web.Application:
    """The application; ``record`` (tests) also sees every event the store is given."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config

    async def services(app: web.Application) -> AsyncIterator[None]:
        ship = bool(config.atlasburn.api_base)
        store = await Store.open(config.storage, ship=ship)
        store.start()
        app[STORE] = store
        kill = KillSwitch(config.atlasburn.org_id, store)
        await kill.load()
        app[KILL] = kill
        loop = None
        if config.guardrails.dumb_loop_detector.enabled:
            loop = LoopGuard(config.guardrails.dumb_loop_detector, kill)
        spend = None
        if config.guardrails.spend_cap.enabled:
            spend = SpendCap(config.guardrails.spend_cap)
            spend.restore(await store.spend_buckets(86400))
        key = local_key(config.atlasburn.api_key.reveal(), config.storage.path.parent, create=True)
        assert key is not None
        keys = KeyChecker(key)
        app[API] = LocalAPI(
            keys,
            store,
            kill,
            config.atlasburn.org_id,
            config.server.max_body_bytes,
            loop,
        )
        app[GUARDRAILS_API] = GuardrailsAPI(app[API], store, kill, keys.who)
        session = make_session(config)
        app[SESSION] = session
        pricer = Pricer.from_config(config.providers, config.pricing)
        recorder = store.enqueue if record is None else _both(store.enqueue, record)
        app[RELAY] = Relay(config, session, recorder, pricer, kill, loop, spend)
        shipper = Shipper(config, store, kill) if ship else None
        if shipper is not None:
            app[SHIPPER] = shipper
            shipper.start()
            kill.listeners.append(shipper.report_suspension)
        try:
            yield
        finally:
            await store.flush()
            if shipper is not None:
                await shipper.stop()
            await store.close()
            await session.close()

    app.cleanup_ctx.append(services)

    async def relay(request: web.Request) -> web.StreamResponse:
        return await request.app[RELAY].handle(request)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        return await request.app[RELAY].expect(request)

    async def ingest(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return error(405, "method_not_allowed", "use POST")
        return await request.app[API].ingest(request)

    app.router.add_get("/healthz", healthz)

    async def enforce(request: web.Request) -> web.StreamResponse:
        return await request.app[GUARDRAILS_API].handle(request)

    app.router.add_route("*", "/api/ingest", ingest)
    app.router.add_route("*", "/api/guardrails/enforce", enforce)
    app.router.add_route("*", "/{tail:.*}", relay, expect_handler=expect)
    return app


def _both(first: Recorder, second: Recorder) -> Recorder:
    def record(event: Event) -> None:
        first(event)
        second(event)

    return record


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


class Daemon:
    """One running daemon: ``start`` binds and serves, ``stop`` drains and closes."""

    def __init__(self, config: Config, record: Recorder | None = None) -> None:
        self.config = config
        self.app = make_app(config, record)
        self.runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.server.shutdown_grace_seconds,
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

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        await self.runner.cleanup()
