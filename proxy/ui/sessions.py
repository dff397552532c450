"""Login tokens and browser sessions of the status page, kept in memory (a restart logs out).

A login token is minted by ``POST /api/ui/login-tokens`` (the local API key) and opens one
session, once, within ``TOKEN_SECONDS``: ``atlasburn-proxy ui`` prints it in a URL, so the page
never needs the API key itself. Tokens are compared in constant time (``hmac.compare_digest``
against each live token: there are at most ``MAX_TOKENS``). A session id is looked up by its
SHA-256 (how long a dict lookup takes tells nothing about the id itself); ids and tokens are 256
random bits (``secrets``). Both are bounded: minting past the bound forgets the oldest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

TOKEN_SECONDS = 120.0
SESSION_SECONDS = 12 * 3600.0
MAX_TOKENS = 16
MAX_SESSIONS = 64


class Sessions:
    """Live login tokens and sessions. ``clock``: monotonic seconds (tests pass their own)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._tokens: list[tuple[str, float]] = []  # (token, expires), oldest first
        self._sessions: OrderedDict[bytes, float] = OrderedDict()  # sha256(id) -> expires

    def mint(self) -> tuple[str, float]:
        """A new login token and its lifetime in seconds."""
        now = self._clock()
        self._tokens = [(t, exp) for t, exp in self._tokens if exp > now][-(MAX_TOKENS - 1) :]
        token = secrets.token_urlsafe(32)
        self._tokens.append((token, now + TOKEN_SECONDS))
        return token, TOKEN_SECONDS

    def redeem(self, token: str) -> str | None:
        """A new session id for a live, unused ``token`` (which is used up), else None."""
        now = self._clock()
        found = None
        given = token.encode()
        for i, (live, expires) in enumerate(self._tokens):
            # Every live token is compared (no early exit): the time taken says nothing.
            if hmac.compare_digest(live.encode(), given) and expires > now and found is None:
                found = i
        if found is None:
            return None
        del self._tokens[found]
        session = secrets.token_urlsafe(32)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        self._sessions[_digest(session)] = now + SESSION_SECONDS
        return session

    def valid(self, session: str | None) -> bool:
        if not session:
            return False
        key = _digest(session)
        expires = self._sessions.get(key)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._sessions[key]
            return False
        return True

    def carried_by(self, request: web.Request) -> bool:
        """Whether ``request`` carries a live session of this daemon (its port's cookie)."""
        return self.valid(request.cookies.get(request_cookie(request)))


def _digest(session: str) -> bytes:
    return hashlib.sha256(session.encode()).digest()


def cookie_name(port: int) -> str:
    """The session cookie of the daemon listening on ``port``: browsers send a cookie of
    ``localhost`` or ``127.0.0.1`` to every port of that host, so each daemon has its own name
    (one daemon's login does not overwrite another's)."""
    return f"atlasburn_session_{port}"


def request_cookie(request: web.Request) -> str:
    """The session cookie's name for the daemon ``request`` reached (the local port it arrived
    on; 0 if unknown)."""
    transport = request.transport
    name = transport.get_extra_info("sockname") if transport is not None else None
    return cookie_name(int(name[1]) if isinstance(name, tuple) and len(name) >= 2 else 0)
