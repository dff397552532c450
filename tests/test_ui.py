"""The status page in a real browser (headless Chromium driven by Playwright), its login and its
defences, with traffic from the real ``openai`` SDK through the daemon to the fake provider.

Chromium is Debian's ``chromium`` (``scripts/system-deps`` installs it); Playwright drives it
through ``executable_path`` and never downloads a browser. Screenshots go to
``$ATLASBURN_ARTIFACTS`` when set (CI keeps them), else the test's tmp_path; their path is
printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from proxy.ui.sessions import TOKEN_SECONDS, Sessions

from .conftest import SPAWNED, RunningDaemon, StartDaemon
from .fakes.provider import FakeProvider
from .fakes.server import start

ROOT = Path(__file__).parent.parent
WAIT_MS = 15_000  # for the page to show what it fetches (it refreshes every 5 s)
CHAT_COST = 0.0001578  # gpt-4o-mini: 512 x 0.15 + 1024 x 0.075 + 7 x 0.60 per million
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed (scripts/system-deps installs Debian's chromium)")
    async with async_playwright() as p:
        # evil.example resolves to loopback: a DNS rebinding attack, for real.
        browser = await p.chromium.launch(
            executable_path=executable,
            args=["--host-resolver-rules=MAP evil.example 127.0.0.1"],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def run_ui(config: Path, listen: str) -> tuple[int | None, bytes, bytes]:
    """(exit code, stdout, stderr) of ``atlasburn-proxy ui --config config --listen listen``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "ui",
        "--config",
        str(config),
        "--listen",
        listen,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    SPAWNED.append(proc)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out, err


async def ui_command(daemon: RunningDaemon, spool: Path, tmp_path: Path) -> str:
    """The login URL that ``atlasburn-proxy ui`` prints for ``daemon`` (a real process)."""
    config = tmp_path / "ui.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    code, out, err = await run_ui(config, f"127.0.0.1:{daemon.daemon.port}")
    assert code == 0, err.decode()
    assert err.decode() == (
        f"ui: daemon http://127.0.0.1:{daemon.daemon.port}\n"
        "(a one-time link: it works once, within two minutes)\n"
    )
    url = out.decode().strip()
    assert url.startswith(f"http://127.0.0.1:{daemon.daemon.port}/ui/login?token=")
    assert len(url.rsplit("=", 1)[1]) == 43  # 256 random bits, base64url
    return url


async def started(
    start_daemon: StartDaemon, tmp_path: Path, **overrides: Any
) -> tuple[RunningDaemon, Path]:
    spool = tmp_path / "state" / "spool.sqlite3"
    storage = {"path": str(spool), "commit_interval_ms": 20}
    return await start_daemon(storage=storage, **overrides), spool


def client(daemon: RunningDaemon, app: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=daemon.url + "/v1",
        api_key="sk-test-not-a-real-key",
        max_retries=0,
        default_headers={"AtlasBurn-App": app},
    )


async def chat(daemon: RunningDaemon, app: str, text: str) -> None:
    async with client(daemon, app) as c:
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )


