"""A web page is not a client: the Host and Origin checks every request passes first.

The daemon listens on loopback, and every web page the user opens can make the browser send it
requests. Two kinds are refused (403, JSON), before any route, key check or guardrail sees them:

- DNS rebinding. A page on ``evil.example`` whose name is rebound to 127.0.0.1 talks to the daemon
  as if it were its own site, and can read the answers (``/metrics``, proxied completions). Its
  requests carry ``Host: evil.example:8787``. Only ``Host`` values that an attacker's page cannot
  have are served: IP addresses, loopback names (``localhost``, ``*.localhost``) and
  ``server.allowed_hosts`` (a sidecar's service name). A request without ``Host`` (HTTP/1.0) is
  not from a browser.
- Cross-site requests. Any page can send "simple" requests (``POST`` with ``text/plain``,
  ``mode: "no-cors"``) without reading the answer: four of them would trip the loop detector and
  suspend the org. Browsers say where a request comes from: ``Origin`` on every cross-origin
  request and every POST, ``Sec-Fetch-Site`` on every request (Chromium, Firefox, Safari). A
  request is refused when its ``Origin`` is neither the daemon's own (``http://`` + its ``Host``)
  nor in ``server.allowed_origins``, or when ``Sec-Fetch-Site`` says ``cross-site`` or
  ``same-site`` without an allowed ``Origin``. SDKs, curl and servers send neither header, so
  they never pay for more than two dictionary lookups.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Mapping

from yarl import URL

from .config import ServerConfig, origin_of

log = logging.getLogger(__name__)

_MAX_CACHED = 1024
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})


class BrowserGuard:
    """Decides whether a request's ``Host``, ``Origin`` and ``Sec-Fetch-Site`` may be served."""

    def __init__(self, config: ServerConfig) -> None:
        hosts = config.allowed_hosts
        self.any_host = "*" in hosts
        self.names = frozenset(h for h in hosts if not h.startswith(".") and h != "*")
        self.suffixes = tuple(h for h in hosts if h.startswith("."))
        self.origins = frozenset(config.allowed_origins)
        self._hosts: dict[str, bool] = {}  # Host header -> served (bounded)
        self._warned: dict[str, float] = {}

    def refusal(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """``(code, message)`` of the 403 to answer, or None to serve the request."""
        host = headers.get("Host")
        if host is not None and not self.host_ok(host):
            self._warn("host", host)
            return (
                "forbidden_host",
                f"Host {host[:256]!r} is not served (DNS rebinding); add the name to "
                "server.allowed_hosts if clients use it",
            )
        origin = headers.get("Origin")
        site = headers.get("Sec-Fetch-Site")
        if origin is None and site is None:
            return None
        if origin is not None:
            if origin in self.origins or (host is not None and _same_origin(origin, host)):
                return None
            self._warn("origin", origin)
            return (
                "cross_origin_request",
                f"requests from web pages of {origin[:256]!r} are refused; add the origin to "
                "server.allowed_origins if it calls the daemon on purpose",
            )
        if site is not None and site.lower() in _FOREIGN_SITES:
            self._warn("origin", f"Sec-Fetch-Site: {site[:32]}")
            return (
                "cross_site_request",
                f"requests from other sites' web pages are refused (Sec-Fetch-Site: {site[:32]})",
            )
        return None

    def host_ok(self, host: str) -> bool:
        known = self._hosts.get(host)
        if known is None:
            known = self._host_ok(host)
            if len(self._hosts) >= _MAX_CACHED:
                self._hosts.clear()
            self._hosts[host] = known
        return known

    def _host_ok(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _host_name(host)
        if name is None:
            return False
        if _is_ip(name):
            return True
        name = name.rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return True
        if name in self.names:
            return True
        return any(name.endswith(s) or name == s[1:] for s in self.suffixes)

    def _warn(self, kind: str, value: str) -> None:
        """One log line per kind a minute (a page may send thousands)."""
        now = time.monotonic()
        if now - self._warned.get(kind, -60.0) < 60:
            return
        self._warned[kind] = now
        shown = value[:128].encode("unicode_escape").decode("ascii")
        log.warning(
            "refused a request from a web page (%s %s); more are counted in "
            "atlasburn_limit_hits_total",
            kind,
            shown,
        )


def _host_name(host: str) -> str | None:
    """The name or address of a ``Host`` header, without port, lowercase; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return host[1:end]
    name, colon, port = host.rpartition(":")
    if not colon:
        return host
    if not port.isdigit():
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def own_origin(headers: Mapping[str, str]) -> bool:
    """Whether the request says it comes from the daemon's own page: an ``Origin`` that is
    ``http://`` + its ``Host``. A browser sends ``Origin`` with every POST and DELETE it makes,
    so a state change that a session cookie authorizes must have it."""
    origin = headers.get("Origin")
    host = headers.get("Host")
    return origin is not None and host is not None and _same_origin(origin, host)


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` is ``http://`` + the request's ``Host`` (the daemon serves plain HTTP)."""
    try:
        url = URL(origin)
        own = URL(f"http://{host.strip()}")
    except ValueError:
        return False
    if url.scheme != "http" or not url.host or url.path not in ("", "/"):
        return False
    return origin_of(url) == origin_of(own)
