"""Configuration: TOML in, frozen dataclasses out.

``load_config`` reads the file (or nothing: the embedded defaults), expands ``${VAR}`` references
from the environment, checks every key and value, and either returns a ``Config`` or raises one
``ConfigError`` that lists every problem, each starting with its dotted key. Nothing else in the
daemon validates configuration; everything downstream may trust these objects.

Provider tables merge over the embedded ones by name: ``[providers.openai] base_url = ...`` changes
only the OpenAI upstream, a new name adds a provider, and ``enabled = false`` removes one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from yarl import URL

from .adapters import ADAPTERS
from .attribution import KEY_ID, MAX_BYTES, TAG_NAME
from .errors import ConfigError

T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:8787"

# Route prefixes the daemon serves itself; a provider may not shadow them.
RESERVED_PROVIDER_NAMES = frozenset({"api", "healthz", "readyz", "metrics", "v1"})
_PROVIDER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_ORG_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_ENV_REF = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("openai", "https://api.openai.com"),
    "anthropic": ("anthropic", "https://api.anthropic.com"),
    "gemini": ("gemini", "https://generativelanguage.googleapis.com"),
}


class Secret:
    """A string that never shows itself in ``repr``/``str`` (and so never in a log line)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 8787))
    max_body_bytes: int = 32 * 1024 * 1024
    # Bodies up to this size are read whole before they go upstream (fingerprinted from their
    # JSON, stream usage asked for); larger ones stream to the provider as they arrive.
    max_buffered_body_bytes: int = 4 * 1024 * 1024
    # Bytes of request bodies being read whole, all connections together: past it a body is
    # streamed upstream like a large one (held bodies cannot take the daemon's memory).
    max_buffered_total_bytes: int = 256 * 1024 * 1024
    # X-Forwarded-For / Forwarded / X-Real-IP from clients: "keep" (relay as sent), "drop"
    # (remove them: a client cannot claim an address), "append" (add the client's address to
    # X-Forwarded-For, as a reverse proxy does).
    forwarded_for: str = "keep"
    shutdown_grace_seconds: float = 30.0
    # On SIGTERM, answer /readyz with 503 this long before closing the listener (load balancers
    # and Kubernetes stop sending new requests), then drain.
    drain_seconds: float = 0.0
    # A request head must arrive whole within this long (from its first byte, or from the
    # connection's start); a request body may pause this long between two reads; a keep-alive
    # connection may wait this long for its next request. (nginx: client_header_timeout 60 s,
    # client_body_timeout 60 s, keepalive_timeout 75 s.)
    header_timeout_seconds: float = 60.0
    body_timeout_seconds: float = 60.0
    keepalive_timeout_seconds: float = 75.0
    # A client that takes no byte of its answer this long (while some waits for it) is closed
    # (nginx: send_timeout 60 s).
    send_timeout_seconds: float = 60.0
    # Open client connections at most; past it the oldest idle ones (then the oldest still
    # sending a request head) are closed to make room. 0: derived from the open-file limit.
    max_client_connections: int = 0
    # Host header values served besides IP addresses and loopback names (DNS rebinding):
    # e.g. a sidecar's service name. ".example" matches every subdomain; "*" any host.
    allowed_hosts: tuple[str, ...] = ()
    # Origins of web pages that may call the daemon (e.g. "http://localhost:3000"); a request
    # from any other page (a foreign Origin, or Sec-Fetch-Site: cross-site) is refused.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 600.0
    max_connections: int = 1000
    # A request that cannot get one of max_connections within this long gets 503 (HAProxy:
    # "timeout queue", which defaults to its connect timeout).
    pool_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "logfmt"  # or "json"
    access: bool = True  # one line per request at info


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = field(default_factory=lambda: default_state_dir() / "atlasburn-proxy.sqlite3")
    # Events finished within this interval are committed together (one fsync).
    commit_interval_ms: int = 100
    # Bound on the stored events; past it the oldest are dropped (shipped ones first), counted.
    max_spool_mb: float = 512.0
    # Shipped events (and, in local-only mode, all events) are kept this long for reports.
    retention_hours: float = 168.0
    # Events waiting in memory while the store cannot write (disk full); past it: dropped, counted.
    max_pending_events: int = 100_000


