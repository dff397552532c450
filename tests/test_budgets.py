"""Budgets per scope (``[[guardrails.budgets]]``) end to end: real daemons, the fake provider,
real ``openai`` SDK clients, a real redis-server for the fleet.

Each chat of the fake provider costs $0.0001578 (gpt-4o-mini, 1000 tokens in, 100 out: see
test_cost.py); a $0.0003 hourly budget is crossed by the second: that one passes (its cost is
known only once it is answered), the next is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import sqlite3
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.app import RELAY
from proxy.config import BudgetConfig, StorageConfig
from proxy.guardrails import Budgets
from proxy.store import Store

from .conftest import RunningDaemon, StartDaemon, eventually
from .fakes.provider import FakeProvider
from .test_attribution import key_id_command
from .test_fleet import redis_url  # noqa: F401  (the fixture: a redis-server of this module's)
from .test_websocket import HANDSHAKE

COST = 0.0001578
REFUSAL = (
    "AtlasBurn guardrail budget: budget 'app-a' spent $0.000316 in the last hour, over its"
    " $0.000300 limit; requests it matches are refused for {}s more (other traffic flows). To"
    " allow more, raise max_usd_per_hour of the [[guardrails.budgets]] entry named 'app-a' and"
    " reload"
)


def budgets(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"guardrails": {"budgets": list(entries)}, **extra}


APP_A = {"name": "app-a", "match": {"app": "a"}, "max_usd_per_hour": 0.0003}


def client(d: RunningDaemon, app: str | None = None, key: str = "sk-test") -> openai.AsyncOpenAI:
    headers = {} if app is None else {"AtlasBurn-App": app}
    return openai.AsyncOpenAI(
        base_url=d.url + "/v1", api_key=key, max_retries=2, default_headers=headers
    )


async def chat(c: openai.AsyncOpenAI, text: str = "hi") -> None:
    await c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )


async def refused(c: openai.AsyncOpenAI) -> tuple[str, str, int]:
    """(AtlasBurn-Guardrail, message, Retry-After) of a chat that must be refused."""
    with pytest.raises(openai.RateLimitError) as info:
        await chat(c)
    response = info.value.response
    body = info.value.body
    assert isinstance(body, dict)
    return (
        response.headers["AtlasBurn-Guardrail"],
        body["message"],
        int(response.headers["Retry-After"]),
    )


async def metrics(d: RunningDaemon) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(d.url + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("atlasburn_budget_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_an_app_over_its_budget_is_refused_while_another_flows(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(**budgets(APP_A))
    async with client(d, "a") as a, client(d, "b") as b, client(d) as nobody:
        await chat(a, "1")
        await chat(a, "2")  # $0.0003156: over, but already answered
        layer, message, retry = await refused(a)
        # The org is not suspended: app b, and requests of no app, flow.
        await chat(b)
        await chat(nobody)
        assert d.daemon.kill.check() is None
        # The path prefix names the app too.
        async with openai.AsyncOpenAI(
            base_url=d.url + "/@a/v1", api_key="sk-test", max_retries=2
        ) as prefixed:
            assert (await refused(prefixed))[0] == "budget"
    assert layer == "budget"
    # Both of app a's chats were in this minute or the last: the first leaves the hour within it.
    assert 3530 <= retry <= 3600
    assert message == REFUSAL.format(retry)
    assert len(fake.requests) == 4  # the SDK retried no refusal
    assert [(e.status, e.refused_by, e.budgets) for e in d.events] == [
        (200, None, ("app-a",)),
        (200, None, ("app-a",)),
        (429, "budget", ()),
        (200, None, ()),
        (200, None, ()),
        (429, "budget", ()),
    ]
    assert await metrics(d) == {
        'atlasburn_budget_spend_usd{budget="app-a",window="hour"}': pytest.approx(2 * COST),
        'atlasburn_budget_limit_usd{budget="app-a",window="hour"}': 0.0003,
        'atlasburn_budget_warnings_total{budget="app-a",window="hour"}': 1.0,
    }


async def test_a_key_scoped_budget(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """``match = { key_id = ... }``: the id ``atlasburn-proxy key-id`` prints for the key (run
    before the daemon first starts: it makes the installation's secret beside the store)."""
    spool = tmp_path / "keyed" / "spool.sqlite3"
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    done = await asyncio.to_thread(key_id_command, config, "sk-team-search\n")
    assert done.returncode == 0, done.stderr
    key_id = done.stdout.strip()
    d = await start_daemon(
        storage={"path": str(spool)},
        **budgets(
            {
                "name": "search-key",
                "match": {"key_id": key_id, "provider": "openai"},
                "max_usd_per_day": 0.0003,
            }
        ),
    )
    async with client(d, key="sk-team-search") as keyed, client(d, key="sk-other") as other:
        await chat(keyed, "1")
        await chat(keyed, "2")
        layer, message, retry = await refused(keyed)
        await chat(other)
    assert layer == "budget"
    assert 86330 <= retry <= 86400
    assert message == (
        "AtlasBurn guardrail budget: budget 'search-key' spent $0.000316 in the last day, over"
        f" its $0.000300 limit; requests it matches are refused for {retry}s more (other"
        " traffic flows). To allow more, raise max_usd_per_day of the [[guardrails.budgets]]"
        " entry named 'search-key' and reload"
    )
    assert [e.budgets for e in d.events] == [("search-key",), ("search-key",), (), ()]


async def test_a_budget_by_key_name(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    """``[attribution.key_names]`` names a key; a budget matches the name (a glob here)."""
    d = await start_daemon()
    async with client(d, key="sk-team-search") as c:
        await chat(c, "0")
    first = d.events[0].attributes
    assert first is not None and first.key_id is not None
    await d.daemon.stop()
    named = await start_daemon(
        storage={"path": str(d.daemon.config.storage.path)},
        attribution={"key_names": {first.key_id: "team-search"}},
        **budgets({"name": "teams", "match": {"key_name": "team-*"}, "max_usd_per_hour": 1e-4}),
    )
    async with client(named, key="sk-team-search") as c, client(named, key="sk-x") as other:
        await chat(c, "1")  # $0.0001578: over $0.0001
        assert (await refused(c))[0] == "budget"
        await chat(other)
    assert [e.budgets for e in named.events] == [("teams",), (), ()]


async def test_warn_at_logs_once_per_crossing_and_counts(
    fake: FakeProvider, start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """warn_at 0.5 of $0.001 per hour: the 4th chat ($0.0006312) crosses $0.0005; the 5th and
    6th do not warn again. The day's window has its own limit and warning."""
    d = await start_daemon(
        **budgets(
            {
                "name": "ci",
                "match": {"app": "ci-*", "model": "gpt-4o*"},
                "max_usd_per_hour": 0.001,
                "max_usd_per_day": 0.1,
                "warn_at": 0.5,
            }
        )
    )
    caplog.set_level(logging.WARNING, logger="proxy.guardrails.budgets")
    async with client(d, "ci-nightly") as c:
        for i in range(6):
            await chat(c, str(i))
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.guardrails.budgets"]
    assert lines == [
        "budget 'ci' spent $0.000631 in the last hour: 63% of its $0.001000 limit (warn_at 0.5)"
    ]
    found = await metrics(d)
    assert found == {
        'atlasburn_budget_spend_usd{budget="ci",window="hour"}': pytest.approx(6 * COST),
        'atlasburn_budget_spend_usd{budget="ci",window="day"}': pytest.approx(6 * COST),
        'atlasburn_budget_limit_usd{budget="ci",window="hour"}': 0.001,
        'atlasburn_budget_limit_usd{budget="ci",window="day"}': 0.1,
        'atlasburn_budget_warnings_total{budget="ci",window="hour"}': 1.0,
        'atlasburn_budget_warnings_total{budget="ci",window="day"}': 0.0,
    }


async def test_restart_keeps_the_spend(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    path = tmp_path / "kept" / "spool.sqlite3"
    config = budgets(APP_A, {"name": "new", "match": {"app": "a"}, "max_usd_per_hour": 1})
    config["storage"] = {"path": str(path)}
    first = await start_daemon(**{**config, "guardrails": {"budgets": [APP_A]}})
    async with client(first, "a") as a:
        await chat(a, "1")
        await chat(a, "2")
    await first.daemon.stop()
    db = sqlite3.connect(path)
    rows = db.execute("SELECT budget, SUM(usd) FROM budget_spend GROUP BY budget").fetchall()
    db.close()
    assert rows == [("app-a", pytest.approx(2 * COST))]
    # Started again on the same store (with a budget newly added): app a is still over.
    second = await start_daemon(**config)
    async with client(second, "a") as a, client(second, "b") as b:
        layer, message, retry = await refused(a)
        await chat(b)
    assert layer == "budget"
    assert message == REFUSAL.format(retry)
    assert 3530 <= retry <= 3600
    spend = await metrics(second)
    assert spend['atlasburn_budget_spend_usd{budget="app-a",window="hour"}'] == pytest.approx(
        2 * COST
    )
    assert spend['atlasburn_budget_spend_usd{budget="new",window="hour"}'] == 0.0  # starts at $0
    assert len(fake.requests) == 3


def test_a_reload_keeps_the_spend_of_an_unchanged_budget() -> None:
    """(Reload in a running daemon goes through SIGHUP: tests/test_infra.py.)"""
    a = BudgetConfig("app-a", (("app", "a"),), max_usd_per_hour=0.0003)
    b = Budgets((a,))
    now = time.time()
    b.add(("app-a",), 2 * COST, now)
    assert b.check(("app-a",), now) is not None
    b.configure((replace(a, max_usd_per_hour=0.001),))  # a raised limit: the spend is kept
    assert b.check(("app-a",), now) is None
    assert b.state(now) == [("app-a", "hour", 2 * COST, 0.001, 1)]
    b.configure((replace(a, match=(("app", "a*"),), max_usd_per_hour=0.001),))
    assert b.state(now) == [("app-a", "hour", 0.0, 0.001, 1)]  # another scope: from $0


async def test_a_store_of_schema_2_gets_the_budget_table(tmp_path: Path) -> None:
    path = tmp_path / "old" / "s.sqlite3"
    s = await Store.open(StorageConfig(path=path), ship=False)
    await s.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE budget_spend; PRAGMA user_version = 2;")
    db.close()
    s = await Store.open(StorageConfig(path=path), ship=False)
    try:
        assert await s.budget_buckets(86400) == {}
    finally:
        await s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchall() == [(4,)]
    db.close()


def test_matching_globs_missing_dimensions_and_the_cache() -> None:
    from proxy.attribution import Attributes, Process

    configs = (
        BudgetConfig("ci", (("app", "ci-*"),), max_usd_per_hour=1),
        BudgetConfig("team", (("tag:team", "search"),), max_usd_per_hour=1),
        BudgetConfig("svc", (("provider", "openai"), ("unit", "*.service")), max_usd_per_hour=1),
        BudgetConfig("big", (("model", "gpt-5*"),), max_usd_per_day=1),
    )
    b = Budgets(configs)
    ci = Attributes(app="ci-nightly", tags=(("team", "search"),))
    assert b.matching(ci, "openai", "gpt-4o") == ("ci", "team")
    assert b.matching(ci, "openai", "gpt-5-mini") == ("ci", "team", "big")
    assert b.matching(Attributes(app="CI-x"), "openai", "") == ()  # case counts
    unit = Attributes(process=Process(7, "python3", "ci-runner.service"))
    assert b.matching(unit, "openai", "") == ("svc",)
    assert b.matching(unit, "anthropic", "") == ()
    assert b.matching(None, "openai", "gpt-5") == ("big",)
    # "*" needs a value: a request of no app is in no app's budget.
    assert (
        Budgets((BudgetConfig("any", (("app", "*"),), max_usd_per_hour=1),)).matching(
            None, "openai", "m"
        )
        == ()
    )
    assert Budgets().matching(ci, "openai", "gpt-4o") == ()


def test_check_says_until_when_and_a_crossing_warns_again_after_a_dip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = Budgets((BudgetConfig("x", (("app", "a"),), max_usd_per_hour=1.0, warn_at=0.5),))
    now = 1_800_000_000.0  # a minute's start
    caplog.set_level(logging.WARNING, logger="proxy.guardrails.budgets")
    b.add(("x",), 0.6, now)  # warns
    b.add(("x",), 0.3, now + 600)
    assert b.check(("x",), now + 600) is None
    b.add(("x",), 0.2123, now + 1200)  # 1.1123: over until the first 0.6 leaves the hour
    refusal = b.check(("x",), now + 1200)
    assert refusal is not None
    assert (refusal.layer, refusal.source, refusal.budget, refusal.key) == (
        "budget",
        "budget",
        "x",
        "max_usd_per_hour",
    )
    assert refusal.reason == "budget 'x' spent $1.1123 in the last hour, over its $1.00 limit"
    assert refusal.expires_at == now + 3600
    assert b.check(("x",), now + 3600) is None
    assert b.check(("y",), now + 1200) is None
    # At +4200 the 0.6 and the 0.3 have left the hour: 0.2124 is under warn_at (no warning,
    # and the next crossing warns again); 0.6124 crosses it again.
    b.add(("x",), 0.0001, now + 4200)
    b.add(("x",), 0.4, now + 4260)
    assert [r.getMessage() for r in caplog.records] == [
        "budget 'x' spent $0.600000 in the last hour: 60% of its $1.00 limit (warn_at 0.5)",
        "budget 'x' spent $0.612400 in the last hour: 61% of its $1.00 limit (warn_at 0.5)",
    ]
    assert b.warnings == {("x", "hour"): 2}


async def fleet_of_two(
    redis_url: str,  # noqa: F811
    start_daemon: StartDaemon,
) -> tuple[RunningDaemon, RunningDaemon, list[Any]]:
    """Two daemons of one fleet (a key prefix of their own), each with app a's budget, once
    both are connected; and their fleet syncs."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing: run scripts/system-deps")
    fleet = {"redis_url": redis_url, "key_prefix": f"t{random.getrandbits(32):x}:"}
    one = await start_daemon(fleet=fleet, **budgets(APP_A))
    two = await start_daemon(fleet=fleet, **budgets(APP_A))
    fleets = [d.daemon.app[RELAY].loop.fleet for d in (one, two)]
    await eventually(lambda: all(f is not None and f.connected for f in fleets), within=10)
    return one, two, fleets


async def test_the_fleet_sums_a_budget(
    redis_url: str,  # noqa: F811
    fake: FakeProvider,
    start_daemon: StartDaemon,
) -> None:
    """Two daemons of one fleet: app a's spend through the first makes the second refuse it
    (within a second or so), while app b flows on both."""
    one, two, fleets = await fleet_of_two(redis_url, start_daemon)
    async with client(one, "a") as a1, client(two, "a") as a2, client(two, "b") as b2:
        await chat(a1, "1")
        await chat(a2, "2")  # each daemon alone is under; the fleet is over
        relay = two.daemon.app[RELAY]
        await eventually(lambda: relay.budgets.check(("app-a",), time.time()) is not None, 5)
        layer, message, retry = await refused(a2)
        await chat(b2)
    assert layer == "budget"
    assert 3530 <= retry <= 3600
    assert message == REFUSAL.format(retry).replace("'app-a' spent", "'app-a' the fleet spent")


async def test_the_fleet_sums_a_budget_after_redis_lost_its_scripts(
    redis_url: str,  # noqa: F811
    fake: FakeProvider,
    start_daemon: StartDaemon,
) -> None:
    """SCRIPT FLUSH (an operator, a failover to a replica): the budgets' script is loaded again
    on the same connection; the fleet's sum still refuses, and no daemon dropped Redis."""
    one, two, fleets = await fleet_of_two(redis_url, start_daemon)
    import redis.asyncio

    r = redis.asyncio.Redis.from_url(redis_url)
    try:
        await r.script_flush()
    finally:
        await r.aclose()
    async with client(one, "a") as a1, client(two, "a") as a2:
        await chat(a1, "1")
        await chat(a2, "2")
        relay = two.daemon.app[RELAY]
        await eventually(lambda: relay.budgets.check(("app-a",), time.time()) is not None, 5)
    assert [f.reconnects for f in fleets if f is not None] == [0, 0]
    assert all(f is not None and f.connected for f in fleets)


def test_the_commented_example_parses() -> None:
    """config.example.toml's commented-out budgets, uncommented, are a valid config."""
    import tomllib

    from proxy.config import parse_config

    lines = (Path(__file__).parent.parent / "config.example.toml").read_text().splitlines()
    start = lines.index("# [[guardrails.budgets]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else "")
    config = parse_config(tomllib.loads("\n".join(block)), env={})
    assert config.guardrails.budgets == (
        BudgetConfig("ci-bot", (("app", "ci-*"),), 5.0, 50.0, 0.8),
        BudgetConfig(
            "search-key", (("key_id", "key_0123456789abcdef"), ("model", "gpt-4o*")), 0.0, 20.0
        ),
    )


async def test_a_websocket_session_counts_in_its_budget_and_is_refused_over_it(
    start_daemon: StartDaemon,
) -> None:
    """A Realtime session is priced when it ends ($0.0239136 here): over the $0.02 budget of its
    app, the next handshake of that app is refused with 429 before the upgrade."""
    from .fakes.realtime import FakeRealtime
    from .fakes.server import start
    from .test_websocket import TEXT_COST, TEXT_USAGES

    upstream = FakeRealtime(usages=TEXT_USAGES)
    running = await start(upstream.app())
    upstream.url = running.url
    try:
        d = await start_daemon(
            providers={"openai": {"base_url": running.url}},
            **budgets({"name": "voice", "match": {"app": "voice"}, "max_usd_per_hour": 0.02}),
        )
        c = openai.AsyncOpenAI(
            api_key="sk-test",
            base_url=d.url + "/v1",
            max_retries=0,
            default_headers={"AtlasBurn-App": "voice"},
        )
        async with c.realtime.connect(model="gpt-realtime") as conn:
            for _ in range(2):
                await conn.response.create()
                async for event in conn:
                    if event.type == "response.done":
                        break
        await eventually(lambda: len(d.events) == 1)
        handshake = {**HANDSHAKE, "AtlasBurn-App": "voice"}
        async with aiohttp.ClientSession() as s:
            async with s.get(d.url + "/v1/realtime?model=gpt-realtime", headers=handshake) as r:
                assert r.status == 429
                assert r.headers["AtlasBurn-Guardrail"] == "budget"
                message = (await r.json())["error"]["message"]
    finally:
        await running.stop()
    assert message.startswith(
        "AtlasBurn guardrail budget: budget 'voice' spent $0.023914 in the last hour, over its"
        " $0.020000 limit;"
    )
    assert [(e.status, e.budgets, round(e.cost_usd, 9)) for e in d.events] == [
        (101, ("voice",), round(TEXT_COST, 9)),
        (429, (), 0.0),
    ]
    assert len(upstream.handshakes) == 1


# A client that opens one connection per request (urllib, like curl or requests.post without
# a Session): argv url, count, and "slow" for streams; prints each answer's status.
ONE_SHOT_CLIENT = """
import sys, urllib.error, urllib.request
slow = sys.argv[3:] == ["slow"]  # a stream of events 50 ms apart: its process is found by then
for i in range(int(sys.argv[2])):
    body = b'{"model": "gpt-4o-mini", "stream": %s,"messages": [{"role":"user","content":"%d"}]}'
    req = urllib.request.Request(sys.argv[1], data=body % (b"true" if slow else b"false", i),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test",
                 "x-fake-delay-ms": "50"})
    try:
        with urllib.request.urlopen(req) as resp:
            resp.read()
            print(resp.status, flush=True)
    except urllib.error.HTTPError as exc:
        print(exc.code, flush=True)
"""


async def test_a_budget_by_unit_refuses_a_client_that_opens_a_connection_per_request(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    """A one-shot client's every request is the first of its connection, sent before the
    daemon knows its process: a unit budget over its limit let 26 of 40 through."""
    from .test_process_attribution import _cgroup2_root

    root = _cgroup2_root()
    if root is None or os.geteuid() != 0 or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 tree (as root) to put a client in a scope")
    name = f"atlasburn-budget-{uuid.uuid4().hex[:8]}"
    scope = root / f"{name}.slice" / f"{name}.scope"
    scope.mkdir(parents=True)

    async def run_client(count: int, *slow: str) -> list[str]:
        """The client, started in the scope (a shell that moves itself there, then runs it)."""
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            f'echo $$ > {scope / "cgroup.procs"} && exec "$0" -c "$@"',
            sys.executable,
            ONE_SHOT_CLIENT,
            d.url + "/v1/chat/completions",
            str(count),
            *slow,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        return out.decode().split()

    try:
        d = await start_daemon(
            attribution={"process": True},
            **budgets(
                {"name": "svc", "match": {"unit": f"{name}.scope"}, "max_usd_per_hour": 1e-4}
            ),
        )
        # The first crosses the budget (its cost known once answered, its unit once found).
        assert await run_client(1, "slow") == ["200"]
        await eventually(lambda: len(d.events) == 1)
        assert await run_client(12) == ["429"] * 12
        units = [
            e.attributes.process.unit for e in d.events if e.attributes and e.attributes.process
        ]
        assert units == [f"{name}.scope"] * 13
    finally:
        scope.rmdir()
        scope.parent.rmdir()
