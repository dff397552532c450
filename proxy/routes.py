"""Routing: which configured upstream a request path goes to.

Only the path chooses, and only among configured providers: ``/<provider>/<rest>`` goes to that
provider's ``base_url`` + ``/<rest>``; ``/v1/<rest>`` to the ``openai`` provider's ``/v1/<rest>``,
except ``/v1/messages...`` which goes to the ``anthropic`` provider. An absolute-form request target
or a ``Host`` header never chooses the upstream, and the upstream URL is built from the configured
origin, so no request can reach a host that is not configured (no open proxy, no SSRF).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from .adapters import ADAPTERS, Adapter
from .config import ProviderConfig
from .http1 import Origin


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    kind: str
    adapter: Adapter
    origin: Origin  # scheme, host, port: where connections go
    base_path: str  # "" or e.g. "/api" for a base URL with a path
    inject_stream_usage: bool = True

    def target(self, path: str, query: str) -> str:
        """The request target upstream for ``path`` (percent-encoded, starting with "/")."""
        target = self.base_path + path
        return target + "?" + query if query else target


class BadPath(ValueError):
    """A path with dot segments, which an upstream could resolve outside its base path."""


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    path: str  # the path below the upstream's base URL, starting with "/"


class Router:
    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self._upstreams: dict[str, Upstream] = {}
        for name, p in providers.items():
            url = p.base_url
            self._upstreams[name] = Upstream(
                name,
                p.kind,
                ADAPTERS[p.kind],
                Origin.make(url.scheme, url.raw_host or "", url.explicit_port),
                p.base_url.raw_path.rstrip("/"),
                p.inject_stream_usage,
            )
        self._openai = self._upstreams.get("openai")
        self._anthropic = self._upstreams.get("anthropic")

    def resolve(self, raw_path: str) -> Route | None:
        """The route for an encoded request path, None for no route; BadPath for dot segments."""
        if "." in raw_path or "%2" in raw_path or "%2" in raw_path.lower():
            _reject_dot_segments(raw_path)
        first, slash, rest = raw_path[1:].partition("/")
        if first == "v1":
            if rest == "messages" or rest.startswith(("messages/", "messages?")):
                upstream = self._anthropic
            else:
                upstream = self._openai
            return Route(upstream, raw_path) if upstream is not None else None
        upstream = self._upstreams.get(first)
        if upstream is None:
            return None
        return Route(upstream, slash + rest if slash else "/")


def _reject_dot_segments(raw_path: str) -> None:
    for segment in raw_path.split("/"):
        if unquote(segment) in (".", ".."):
            raise BadPath(f"path has a dot segment: {raw_path!r}")