@dataclass(frozen=True, slots=True)
class AtlasBurnConfig:
    api_base: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""))
    org_id: str = "org_local"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    flush_interval_ms: int = 1000
    batch_max_events: int = 500
    # Retries back off exponentially with equal jitter, up to this long between attempts.
    max_backoff_seconds: float = 60.0
    # One ingest call may take this long.
    request_timeout_seconds: float = 30.0
    # While the AtlasBurn API keeps the org suspended, ask it this often whether it still does.
    poll_interval_seconds: float = 15.0
    # On shutdown, one last shipping attempt may take this long; the rest stays spooled.
    shutdown_flush_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class LoopDetectorConfig:
    enabled: bool = True
    threshold: int = 4
    window_seconds: float = 60.0
    ttl_seconds: float = 7200.0
    scope: str = "org"  # "org": suspend the org; "fingerprint": refuse only that request
    allow_fingerprints: frozenset[str] = frozenset()
    exempt_header: str = ""  # a request carrying this header (non-empty) is not counted
    max_tracked: int = 250_000  # about how many distinct fingerprints one window holds


@dataclass(frozen=True, slots=True)
class AgentLoopConfig:
    enabled: bool = True
    threshold: int = 4  # one tool call answered by the same result this many times ...
    lookback: int = 20  # ... among the conversation's last `lookback` tool calls trips it
    scope: str = "conversation"  # "conversation": refuse that request; "org": suspend the org
    ttl_seconds: float = 7200.0  # scope "org": how long the suspension lasts
    exempt_tools: frozenset[str] = frozenset()  # tool names never counted (shell globs too)


@dataclass(frozen=True, slots=True)
class SpendCapConfig:
    enabled: bool = False
    max_usd_per_hour: float = 0.0  # 0: no hourly cap
    max_usd_per_day: float = 0.0  # 0: no daily cap


# What a budget's ``match`` may name: attribution dimensions and the event's own fields.
BUDGET_DIMENSIONS = ("app", "user", "key_id", "key_name", "unit", "model", "provider")
_BUDGET_NAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,64}")
# What a header name may hold (RFC 9110 token): AtlasBurn-Tag-<Name> carries any of it.
_TAG_NAME = re.compile(TAG_NAME)
MAX_BUDGETS = 256


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """One ``[[guardrails.budgets]]`` entry: the spend of the requests it matches, capped.

    ``match`` holds (dimension, pattern) pairs, sorted: a request matches when every dimension
    has a value that matches its pattern (a shell glob: ``ci-*``; ``*`` alone: any value, but
    there must be one). Dimensions: ``BUDGET_DIMENSIONS`` and ``tag:<Name>``."""

    name: str
    match: tuple[tuple[str, str], ...]
    max_usd_per_hour: float = 0.0  # 0: no hourly limit
    max_usd_per_day: float = 0.0  # 0: no daily limit
    warn_at: float = 0.8  # the fraction of a limit at which a warning is logged and counted


@dataclass(frozen=True, slots=True)
class GuardrailsConfig:
    dumb_loop_detector: LoopDetectorConfig = field(default_factory=LoopDetectorConfig)
    agent_loop_detector: AgentLoopConfig = field(default_factory=AgentLoopConfig)
    spend_cap: SpendCapConfig = field(default_factory=SpendCapConfig)
    budgets: tuple[BudgetConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    """``[attribution]``: who is spending (DESIGN "Attribution")."""

    # false: events carry no attributes (AtlasBurn-* headers are still never relayed).
    enabled: bool = True
    # Find the calling process of a client on this host (Linux only: /proc).
    process: bool = field(default_factory=lambda: os.path.isdir("/proc/self/fd"))
    # key_id -> a name for reports and budgets ("key_0123456789abcdef" = "team-search").
    key_names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    # redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path; empty: stand alone. A
    # Secret: the password in it never shows in a log line.
    redis_url: Secret = field(default_factory=lambda: Secret(""))
    key_prefix: str = "atlasburn:"  # every key and channel starts with it


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: URL
    # Ask for usage in OpenAI chat/completion streams that do not ask for it (and hide it again).
    inject_stream_usage: bool = True
    # The genai-prices provider whose prices apply; "" = by base URL, then by kind; "none" = off.
    price_as: str = ""


def _default_providers() -> dict[str, ProviderConfig]:
    return {
        name: ProviderConfig(name, kind, URL(base))
        for name, (kind, base) in DEFAULT_PROVIDERS.items()
    }


@dataclass(frozen=True, slots=True)
class PriceDataConfig:
    """``[price_data]``: newer genai-prices data for a running daemon (off unless a URL is set)."""

    refresh_url: str = ""  # e.g. genai-prices' own data.json; "" keeps the packaged snapshot
    refresh_interval_seconds: float = 3600.0
    timeout_seconds: float = 30.0  # one whole fetch, connect to last byte
    max_bytes: int = 16 * 1024 * 1024  # a larger file is refused (the real one is ~1 MB)


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """``[pricing."<model>"]``: USD per million tokens for a model (on any provider, or one)."""

    model: str
    input: float
    output: float
    cached_input: float
    cache_write: float
    cache_write_1h: float
    provider: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    atlasburn: AtlasBurnConfig = field(default_factory=AtlasBurnConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    providers: Mapping[str, ProviderConfig] = field(default_factory=_default_providers)
    pricing: Mapping[str, PriceOverride] = field(default_factory=dict)
    price_data: PriceDataConfig = field(default_factory=PriceDataConfig)
    # Non-fatal remarks found while loading (e.g. an unset environment variable), for the log.
    warnings: tuple[str, ...] = ()


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=), else ``~/.local/state/atlasburn-proxy``."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "atlasburn-proxy"


# --------------------------------------------------------------------------- value parsers
# Each takes the raw value and returns the parsed one or raises ValueError with a message that
# completes "<key>: ...".


def parse_listen(value: str) -> Listen:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f"expected HOST:PORT (e.g. '127.0.0.1:8787' or '[::1]:8787'), got {value!r}"
        )
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unbalanced brackets in {value!r}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets, e.g. '[::1]:8787', got {value!r}")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_s!r}")
    return Listen(host, int(port_s))


