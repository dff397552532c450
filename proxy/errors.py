"""The daemon's exception tree.

    ProxyError                 base of everything the daemon raises on purpose
    ├── ConfigError            the configuration is invalid; carries every problem, each prefixed
    │                          with its dotted key (``providers.openai.base_url: ...``)
    ├── StateFileError         the state directory or a file in it is unsafe: another user could
    │                          plant, redirect or read it (``storage.path: ...``)
    ├── UpstreamError          the provider could not be reached or stopped answering
    │   ├── UpstreamTimeout    the provider did not connect or went silent for too long
    │   └── UpstreamBusy       no connection to the provider came free in time (503)
    └── ClientBodyTimeout      a client's request body stopped coming (answered as 408)

Foreign exceptions (the upstream client's, OSError, asyncio timeouts) are translated into these at
one boundary in ``relay.py``; everything else in the daemon only ever sees this tree.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class of the daemon's own errors."""


class ConfigError(ProxyError):
    """Invalid configuration. ``problems`` lists every error found, each starting with its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StateFileError(ProxyError):
    """The state directory or a file in it is not safe to use (``statefiles.py``); the message
    names ``storage.path``, what is wrong, whose the file is and how to fix it. ``run`` exits 2
    on it before binding: like a bad config, restarting cannot fix it."""


class UpstreamError(ProxyError):
    """The upstream provider could not be reached, or answered something that is not HTTP
    (answered as 502 with ``code``)."""

    def __init__(self, message: str, code: str = "upstream_unreachable") -> None:
        super().__init__(message)
        self.code = code


class UpstreamTimeout(UpstreamError):
    """The upstream provider timed out connecting or between reads (answered as 504)."""


class UpstreamBusy(UpstreamError):
    """Every upstream connection the daemon may open is in use, and none came free within
    ``upstream.pool_timeout_seconds`` (answered as 503 with Retry-After)."""


class ClientBodyTimeout(ProxyError):
    """A client paused its request body too long, or sent it too slowly (answered as 408).
    Raised from the reads of the request body (``server.body_timeout_seconds``)."""