def artifact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("ATLASBURN_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def logged_in(browser: Browser, url: str) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 1200})
    page = await context.new_page()
    await page.goto(url)
    assert page.url.endswith("/ui")
    return context, page


async def test_see_spend_suspend_and_resume_in_a_browser(
    fake: FakeProvider, start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    budgets = [
        {"name": "billing", "match": {"app": "billing"}, "max_usd_per_hour": 0.001},
        {"name": "search", "match": {"app": "search"}, "max_usd_per_day": 0.0002},
    ]
    d, spool = await started(start_daemon, tmp_path, guardrails={"budgets": budgets})
    await chat(d, "billing", "the same question")
    await chat(d, "billing", "the same question")
    await chat(d, "search", "another question")
    await d.daemon.store.flush()

    context, page = await logged_in(browser, await ui_command(d, spool, tmp_path))
    [cookie] = await context.cookies()
    assert (cookie["name"], cookie["path"], cookie["httpOnly"], cookie["sameSite"]) == (
        f"atlasburn_session_{d.daemon.port}",
        "/",
        True,
        "Strict",
    )
    assert cookie["secure"] is False  # plain HTTP on loopback

    await expect(page.locator("#total-requests")).to_have_text("3", timeout=WAIT_MS)
    await expect(page.locator("#total-cost")).to_have_text(f"${3 * CHAT_COST:.6f}")
    assert f"${3 * CHAT_COST:.6f}" == "$0.000473"
    await expect(page.locator("#total-refused")).to_have_text("0")
    await expect(page.locator("#total-unknown")).to_have_text("0")
    await expect(page.locator("#by-app tbody tr")).to_have_text(
        [
            f"billing200${2 * CHAT_COST:.6f}",
            f"search100${CHAT_COST:.6f}",
        ]
    )
    repeated = d.events[0].fingerprint
    await expect(page.locator("#fingerprints tbody tr td")).to_have_text(
        [
            repeated,
            "openai",
            "gpt-4o-mini",
            "billing",
            "2",
            "0",
            f"${2 * CHAT_COST:.6f}",
            d.events[1].ts,
        ]
    )
    await expect(page.locator("#guard-state")).to_have_text("ok")
    await expect(page.locator("#spend-legend span")).to_have_text(["gpt-4o-mini"])
    await expect(page.locator("#budgets tbody tr")).to_have_text(
        [
            "billingapp=billinghour$0.000316$0.001000$0.000684ok",
            "searchapp=searchday$0.000158$0.000200$0.000042ok",
        ]
    )

    await page.fill("#reason", "runaway batch job")
    await page.click("#suspend")
    await expect(page.locator("#guard-state")).to_have_text("SUSPENDED")
    await expect(page.locator("#guard-detail")).to_contain_text("by manual: runaway batch job")
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(d, "billing", "while suspended")
    assert refused.value.status_code == 429
    await d.daemon.store.flush()
    await expect(page.locator("#refusals tbody tr")).to_have_text(["manual1"], timeout=WAIT_MS)
    await expect(page.locator("#total-refused")).to_have_text("1")

    await page.fill("#reason", "fixed")
    await page.click("#resume")
    await expect(page.locator("#guard-state")).to_have_text("ok")
    assert d.daemon.kill.check() is None
    await chat(d, "search", "after the resume")
    await d.daemon.store.flush()

    await page.click("#stack button[data-stack=by_app]")
    await page.click("#range button[data-range=hour]")  # (which fetches at once)
    await expect(page.locator("#updated")).to_contain_text("last hour")
    await expect(page.locator("#total-requests")).to_have_text("5", timeout=WAIT_MS)
    await expect(page.locator("#total-cost")).to_have_text(f"${4 * CHAT_COST:.6f}")
    await expect(page.locator("#budgets tbody tr")).to_have_text(
        [
            "billingapp=billinghour$0.000316$0.001000$0.000684ok",
            "searchapp=searchday$0.000316$0.000200$0.000000over",
        ]
    )
    # stacked by app, biggest spend first (a tie: by name)
    await expect(page.locator("#spend-legend span")).to_have_text(["billing", "search"])
    await expect(page.locator("#by-app tbody tr")).to_have_text(
        [f"billing310${2 * CHAT_COST:.6f}", f"search200${2 * CHAT_COST:.6f}"]
    )

    shot = artifact(tmp_path, "status-page.png")
    await page.screenshot(path=str(shot), full_page=True)
    print(f"status page screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    await context.close()


async def test_a_login_url_works_once(
    fake: FakeProvider, start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    d, spool = await started(start_daemon, tmp_path)
    url = await ui_command(d, spool, tmp_path)
    first, _ = await logged_in(browser, url)
    await first.close()
    second = await browser.new_context()
    page = await second.new_page()
    answer = await page.goto(url)
    assert answer is not None and answer.status == 401
    await expect(page.locator("body")).to_contain_text("already used, has expired or is wrong")
    assert await second.cookies() == []
    answer = await page.goto(d.url + "/ui")  # and the page is not served without a session
    assert answer is not None and answer.status == 401
    await second.close()


def test_a_login_token_expires() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    token, seconds = sessions.mint()
    assert seconds == TOKEN_SECONDS == 120.0
    now[0] += TOKEN_SECONDS
    assert sessions.redeem(token) is None
    token, _ = sessions.mint()
    now[0] += TOKEN_SECONDS - 1
    session = sessions.redeem(token)
    assert session is not None and sessions.valid(session)
    assert sessions.redeem(token) is None  # used
    assert not sessions.valid(session[:-1] + ("A" if session[-1] != "A" else "B"))


ATTACK = """<!doctype html><body>
<form id=f method=POST enctype=text/plain action="{target}/api/guardrails/enforce">
<input name='{{"org_id":"org_local","action":"suspend","ttl_seconds":3600,"reason":"x","pad":"'
 value='"}}'>
</form><script>document.getElementById("f").submit()</script></body>"""


async def test_a_cross_site_form_post_is_refused(
    fake: FakeProvider, start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    """A page of another origin (another loopback port: same site, so the SameSite=Strict
    cookie is sent along) submits a form to suspend the org: refused, nothing changes."""
    d, spool = await started(start_daemon, tmp_path)
    context, page = await logged_in(browser, await ui_command(d, spool, tmp_path))

    async def evil(request: web.Request) -> web.Response:
        return web.Response(text=ATTACK.format(target=d.url), content_type="text/html")

    attacker = web.Application()
    attacker.router.add_get("/", evil)
    running = await start(attacker)
    try:
        async with page.expect_response(d.url + "/api/guardrails/enforce") as answer_info:
            await page.goto(running.url + "/")
        answer = await answer_info.value
        assert answer.status == 403
        assert (await answer.json())["error"]["code"] == "cross_origin_request"
        assert answer.request.headers["origin"] == running.url
    finally:
        await running.stop()
    assert d.daemon.kill.check() is None
    await context.close()


async def test_a_rebinding_host_is_refused(
    fake: FakeProvider, start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    """evil.example resolves to the daemon's address (DNS rebinding): its pages are not served,
    even to a browser that is logged in on the daemon's own address."""
    d, spool = await started(start_daemon, tmp_path)
    context, page = await logged_in(browser, await ui_command(d, spool, tmp_path))
    for path in ("/ui", "/api/stats", "/ui/app.js"):
        answer = await page.goto(f"http://evil.example:{d.daemon.port}{path}")
        assert answer is not None and answer.status == 403
        assert (await answer.json())["error"]["code"] == "forbidden_host"
    await context.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/ui", headers={"Host": "evil.example:8787"}) as r:
            assert r.status == 403


async def test_headers_and_session_rules(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Without a browser: the security headers, the cookie's flags as sent, and a session
    that may read but may change nothing without the page's own Origin."""
    d, spool = await started(start_daemon, tmp_path)
    url = await ui_command(d, spool, tmp_path)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/ui"
            set_cookie = r.headers["Set-Cookie"]
        name = f"atlasburn_session_{d.daemon.port}"
        assert set_cookie.startswith(name + "=")
        flags = sorted(p.strip() for p in set_cookie.split(";")[1:])
        assert flags == ["HttpOnly", "Max-Age=43200", "Path=/", "SameSite=Strict"]
        for path in ("/ui", "/api/stats?range=hour"):
            async with s.get(d.url + path) as r:
                assert r.status == 200
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["X-Frame-Options"] == "DENY"
                assert r.headers["Referrer-Policy"] == "no-referrer"
                assert r.headers["Cache-Control"] == "no-store"
        body = {"org_id": "org_local", "action": "suspend", "ttl_seconds": 60}
        async with s.post(d.url + "/api/guardrails/enforce", json=body) as r:
            assert r.status == 403
            assert (await r.json())["error"] == {
                "code": "cross_origin_request",
                "message": "a change made with the status page's session must come from the "
                "page itself",
            }
        assert d.daemon.kill.check() is None
        origin = {"Origin": f"http://127.0.0.1:{d.daemon.port}"}
        async with s.post(d.url + "/api/guardrails/enforce", json=body, headers=origin) as r:
            assert r.status == 200
        assert d.daemon.kill.check() is not None
        # a session cannot mint logins, nor post events
        async with s.post(d.url + "/api/ui/login-tokens", headers=origin) as r:
            assert r.status == 401
        async with s.post(d.url + "/api/ingest", json={"events": []}, headers=origin) as r:
            assert r.status == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/api/stats") as r:
            assert r.status == 401
        key = (spool.parent / "local-api-key").read_text().strip()  # the daemon generated it
        async with s.get(d.url + "/api/stats", headers={"AtlasBurn-API-Key": key}) as r:
            assert r.status == 200
            assert (await r.json())["totals"]["requests"] == 0


async def test_the_ui_command_says_when_no_daemon_answers(tmp_path: Path) -> None:
    config = tmp_path / "ui.toml"
    config.write_text('[atlasburn]\napi_key = "abn_test_ui_key"\n')
    code, out, err = await run_ui(config, "127.0.0.1:9")  # discard: nothing listens there
    assert (code, out) == (1, b"")
    assert err.decode() == (
        "ui: daemon http://127.0.0.1:9\n"
        "cannot reach the daemon at http://127.0.0.1:9: [Errno 111] Connection refused\n"
    )