def parse_http_url(value: str) -> URL:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    if url.user is not None or url.password is not None:
        raise ValueError(
            "credentials do not belong in the URL; providers' keys come from the client"
        )
    if url.query_string or url.fragment:
        raise ValueError(f"a base URL has no query or fragment, got {value!r}")
    return url.with_path(url.path.rstrip("/"))


def _expand_env(value: str, key: str, env: Mapping[str, str], warnings: list[str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name is None:
            return "$"
        if name in env:
            return env[name]
        if default is not None:
            return default
        warnings.append(f"{key}: environment variable {name} is not set; using an empty value")
        return ""

    return _ENV_REF.sub(substitute, value)


# --------------------------------------------------------------------------- the table reader


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
}


class _Table:
    """Reads one TOML table, recording each problem under its dotted key instead of stopping."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[str],
        env: Mapping[str, str],
        warnings: list[str],
    ) -> None:
        self._data = data
        self._path = path
        self._problems = problems
        self._env = env
        self._warnings = warnings
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def problem(self, name: str, message: str) -> None:
        self._problems.append(f"{self.key(name)}: {message}")

    def warn(self, name: str, message: str) -> None:
        self._warnings.append(f"{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self._data

    def get(
        self,
        name: str,
        kind: type[T],
        default: T,
        check: Callable[[Any], Any] | None = None,
    ) -> Any:
        """The value of ``name`` as ``kind``; ``check`` may convert it or raise ValueError."""
        self._seen.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.problem(name, f"expected {_TYPE_NAMES[kind]}, got {_describe(value)}")
            return default
        if isinstance(value, str):
            value = _expand_env(value, self.key(name), self._env, self._warnings)
        if check is None:
            return value
        try:
            return check(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def table(self, name: str) -> _Table:
        self._seen.add(name)
        value = self._data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {_describe(value)}")
            value = {}
        return _Table(value, self.key(name), self._problems, self._env, self._warnings)

    def keys(self) -> list[str]:
        """The names this table holds (for tables whose keys are data: key_names, match); each
        counts as known (its problems are reported by the caller)."""
        self._seen.update(self._data)
        return list(self._data)

    def tables(self) -> dict[str, _Table]:
        """Every sub-table of this table, by name (for ``[providers.<name>]``)."""
        out: dict[str, _Table] = {}
        for name in self._data:
            out[name] = self.table(name)
        return out

    def array_of_tables(self, name: str) -> list[_Table]:
        """Each table of the array ``name`` (``[[guardrails.budgets]]``), keyed ``name[i]``."""
        self._seen.add(name)
        value = self._data.get(name, [])
        if not isinstance(value, list):
            self.problem(
                name, f"expected an array of tables ([[{self.key(name)}]]), got {_describe(value)}"
            )
            return []
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.problem(f"{name}[{i}]", f"expected a table, got {_describe(item)}")
                continue
            out.append(
                _Table(item, f"{self.key(name)}[{i}]", self._problems, self._env, self._warnings)
            )
        return out

    def done(self) -> None:
        """Report each key of the table that nothing asked for, with the nearest known key
        (``server.lisen: unknown key; did you mean `listen`?``) when one is close."""
        known = sorted(self._seen)
        for name in self._data:
            if name not in self._seen:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                self.problem(name, "unknown key" + hint)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def _at_least(minimum: float, what: str = "") -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}{what}, got {value}")
        return value

    return check


def _between(low: float, high: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value.lower()

    return check


# --------------------------------------------------------------------------- sections


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        listen=t.get("listen", str, d.listen, parse_listen),
        max_body_bytes=t.get("max_body_bytes", int, d.max_body_bytes, _at_least(1, " bytes")),
        max_buffered_body_bytes=t.get(
            "max_buffered_body_bytes", int, d.max_buffered_body_bytes, _at_least(1, " bytes")
        ),
        max_buffered_total_bytes=t.get(
            "max_buffered_total_bytes", int, d.max_buffered_total_bytes, _at_least(1, " bytes")
        ),
        forwarded_for=t.get(
            "forwarded_for", str, d.forwarded_for, _one_of(("keep", "drop", "append"))
        ),
        shutdown_grace_seconds=t.get(
            "shutdown_grace_seconds", float, d.shutdown_grace_seconds, _between(0, 3600)
        ),
        drain_seconds=t.get("drain_seconds", float, d.drain_seconds, _between(0, 600)),
        header_timeout_seconds=t.get(
            "header_timeout_seconds", float, d.header_timeout_seconds, _between(0.1, 3600)
        ),
        body_timeout_seconds=t.get(
            "body_timeout_seconds", float, d.body_timeout_seconds, _between(0.1, 3600)
        ),
        keepalive_timeout_seconds=t.get(
            "keepalive_timeout_seconds", float, d.keepalive_timeout_seconds, _between(0.1, 86400)
        ),
        send_timeout_seconds=t.get(
            "send_timeout_seconds", float, d.send_timeout_seconds, _between(0.1, 86400)
        ),
        max_client_connections=t.get(
            "max_client_connections", int, d.max_client_connections, _between(0, 1_000_000)
        ),
        allowed_hosts=t.get("allowed_hosts", list, d.allowed_hosts, _hosts),
        allowed_origins=t.get("allowed_origins", list, d.allowed_origins, _origins),
    )
    t.done()
    return cfg


_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"\.?{_LABEL}(\.{_LABEL})*")


def _hosts(values: list[Any]) -> tuple[str, ...]:
    out = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"expected host names (strings), got {_describe(value)}")
        host = value.strip().lower().rstrip(".")
        if host != "*" and not _HOST_NAME.fullmatch(host):
            raise ValueError(
                f"expected a host name without port (e.g. 'atlasburn-proxy', '.svc.cluster.local'"
                f" or '*'), got {value!r}"
            )
        out.append(host)
    return tuple(out)


def _origins(values: list[Any]) -> tuple[str, ...]:
    out = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"expected origins (strings), got {_describe(value)}")
        url = URL(value) if "://" in value else None
        if (
            url is None
            or url.scheme not in ("http", "https")
            or not url.host
            or url.path not in ("", "/")
            or url.query_string
            or url.fragment
            or url.user is not None
        ):
            raise ValueError(
                "expected an origin like 'http://localhost:3000' (scheme, host, port),"
                f" got {value!r}"
            )
        out.append(origin_of(url))
    return tuple(out)


def origin_of(url: URL) -> str:
    """The serialised origin of an http(s) URL, as browsers send it in ``Origin``:
    ``scheme://host`` with ``:port`` unless it is the scheme's default."""
    host = url.host or ""
    shown = f"[{host}]" if ":" in host else host
    port = url.port
    default = 443 if url.scheme == "https" else 80
    return f"{url.scheme}://{shown}" + ("" if port in (None, default) else f":{port}")


def _upstream(t: _Table) -> UpstreamConfig:
    d = UpstreamConfig()
    cfg = UpstreamConfig(
        connect_timeout_seconds=t.get(
            "connect_timeout_seconds", float, d.connect_timeout_seconds, _between(0.001, 600)
        ),
        read_timeout_seconds=t.get(
            "read_timeout_seconds", float, d.read_timeout_seconds, _between(0.001, 86400)
        ),
        max_connections=t.get("max_connections", int, d.max_connections, _between(1, 100_000)),
        pool_timeout_seconds=t.get(
            "pool_timeout_seconds", float, d.pool_timeout_seconds, _between(0.001, 3600)
        ),
    )
    t.done()
    return cfg


def _logging(t: _Table) -> LoggingConfig:
    cfg = LoggingConfig(
        level=t.get("level", str, "info", _one_of(LOG_LEVELS)),
        format=t.get("format", str, "logfmt", _one_of(("logfmt", "json"))),
        access=t.get("access", bool, True),
    )
    t.done()
    return cfg


def _storage(t: _Table) -> StorageConfig:
    d = StorageConfig()
    raw = t.get("path", str, "")
    path = Path(raw).expanduser() if raw else d.path
    if not path.is_absolute():
        # Relative to the working directory, which a shell and systemd (/) set differently: the
        # same file would put the spool, and the local API's key, in another place.
        t.warn(
            "path",
            f"{str(path)!r} is relative to the working directory; it resolved to "
            f"{path.absolute()} (use an absolute path)",
        )
    cfg = StorageConfig(
        path=path,
        commit_interval_ms=t.get(
            "commit_interval_ms", int, d.commit_interval_ms, _between(1, 10_000)
        ),
        max_spool_mb=t.get("max_spool_mb", float, d.max_spool_mb, _between(1, 1_000_000)),
        retention_hours=t.get("retention_hours", float, d.retention_hours, _between(0, 87_600)),
        max_pending_events=t.get(
            "max_pending_events", int, d.max_pending_events, _between(100, 10_000_000)
        ),
    )
    t.done()
    return cfg


def _atlasburn(t: _Table) -> AtlasBurnConfig:
    def api_base(value: str) -> str:
        return str(parse_http_url(value)) if value else ""

    def api_key(value: str) -> Secret:
        if value and not value.startswith("abn_"):
            raise ValueError("an AtlasBurn API key starts with 'abn_'")
        return Secret(value)

    def org_id(value: str) -> str:
        if not _ORG_ID.fullmatch(value):
            raise ValueError(
                f"must be 1-128 characters of letters, digits and _ . : -, got {value!r}"
            )
        return value

    d = AtlasBurnConfig()
    cfg = AtlasBurnConfig(
        api_base=t.get("api_base", str, "", api_base),
        api_key=t.get("api_key", str, d.api_key, api_key),
        org_id=t.get("org_id", str, d.org_id, org_id),
    )
    if cfg.api_base and not cfg.api_key:
        t.problem("api_key", "required when atlasburn.api_base is set (an 'abn_...' key)")
    t.done()
    return cfg


def _telemetry(t: _Table) -> TelemetryConfig:
    d = TelemetryConfig()
    cfg = TelemetryConfig(
        flush_interval_ms=t.get(
            "flush_interval_ms", int, d.flush_interval_ms, _between(10, 3_600_000)
        ),
        batch_max_events=t.get("batch_max_events", int, d.batch_max_events, _between(1, 10_000)),
        max_backoff_seconds=t.get(
            "max_backoff_seconds", float, d.max_backoff_seconds, _between(0.01, 3600)
        ),
        request_timeout_seconds=t.get(
            "request_timeout_seconds", float, d.request_timeout_seconds, _between(0.1, 600)
        ),
        poll_interval_seconds=t.get(
            "poll_interval_seconds", float, d.poll_interval_seconds, _between(0.05, 3600)
        ),
        shutdown_flush_seconds=t.get(
            "shutdown_flush_seconds", float, d.shutdown_flush_seconds, _between(0, 600)
        ),
    )
    t.done()
    return cfg


def _fingerprints(values: list[Any]) -> frozenset[str]:
    for value in values:
        if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
            raise ValueError(f"expected fingerprints like 'sha256:<64 hex digits>', got {value!r}")
    return frozenset(values)


def _tool_names(values: list[Any]) -> frozenset[str]:
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected tool names (non-empty strings), got {value!r}")
    return frozenset(values)


def _header_name(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"not a header name: {value!r}")
    return value


def _guardrails(t: _Table) -> GuardrailsConfig:
    ld = t.table("dumb_loop_detector")
    d = LoopDetectorConfig()
    loop = LoopDetectorConfig(
        enabled=ld.get("enabled", bool, d.enabled),
        threshold=ld.get("threshold", int, d.threshold, _between(2, 1_000_000)),
        window_seconds=ld.get("window_seconds", float, d.window_seconds, _between(1, 86400)),
        ttl_seconds=ld.get("ttl_seconds", float, d.ttl_seconds, _between(1, 30 * 86400)),
        scope=ld.get("scope", str, d.scope, _one_of(("org", "fingerprint"))),
        allow_fingerprints=ld.get("allow_fingerprints", list, d.allow_fingerprints, _fingerprints),
        exempt_header=ld.get("exempt_header", str, d.exempt_header, _header_name),
        max_tracked=ld.get("max_tracked", int, d.max_tracked, _between(1000, 100_000_000)),
    )
    ld.done()
    al = t.table("agent_loop_detector")
    da = AgentLoopConfig()
    agent = AgentLoopConfig(
        enabled=al.get("enabled", bool, da.enabled),
        threshold=al.get("threshold", int, da.threshold, _between(2, 1000)),
        lookback=al.get("lookback", int, da.lookback, _between(2, 10_000)),
        scope=al.get("scope", str, da.scope, _one_of(("conversation", "org"))),
        ttl_seconds=al.get("ttl_seconds", float, da.ttl_seconds, _between(1, 30 * 86400)),
        exempt_tools=al.get("exempt_tools", list, da.exempt_tools, _tool_names),
    )
    if agent.lookback < agent.threshold:
        al.problem(
            "lookback",
            f"must be at least threshold ({agent.threshold}), got {agent.lookback}: a tool call"
            " cannot repeat more often than the calls looked at",
        )
    al.done()
    sc = t.table("spend_cap")
    ds = SpendCapConfig()
    cap = SpendCapConfig(
        enabled=sc.get("enabled", bool, ds.enabled),
        max_usd_per_hour=sc.get("max_usd_per_hour", float, 0.0, _between(0, 1e9)),
        max_usd_per_day=sc.get("max_usd_per_day", float, 0.0, _between(0, 1e9)),
    )
    if cap.enabled and not (cap.max_usd_per_hour or cap.max_usd_per_day):
        sc.problem("enabled", "set max_usd_per_hour and/or max_usd_per_day (above 0)")
    sc.done()
    budgets = _budgets(t, t.array_of_tables("budgets"))
    t.done()
    return GuardrailsConfig(
        dumb_loop_detector=loop, agent_loop_detector=agent, spend_cap=cap, budgets=budgets
    )


def _budget_name(value: str) -> str:
    if not _BUDGET_NAME.fullmatch(value):
        raise ValueError(
            f"must be 1-64 characters of letters, digits and _ . : @ + -, got {value!r}"
        )
    return value


def _budgets(parent: _Table, tables: list[_Table]) -> tuple[BudgetConfig, ...]:
    out: list[BudgetConfig] = []
    names: set[str] = set()
    for t in tables:
        name = t.get("name", str, "", _budget_name)
        if not t.has("name"):
            t.problem("name", "required: a budget's name shows in refusals, logs and reports")
        elif name in names:
            t.problem("name", f"another budget is named {name!r}")
        names.add(name)
        match = _budget_match(t.table("match"))
        if not t.has("match") or not match:
            t.problem(
                "match",
                'required: a table of what the budget covers, e.g. match = { app = "ci-bot" }',
            )
        budget = BudgetConfig(
            name=name,
            match=match,
            max_usd_per_hour=t.get("max_usd_per_hour", float, 0.0, _between(0, 1e9)),
            max_usd_per_day=t.get("max_usd_per_day", float, 0.0, _between(0, 1e9)),
            warn_at=t.get("warn_at", float, 0.8, _between(0.01, 1)),
        )
        if not (budget.max_usd_per_hour or budget.max_usd_per_day):
            t.problem("max_usd_per_hour", "set max_usd_per_hour and/or max_usd_per_day (above 0)")
        t.done()
        out.append(budget)
    if len(out) > MAX_BUDGETS:
        parent.problem("budgets", f"at most {MAX_BUDGETS} budgets, got {len(out)}")
    return tuple(out)


def _budget_match(t: _Table) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for dimension in t.keys():
        key = dimension
        if dimension.startswith("tag:"):
            if not _TAG_NAME.fullmatch(dimension[4:]):
                t.problem(
                    dimension,
                    "a tag name is 1-128 characters of a header name: letters, digits and"
                    " ! # $ % & ' * + . ^ _ ` | ~ -",
                )
                continue
            # Tags come from header names, which HTTP does not distinguish by case.
            key = "tag:" + dimension[4:].lower()
        elif dimension not in BUDGET_DIMENSIONS:
            t.problem(
                dimension,
                f"unknown dimension; expected one of {', '.join(BUDGET_DIMENSIONS)} or tag:<Name>",
            )
            continue
        pattern = t.get(dimension, str, "", _key_id_pattern if key == "key_id" else _pattern)
        if pattern:
            pairs.append((key, pattern))
    t.done()
    return tuple(sorted(pairs))


def _pattern(value: str) -> str:
    if not value or len(value.encode()) > MAX_BYTES:
        raise ValueError(f"expected 1-128 bytes (a value or a shell glob), got {value!r}")
    return value


_KEY_ID = re.compile(KEY_ID)
# What may stay of a key_id glob once its [...] sets, * and ? are taken out.
_KEY_ID_LITERAL = re.compile(r"[key_0-9a-f]*")
_KEY_ID_HINT = "expected a key id like 'key_0123456789abcdef' (atlasburn-proxy key-id prints one)"


def _not_shown(value: str) -> str:
    """A value given where a key id belongs, as an error may show it: only one that starts
    like a key id (anything else may be the provider key itself, never to be echoed)."""
    return repr(value) if value.startswith("key_") and len(value) <= 24 else "(not shown)"


def _key_id_pattern(value: str) -> str:
    """A budget's ``key_id``: a key id or a glob that can match one; never echoed otherwise."""
    if not value or len(value.encode()) > MAX_BYTES:
        raise ValueError(_key_id_glob(value))
    literal = re.sub(r"\[[^\]]*\]|[*?]", "", value)
    glob = literal != value
    if not (_KEY_ID_LITERAL.fullmatch(literal) if glob else _KEY_ID.fullmatch(value)):
        raise ValueError(_key_id_glob(value))
    return value


def _key_id_glob(value: str) -> str:
    return (
        "expected a key id like 'key_0123456789abcdef' or a shell glob of key ids"
        f" (atlasburn-proxy key-id prints a key's id), got {_not_shown(value)}"
    )


def _key_name(value: str) -> str:
    if not value or len(value.encode()) > MAX_BYTES or not value.isprintable():
        raise ValueError(f"expected a name of 1-128 bytes, printable, got {value!r}")
    return value


def _attribution(t: _Table) -> AttributionConfig:
    d = AttributionConfig()
    enabled = t.get("enabled", bool, d.enabled)
    process = t.get("process", bool, d.process)
    names = t.table("key_names")
    key_names: dict[str, str] = {}
    for key_id in names.keys():
        if not _KEY_ID.fullmatch(key_id):
            # The name is shown only if it looks like a mistyped id: it may be the key itself.
            shown = key_id if _not_shown(key_id) != "(not shown)" else "(not shown)"
            names.problem(shown, _KEY_ID_HINT)
            continue
        name = names.get(key_id, str, "", _key_name)
        if name:
            key_names[key_id] = name
    names.done()
    t.done()
    return AttributionConfig(enabled=enabled, process=process, key_names=key_names)


def redis_location(url: str) -> str:
    """Where a Redis URL points, for the log: scheme, host and port (or socket path) and
    database; never the user name or password. Raises ValueError for a URL redis-py would
    refuse, saying why."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            "expected redis://[user:password@]host:port/db, rediss://... (TLS) or"
            " unix:///path/to/redis.sock"
        )
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock")
        return f"unix://{parts.path}"
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    if not host:
        raise ValueError("expected a host, e.g. redis://127.0.0.1:6379/0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, got {db[:32]!r}")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port or 6379}/{db or 0}"


def _fleet(t: _Table) -> FleetConfig:
    def redis_url(value: str) -> Secret:
        if value:
            redis_location(value)
        return Secret(value)

    def key_prefix(value: str) -> str:
        if len(value) > 64 or not value.isprintable() or " " in value:
            raise ValueError(
                f"expected at most 64 printable characters without spaces, got {value[:80]!r}"
            )
        return value

    d = FleetConfig()
    cfg = FleetConfig(
        redis_url=t.get("redis_url", str, d.redis_url, redis_url),
        key_prefix=t.get("key_prefix", str, d.key_prefix, key_prefix),
    )
    t.done()
    return cfg


def _known_kind(value: str) -> str:
    if value not in ADAPTERS:
        raise ValueError(f"unknown kind {value!r}; known kinds: {', '.join(ADAPTERS)}")
    return value


def _providers(t: _Table) -> dict[str, ProviderConfig]:
    providers = _default_providers()
    for name, pt in t.tables().items():
        known = providers.get(name)
        if not _PROVIDER_NAME.fullmatch(name):
            t.problem(name, "a provider name is lowercase letters, digits, '_' and '-'")
        elif name in RESERVED_PROVIDER_NAMES:
            t.problem(name, f"'{name}' is a route the daemon serves itself; pick another name")

        enabled = pt.get("enabled", bool, True)
        kind = pt.get("kind", str, known.kind if known else "", _known_kind)
        base_url = pt.get("base_url", str, known.base_url if known else None, parse_http_url)
        inject = pt.get("inject_stream_usage", bool, True)
        price_as = pt.get("price_as", str, "", _price_as)
        if pt.has("base_url") and base_url is not None and base_url.path.endswith("/v1"):
            pt.warn(
                "base_url",
                f"the path ends in /v1, and clients' paths carry their own version: requests"
                f" would go to {base_url.path}/v1/...; leave /v1 out of base_url",
            )
        if enabled and known is None:
            if not pt.has("kind"):
                close = difflib.get_close_matches(name, list(DEFAULT_PROVIDERS), n=1)
                hint = f" (or did you mean [providers.{close[0]}]?)" if close else ""
                pt.problem(
                    "kind", f"required for a new provider; one of {', '.join(ADAPTERS)}{hint}"
                )
            if not pt.has("base_url"):
                pt.problem("base_url", "required for a new provider")
        pt.done()
        if not enabled:
            providers.pop(name, None)
        elif kind and base_url is not None:
            providers[name] = ProviderConfig(name, kind, base_url, inject, price_as)
    return providers


def _price_as(value: str) -> str:
    if value and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", value):
        raise ValueError(
            f"expected a genai-prices provider id (e.g. 'openai') or 'none', got {value!r}"
        )
    return value


def _pricing(t: _Table, providers: Mapping[str, ProviderConfig]) -> dict[str, PriceOverride]:
    out: dict[str, PriceOverride] = {}
    rate = _between(0, 1_000_000)
    for model, mt in t.tables().items():
        if not model:
            t.problem(model, "a model name is not empty")
        inp = mt.get("input", float, None, rate)
        out_rate = mt.get("output", float, None, rate)
        cached = mt.get("cached_input", float, inp, rate)
        write = mt.get("cache_write", float, inp, rate)
        write_1h = mt.get("cache_write_1h", float, write, rate)
        provider = mt.get("provider", str, "")
        for key, value in (("input", inp), ("output", out_rate)):
            if value is None and not mt.has(key):
                mt.problem(key, "required: USD per million tokens")
        if provider and provider not in providers:
            mt.problem("provider", f"no provider {provider!r} is configured")
        mt.done()
        if inp is not None and out_rate is not None:
            out[model] = PriceOverride(model, inp, out_rate, cached, write, write_1h, provider)
    return out


def _price_data(t: _Table) -> PriceDataConfig:
    d = PriceDataConfig()
    url = t.get("refresh_url", str, d.refresh_url, _refresh_url)
    out = PriceDataConfig(
        refresh_url=url,
        refresh_interval_seconds=t.get(
            "refresh_interval_seconds", float, d.refresh_interval_seconds, _at_least(1)
        ),
        timeout_seconds=t.get("timeout_seconds", float, d.timeout_seconds, _between(0.1, 600)),
        max_bytes=t.get("max_bytes", int, d.max_bytes, _at_least(1024)),
    )
    t.done()
    return out


def _refresh_url(value: str) -> str:
    return str(parse_fetch_url(value)) if value else ""


def parse_fetch_url(value: str) -> URL:
    """An http(s) URL to fetch a file from (a query is allowed, credentials are not)."""
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    if url.user is not None or url.password is not None:
        raise ValueError("credentials do not belong in the URL")
    return url


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a ``Config`` from an already-parsed TOML document."""
    problems: list[str] = []
    warnings: list[str] = []
    root = _Table(data, "", problems, os.environ if env is None else env, warnings)
    server = _server(root.table("server"))
    upstream = _upstream(root.table("upstream"))
    logging_ = _logging(root.table("logging"))
    storage = _storage(root.table("storage"))
    atlasburn = _atlasburn(root.table("atlasburn"))
    telemetry = _telemetry(root.table("telemetry"))
    guardrails = _guardrails(root.table("guardrails"))
    attribution = _attribution(root.table("attribution"))
    fleet = _fleet(root.table("fleet"))
    providers = _providers(root.table("providers"))
    pricing = _pricing(root.table("pricing"), providers)
    price_data = _price_data(root.table("price_data"))
    cfg = Config(
        server=server,
        upstream=upstream,
        logging=logging_,
        storage=storage,
        atlasburn=atlasburn,
        telemetry=telemetry,
        guardrails=guardrails,
        attribution=attribution,
        fleet=fleet,
        providers=providers,
        pricing=pricing,
        price_data=price_data,
        warnings=tuple(warnings),
    )
    root.done()
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(
    path: str | Path | None = None,
    *,
    listen: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` (or the embedded defaults when None) and apply the overrides.

    Precedence, highest first: the command line (``listen``), the environment
    (``ATLASBURN_PROXY_LISTEN``, ``ATLASBURN_PROXY_ALLOWED_HOSTS``: comma-separated,
    ``ATLASBURN_API_KEY``), a systemd credential
    (``$CREDENTIALS_DIRECTORY/atlasburn-api-key``), the file, the defaults. (The file itself is
    the command line's ``--config``, else ``ATLASBURN_PROXY_CONFIG``: see ``config_path``.)
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    listen = listen or env.get("ATLASBURN_PROXY_LISTEN") or None
    if listen is not None:
        data = _override(data, "server", "listen", listen)
    hosts = env.get("ATLASBURN_PROXY_ALLOWED_HOSTS")
    if hosts:  # a container's service name, without a config file
        names = [h.strip() for h in hosts.split(",") if h.strip()]
        data = _override(data, "server", "allowed_hosts", names)
    key = env.get("ATLASBURN_API_KEY") or _credential(env, "atlasburn-api-key")
    if key:
        data = _override(data, "atlasburn", "api_key", key.replace("$", "$$"))
    return parse_config(data, env)


def config_path(cli: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file: ``--config``, else ``$ATLASBURN_PROXY_CONFIG``, else none (defaults)."""
    env = os.environ if env is None else env
    return cli or env.get("ATLASBURN_PROXY_CONFIG") or None


def _override(data: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    table = data.get(section)
    table = dict(table) if isinstance(table, dict) else {}
    table[key] = value
    return {**data, section: table}


def _credential(env: Mapping[str, str], name: str) -> str | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        return (Path(directory) / name).read_text().strip() or None
    except OSError:
        return None
