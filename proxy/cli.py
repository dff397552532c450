"""Command line: ``atlasburn-proxy run | check-config | prices | report | key-id | status |
suspend | resume`` (also ``python -m proxy``). The commands that talk to the daemon or read its
store take ``--config`` and ``--listen`` like ``run`` and say on stderr which daemon (URL) or
store (path) they use.

Exit codes: 0 clean stop, 1 runtime failure (e.g. the address is taken), 2 bad configuration or
an unsafe state directory (the systemd unit does not restart on 2: restarting cannot fix either).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from . import __version__
from .config import Config, load_config
from .config import config_path as resolve_config_path
from .errors import ConfigError, StateFileError
from .logs import setup_logging

log = logging.getLogger("proxy")

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlasburn-proxy",
        description="Local forwarding proxy for LLM API traffic: meters spend, stops runaways.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    add_daemon_options(run)

    check = sub.add_parser("check-config", help="validate a config file and print every error")
    check.add_argument("file", metavar="FILE")

    prices = sub.add_parser(
        "prices", help="print the rates the daemon would use for models, and where they come from"
    )
    prices.add_argument("models", metavar="MODEL", nargs="+")
    prices.add_argument("--config", metavar="FILE", help="TOML config (default: embedded defaults)")
    prices.add_argument("--provider", metavar="NAME", help="only this configured provider")
    prices.add_argument("--service-tier", metavar="TIER", help="e.g. flex or priority (OpenAI)")

    report = sub.add_parser("report", help="spend, tokens, requests and refusals from the store")
    add_daemon_options(report)
    report.add_argument("--since", default="24h", help="e.g. 30m, 24h, 7d, or all (default 24h)")
    report.add_argument(
        "--by",
        default="model",
        metavar="DIMENSION",
        help="provider, model (default), endpoint, fingerprint, app, user, session, key, unit,"
        " exe, tag:<Name>, or hour or day (a time series)",
    )
    report.add_argument("--json", action="store_true", help="JSON instead of a table")

    key_id = sub.add_parser(
        "key-id",
        help="read a provider key on stdin and print its key_id (for [attribution.key_names])",
    )
    key_id.add_argument("--config", metavar="FILE", help="TOML config (default: embedded defaults)")

    status = sub.add_parser("status", help="the running daemon's kill flag")
    add_daemon_options(status)
    suspend = sub.add_parser("suspend", help="suspend the org: every proxied request gets 429")
    add_daemon_options(suspend)
    suspend.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    suspend.add_argument("--reason", default="suspended by an operator")
    suspend.add_argument("--layer", default="manual")
    resume = sub.add_parser("resume", help="clear the org's kill flag")
    add_daemon_options(resume)
    resume.add_argument("--reason", default="resumed by an operator")
    add_ui_parser(sub)
    return parser


def add_ui_parser(sub: Any) -> None:
    ui = sub.add_parser("ui", help="print (and open) a one-time login URL for the status page")
    add_daemon_options(ui)
    ui.add_argument("--no-browser", action="store_true", help="print the URL, open nothing")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "prices":
        return show_prices(args.config, args.provider, args.service_tier, args.models)
    if args.command == "report":
        return show_report(args)
    if args.command == "key-id":
        return print_key_id(args.config)
    if args.command in ("status", "suspend", "resume"):
        return operate(args)
    if args.command == "ui":
        return open_ui(args)
    return run(args.config, args.listen)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok ({len(config.providers)} providers: {', '.join(config.providers)})")
    return EXIT_OK


def show_prices(
    config_path: str | None, provider: str | None, tier: str | None, models: list[str]
) -> int:
    """One line per (provider, model) with a price, in USD per million tokens, under the
    providers that carry the model (``pricing.NOT_CARRIED``); exit 1 when some model has no
    price on any provider asked about, 2 for a service tier the data does not know."""
    from .pricing import Pricer, usd_per_mtok

    config = load_or_report(config_path)
    if config is None:
        return EXIT_CONFIG
    if provider is not None and provider not in config.providers:
        print(f"no provider {provider!r} is configured", file=sys.stderr)
        return EXIT_CONFIG
    names = [provider] if provider else list(config.providers)
    pricer = Pricer.from_config(config.providers, config.pricing)
    known = pricer.service_tiers()
    if tier is not None and tier not in known:
        print(f"--service-tier: unknown tier {tier!r}; known: {', '.join(known)}", file=sys.stderr)
        return EXIT_CONFIG
    header = ("provider", "model", "input", "cached", "write", "write-1h", "output", "source")
    rows: list[tuple[str, ...]] = []
    missing = []
    for model in models:
        found = False
        override = config.pricing.get(model)
        # A [pricing] entry for every provider is one row, not one per provider (most of which
        # could never be sent the model).
        everywhere = provider is None and override is not None and override.provider == ""
        for name in names[:1] if everywhere else names:
            rates = pricer.rates(name, model, tier)
            if rates is None:
                continue
            found = True
            for start, rate_set in ((0, rates.base), *rates.tiers):
                r = rate_set
                label = model if start == 0 else f"  > {start:,} input tokens"
                rows.append(
                    ("(any)" if everywhere else name, label)
                    + tuple(
                        usd_per_mtok(v)
                        for v in (
                            r.input,
                            r.cached_input,
                            r.cache_write,
                            r.cache_write_1h,
                            r.output,
                        )
                    )
                    + ((rates.source if start == 0 else ""),)
                )
        if not found:
            missing.append(model)
            rows.append(("-", model, "-", "-", "-", "-", "-", "no price known: cost 0, unpriced"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("USD per million tokens")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_FAILURE if missing else EXIT_OK


def show_report(args: argparse.Namespace) -> int:
    """The report of the store that ``--config`` names (said on stderr); exit 1 when there is
    no store there (nothing was ever recorded with this config: likely the wrong one)."""
    import json

    from . import report

    since, by, as_json = args.since, args.by, args.json
    config = load_or_report(args.config, args.listen)
    if config is None:
        return EXIT_CONFIG
    try:
        seconds = report.parse_since(since)
    except ValueError as exc:
        print(f"--since: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report.group_path(by)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    store = config.storage.path
    try:
        rows = report.query(store, by, seconds)
    except FileNotFoundError:
        print(
            f"report: no store at {store} (storage.path): the daemon has not run with this"
            " config; pass the --config it runs with",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"report: store {store}", file=sys.stderr)
    if as_json:
        out = {
            "since": since,
            "by": by,
            "rows": [r.as_dict(by) for r in rows],
            "total": report.total(rows).as_dict(by),
        }
        print(json.dumps(out, indent=2))
    else:
        print(report.render(rows, by, since, seconds))
    return EXIT_OK


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--listen``, as ``run`` takes them: a command that talks to the daemon
    (or reads its store) finds it the way the daemon was started."""
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: embedded defaults)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")


