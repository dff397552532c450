"""The status page's handlers: the page, its assets, its login and its JSON.

Routes (each behind ``browsers.BrowserGuard`` like every route: a foreign ``Host`` or ``Origin``
is refused 403 before anything here runs):

- ``GET /ui``: the page, for a browser with a session (401 and how to log in otherwise).
- ``GET /ui/login?token=T``: redeems a one-time login token (``sessions``), sets the session
  cookie (HttpOnly, SameSite=Strict, Path=/; not Secure: the daemon serves plain HTTP on
  loopback) and redirects (303) to ``/ui``; 401 for a used, expired or unknown token.
- ``GET /ui/app.js``, ``/ui/style.css``: the page's code and style (nothing secret in them).
- ``POST /api/ui/login-tokens``: mints a login token; the local API key only (a session cannot
  mint more sessions). Answer: ``{"token", "path": "/ui/login?token=...", "expires_in": s}``.
- ``GET /api/stats?range=hour|day|week``: the page's numbers (``stats.snapshot``) plus the
  guardrail state and budgets; the API key or a session. 503 when the store is too slow.

Every answer carries ``SECURITY_HEADERS``: a Content-Security-Policy that allows only the
daemon's own origin (no inline script or style, no framing, no form posting elsewhere), no
referrer (the login URL holds a token), no caching.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .. import stats
from ..api import LocalAPI, error
from ..guardrails import Budgets, KillSwitch
from .sessions import SESSION_SECONDS, Sessions, request_cookie

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_READERS = 2  # snapshots computed at once (each is a thread and a SQLite connection)

_LOGIN_HELP = (
    "<!doctype html><meta charset=utf-8><title>AtlasBurn proxy</title>"
    "<p>{}</p><p>Run <code>atlasburn-proxy ui</code> on this host and open the URL it prints.</p>"
)


def secured(handler: Handler) -> Handler:
    """``handler`` whose answer carries ``SECURITY_HEADERS``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


def _file(name: str) -> bytes:
    return (importlib.resources.files(__package__) / "static" / name).read_bytes()


class StatusPage:
    """The handlers; ``budgets`` gives the budgets in force (the relay's: a reload replaces
    them)."""

    def __init__(
        self,
        local: LocalAPI,
        sessions: Sessions,
        kill: KillSwitch,
        store_path: Path,
        budgets: Callable[[], Budgets],
    ) -> None:
        self._local = local
        self._sessions = sessions
        self._kill = kill
        self._store_path = store_path
        self._budgets = budgets
        self._readers = asyncio.Semaphore(MAX_READERS)
        self._page = _file("index.html")
        self._assets = {name: _file(name) for name in ASSETS}

    async def page(self, request: web.Request) -> web.StreamResponse:
        if not self._sessions.carried_by(request):
            return _html(401, "You are not logged in to this daemon's status page.")
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            return error(404, "not_found", "no such file")
        return web.Response(body=self._assets[name], content_type=ASSETS[name], charset="utf-8")

    async def login(self, request: web.Request) -> web.StreamResponse:
        session = self._sessions.redeem(request.query.get("token", ""))
        if session is None:
            return _html(401, "This login link was already used, has expired or is wrong.")
        response = web.Response(status=303, headers={"Location": "/ui"})
        response.set_cookie(
            request_cookie(request),
            session,
            max_age=int(SESSION_SECONDS),
            path="/",
            httponly=True,
            samesite="Strict",
        )
        return response

    async def login_tokens(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return error(405, "method_not_allowed", "use POST")
        refused = self._local.authorize(request, session=False)  # a session mints none
        if refused is not None:
            return refused
        token, seconds = self._sessions.mint()
        log.warning("audit: a status page login token was issued")
        return web.json_response(
            {"token": token, "path": f"/ui/login?token={token}", "expires_in": seconds}
        )

    async def stats(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return error(405, "method_not_allowed", "use GET")
        refused = self._local.authorize(request)
        if refused is not None:
            return refused
        span = request.query.get("range", "day")
        if span not in stats.RANGES:
            return error(400, "invalid_range", f"range must be one of {', '.join(stats.RANGES)}")
        try:
            async with self._readers:
                answer = await asyncio.to_thread(stats.snapshot, self._store_path, span)
        except stats.StatsTimeout as exc:
            return error(503, "store_busy", str(exc))
        except FileNotFoundError:
            return error(503, "no_store", "the store is not created yet")
        answer["org_id"] = self._kill.org_id
        answer["guardrail"] = self._guardrail()
        answer["budgets"] = self.budgets()
        return web.json_response(answer)

    def _guardrail(self) -> dict[str, Any]:
        current = self._kill.check()
        return {
            "state": "suspended" if current else "ok",
            "layer": current.layer if current else None,
            "reason": current.reason if current else None,
            "expires_at": current.expires_iso() if current else None,
        }

    def budgets(self, now: float | None = None) -> list[dict[str, Any]]:
        """``[{"name", "scope", "window", "spent_usd", "limit_usd", "left_usd", "over"}]``: one
        row per ``[[guardrails.budgets]]`` entry and window that has a limit, in config order.
        Spent is what the budget counts (the fleet's total with ``[fleet]`` when larger);
        ``over``: its requests are refused now."""
        now = time.time() if now is None else now
        budgets = self._budgets()
        rows = []
        for name, window, spent, limit, _ in budgets.state(now):
            budget = budgets.budgets[name]
            rows.append(
                {
                    "name": name,
                    "scope": " ".join(f"{d}={p}" for d, p in budget.match),
                    "window": window,
                    "spent_usd": round(spent, 10),
                    "limit_usd": limit,
                    "left_usd": round(max(limit - spent, 0.0), 10),
                    "over": budget.until > now,
                }
            )
        return rows


def _html(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=_LOGIN_HELP.format(message).encode(),
        content_type="text/html",
        charset="utf-8",
    )