def load_or_report(config_path: str | None, listen: str | None = None) -> Config | None:
    """The config at ``config_path`` (else ``ATLASBURN_PROXY_CONFIG``, else the embedded
    defaults), or None once every problem is printed on stderr (the caller exits 2). An empty
    ``--config`` (an unset variable in a unit file) is an error, not the embedded defaults."""
    if config_path == "":
        print("config error: --config: an empty path (an unset variable?)", file=sys.stderr)
        return None
    try:
        return load_config(resolve_config_path(config_path), listen=listen)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


def print_key_id(config_path: str | None) -> int:
    """Read one provider key on stdin (a prompt that does not echo on a terminal) and print
    its ``key_id`` under this installation's secret (``storage.path``'s directory; made if
    there is none yet, as the daemon would). The key is never printed or kept."""
    import getpass

    from .attribution.keys import KeyIds, key_secret

    config = load_or_report(config_path)
    if config is None:
        return EXIT_CONFIG
    if sys.stdin.isatty():
        text = getpass.getpass("provider key (not echoed): ")
    else:
        text = sys.stdin.read(65536)
    key = text.strip()
    if key[:7].lower() == "bearer ":
        key = key[7:].strip()
    if not key:
        print(
            "key-id: no key on stdin (e.g. printenv OPENAI_API_KEY | atlasburn-proxy key-id)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    state_dir = config.storage.path.parent
    try:
        secret = key_secret(state_dir, create=False)
        if secret is None:
            secret = key_secret(state_dir, create=True)
            print(
                f"key-id: generated this installation's key-id secret in {state_dir}",
                file=sys.stderr,
            )
    except StateFileError as exc:
        print(f"key-id: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    assert secret is not None
    key_id = KeyIds(secret).key_id(key.encode("utf-8", "surrogatepass"))
    name = config.attribution.key_names.get(key_id)
    if name:
        print(f"key-id: [attribution.key_names] names it {name!r}", file=sys.stderr)
    print(key_id)
    return EXIT_OK


def ask_daemon(args: argparse.Namespace, ask: Callable[[Config], T]) -> tuple[Config, T] | int:
    """For ``status``, ``suspend``, ``resume`` and ``ui``: the config (``--config``,
    ``--listen``), a line on stderr naming the daemon, then ``ask(config)``. An exit code
    instead, once the problem is printed: 2 for the config or a refused key file, 1 when the
    daemon cannot be reached or refuses."""
    from .control import OperatorError, base_url

    config = load_or_report(args.config, args.listen)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.command}: daemon {base_url(config)}", file=sys.stderr)
    try:
        return config, ask(config)
    except OperatorError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    except StateFileError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG


def operate(args: argparse.Namespace) -> int:
    from . import control

    def ask(config: Config) -> dict[str, Any]:
        if args.command == "suspend":
            body = {
                "action": "suspend",
                "layer": args.layer,
                "ttl_seconds": args.ttl,
                "reason": args.reason,
            }
            control.call(config, "POST", body)
        elif args.command == "resume":
            control.call(config, "DELETE", {"reason": args.reason})
        return control.call(config, "GET")

    asked = ask_daemon(args, ask)
    if isinstance(asked, int):
        return asked
    config, answer = asked
    print(control.describe(config, answer))
    return EXIT_OK


def open_ui(args: argparse.Namespace) -> int:
    """``ui``: the status page's one-time login URL on stdout (opened where a browser can be)."""
    from .ui import command

    asked = ask_daemon(args, command.login_url)
    if isinstance(asked, int):
        return asked
    _, url = asked
    print(url, flush=True)
    print("(a one-time link: it works once, within two minutes)", file=sys.stderr)
    if not args.no_browser and command.can_open_browser():
        command.open_browser(url)
    return EXIT_OK


def run(config_path: str | None, listen: str | None) -> int:
    # Whatever the daemon creates (state directory, spool, SQLite's -wal and -shm, key file) is
    # for its own user only, also where a mode is not passed explicitly. Here, not in library
    # code: tests and tools import that in-process.
    os.umask(0o077)
    config = load_or_report(config_path, listen)
    if config is None:
        return EXIT_CONFIG
    config_path = resolve_config_path(config_path)
    setup_logging(config.logging.level, config.logging.format)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    return _run_loop(serve(config, config_path, listen))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - platforms without uvloop
        log.info("uvloop not available; using the default asyncio event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


async def serve(config: Config, path: str | None = None, listen: str | None = None) -> int:
    from .app import Daemon  # imported here so check-config stays light
    from .server import raise_open_file_limit
    from .systemd import notify, watchdog, watchdog_interval
    from .tasks import spawn

    raise_open_file_limit()  # before the connection bound is derived from it
    daemon = Daemon(config)
    try:
        await daemon.start()
    except StateFileError as exc:
        # Before binding, like a bad config: the unit does not restart on it.
        log.error("refusing to start: %s", exc)
        await daemon.stop()
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.server.listen, exc.strerror or exc)
        await daemon.stop()
        return EXIT_FAILURE

    freeze_startup_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(signum: int) -> None:
        if stop.is_set():
            # A second signal while draining: the operator wants out now.
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            os._exit(EXIT_FAILURE)
        log.info(
            "%s: stopping (grace %.0fs)",
            signal.Signals(signum).name,
            config.server.shutdown_grace_seconds,
        )
        notify("STOPPING=1")
        stop.set()

    async def on_reload() -> None:
        notify("RELOADING=1")
        try:
            new = load_config(path, listen=listen)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: config error: %s (the running config stays)", problem)
        else:
            live, restart = await daemon.reload(new)
            nothing = "nothing" if restart else "nothing (no change)"
            log.info("reload: applied %s", ", ".join(live) or nothing)
            if restart:
                log.warning("reload: these keys changed but need a restart: %s", ", ".join(restart))
        notify("READY=1")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(on_reload(), name="reload"))
    interval = watchdog_interval()
    pinger = spawn(watchdog(interval), name="watchdog") if interval else None
    notify("READY=1\nSTATUS=serving on " + daemon.url)
    log.info("atlasburn-proxy %s ready on %s", __version__, daemon.url)
    await stop.wait()
    code = EXIT_OK
    try:
        await daemon.drain()
    except Exception:
        # Each failed step of the stop was logged where it failed, and the steps after it still
        # ran (the store and the pool are closed): exit, with a code that says so.
        log.error("stopped, with errors (above)")
        code = EXIT_FAILURE
    if pinger is not None:
        pinger.cancel()
    log.info("stopped")
    return code


def freeze_startup_heap() -> None:
    """Move what the daemon holds once started (modules, the price catalog, the config, the
    routes: about 80,000 objects) out of the cyclic garbage collector's reach (``gc.freeze``).

    A large request body parses into tens of thousands of dicts and lists (a 1 MB agent
    conversation, about 20,000), which trigger collections of the oldest generation; each of
    those walked the whole startup heap, holding the event loop 20 to 50 ms at a time (1 MB
    agent requests: p99 42 -> 9 ms, CPU per request 13-24% less; bench/RESULTS.md, issue 19).
    Frozen objects are still freed by reference counting; only a cycle among them that
    becomes garbage later (a config replaced by a reload) is kept until exit."""
    gc.collect()
    gc.freeze()
