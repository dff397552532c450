"""``/metrics`` in the Prometheus text format (prometheus-client, on its own registry).

Per-request numbers are counted as each request ends (label children cached, so a request costs a
few dictionary lookups); the state of the spool, shipper, pricer and guardrails is read only when
scraped. Label values are bounded: provider (configured names), status (HTTP codes), layer,
model and app (the ``AtlasBurn-App`` header or the ``/@<app>/`` prefix; "" for none). A model
gets a label of its own once its provider answered a request for it with 2xx, for at most
``MAX_MODELS`` (provider, model) pairs; from then on all its events use it, whatever their
status. Before that, and past the bound, a model counts as ``other``: a name the provider refused
(404 model_not_found, 401) is whatever a client sent, and random ones must not take the slots of
the models really in use. An app is labelled the same way, for at most ``MAX_APPS`` apps. No
fingerprint, key or free text is ever a label, and a model or app label is at most 256 printable
characters (``proxy.text.inert``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import Event
from .text import inert

MAX_MODELS = 200
MAX_APPS = 100
MAX_LAYERS = 32
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "atlasburn_requests",
            "Proxied requests by provider, model and the status the client "
            "got (429 for a guardrail refusal)",
            ["provider", "model", "status", "app"],
            registry=r,
        )
        self.tokens = Counter(
            "atlasburn_tokens",
            "Tokens by provider, model and direction (in: input including "
            "cached; out: output including reasoning)",
            ["provider", "model", "direction", "app"],
            registry=r,
        )
        self.cost = Counter(
            "atlasburn_cost_usd",
            "Spend in USD by provider, model and app",
            ["provider", "model", "app"],
            registry=r,
        )
        self.unknown_cost = Counter(
            "atlasburn_unknown_cost_requests",
            "Requests whose cost is not known, by provider, model and reason: missing (a "
            "billed answer without usage), partial (cut before its final usage: cost at least "
            "what was counted), unpriced (no price for the model). Their atlasburn_cost_usd is "
            "0 or a lower bound, not free",
            ["provider", "model", "reason"],
            registry=r,
        )
        self.refusals = Counter(
            "atlasburn_guardrail_refusals",
            "Requests refused by a guardrail, by layer",
            ["layer"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "atlasburn_upstream_latency_seconds",
            "Time from sending a request to the provider's response headers",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "atlasburn_overhead_seconds",
            "Time the daemon itself added to a request: handling time minus the time spent "
            "waiting on the provider and on the client",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.limits = Counter(
            "atlasburn_limit_hits",
            "Times a limit or protection acted, by limit: header_timeout, body_timeout, "
            "send_timeout (a client that took none of its answer), "
            "client_connections (a connection closed to stay under the bound), pool_timeout "
            "(503: no upstream connection in time), foreign_host (DNS rebinding), cross_site "
            "(a web page's request), inflate (a compressed answer metered only in part), "
            "upstream_head (an answer head over its bounds), buffered_bodies (a body streamed "
            "for want of room under server.max_buffered_total_bytes)",
            ["limit"],
            registry=r,
        )
        self._limit_children: dict[str, Any] = {}
        self._unknown_children: dict[tuple[str, str, str], Any] = {}
        self._children: dict[tuple[str, str, int, str], tuple[Any, Any, Any, Any]] = {}
        self._models: set[tuple[str, str]] = set()  # (provider, model) labelled: answered 2xx
        self._apps: set[str] = {""}  # apps labelled: answered 2xx ("": none named)
        self._upstream: dict[str, Any] = {}
        self._layers: set[str] = set()

    def _model(self, provider: str, model: str, status: int) -> str:
        model = inert(model)  # the relay bounds it already; an ingested or older event too
        key = (provider, model)
        if key in self._models:
            return model
        if 200 <= status < 300 and len(self._models) < MAX_MODELS:
            self._models.add(key)
            return model
        return "other"

    def _app(self, app: str, status: int) -> str:
        if app in self._apps:
            return app
        app = inert(app)
        if 200 <= status < 300 and len(self._apps) <= MAX_APPS:
            self._apps.add(app)
            return app
        return "other"

    def observe(self, event: Event, overhead: float | None) -> None:
        attributes = event.attributes
        app = (attributes.app or "") if attributes is not None else ""
        key = (event.provider, event.model, event.status, app)
        children = self._children.get(key)
        if children is None:
            model = self._model(event.provider, event.model, event.status)
            labelled = self._app(app, event.status)
            children = (
                self.requests.labels(event.provider, model, str(event.status), labelled),
                self.tokens.labels(event.provider, model, "in", labelled),
                self.tokens.labels(event.provider, model, "out", labelled),
                self.cost.labels(event.provider, model, labelled),
            )
            # Only a labelled model's and app's: one counted as other may get its label with
            # its next 2xx.
            if model != "other" and labelled != "other" and len(self._children) < MAX_MODELS * 50:
                self._children[key] = children
        requests, tokens_in, tokens_out, cost = children
        requests.inc()
        if event.tokens_in:
            tokens_in.inc(event.tokens_in)
        if event.tokens_out:
            tokens_out.inc(event.tokens_out)
        if event.cost_usd:
            cost.inc(event.cost_usd)
        reason = event.unknown_cost
        if reason is not None:
            model = self._model(event.provider, event.model, event.status)
            label = (event.provider, model, reason)
            child = self._unknown_children.get(label)
            if child is None:
                child = self.unknown_cost.labels(*label)
                if len(self._unknown_children) < MAX_MODELS * 10:
                    self._unknown_children[label] = child
            child.inc()
        if event.refused_by is not None:
            layer = event.refused_by
            if layer not in self._layers:
                if len(self._layers) >= MAX_LAYERS:
                    layer = "other"
                else:
                    self._layers.add(layer)
            self.refusals.labels(layer).inc()
        if overhead is not None:
            self.overhead.observe(overhead)

    def limit_hit(self, limit: str) -> None:
        """Count one act of a limit (``limit`` is one of the daemon's own fixed names)."""
        child = self._limit_children.get(limit)
        if child is None:
            child = self._limit_children[limit] = self.limits.labels(limit)
        child.inc()

    def upstream(self, provider: str, seconds: float) -> None:
        child = self._upstream.get(provider)
        if child is None:
            child = self._upstream[provider] = self.upstream_latency.labels(provider)
        child.observe(seconds)

    def add_state(self, read: Callable[[], dict[str, float]]) -> None:
        """Gauges and counters read at scrape time from the daemon's parts."""
        self.registry.register(_State(read))

    def add_pool(self, read: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        self.registry.register(_Pool(read))

    def add_budgets(self, read: Callable[[], list[tuple[str, str, float, float, int]]]) -> None:
        """The budgets' state at scrape time: (budget, window, USD spent, USD limit, warnings)
        per configured budget and window (names from the config: a bounded label set)."""
        self.registry.register(_Budgets(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# name -> (kind, help); the values come from the reader given to add_state.
STATE: dict[str, tuple[str, str]] = {
    "atlasburn_ready": ("gauge", "1 when the store is open and the daemon is not draining"),
    "atlasburn_suspended": ("gauge", "1 while the org's kill flag is set"),
    "atlasburn_client_connections": ("gauge", "Open client connections"),
    "atlasburn_client_connections_limit": (
        "gauge",
        "The bound on open client connections (server.max_client_connections)",
    ),
    "atlasburn_process_lookups": (
        "counter",
        "Client connections whose calling process was looked up ([attribution] process)",
    ),
    "atlasburn_process_lookups_found": ("counter", "Process lookups that found the process"),
    "atlasburn_process_lookups_not_found": (
        "counter",
        "Process lookups that found none (another namespace or user, a client already gone, a"
        " lookup past its bounds): those events name no process",
    ),
    "atlasburn_process_lookups_skipped": (
        "counter",
        "Connections not looked up: too many lookups waiting (a flood of new connections)",
    ),
    "atlasburn_spool_pending_events": ("gauge", "Events in the spool waiting to be shipped"),
    "atlasburn_spool_queued_events": ("gauge", "Events in memory waiting for the next commit"),
    "atlasburn_spool_bytes": ("gauge", "Bytes of events in the spool"),
    "atlasburn_loop_tracked_fingerprints": ("gauge", "Fingerprints the loop detector holds"),
    "atlasburn_events_committed": ("counter", "Events committed to the spool since start"),
    "atlasburn_store_commits": (
        "counter",
        "Transactions that committed events (group commits: events per commit ="
        " atlasburn_events_committed / this)",
    ),
    "atlasburn_events_dropped": ("counter", "Events dropped past a spool or memory bound"),
    "atlasburn_events_poisoned": ("counter", "Events the AtlasBurn API refused, kept aside"),
    "atlasburn_store_write_errors": ("counter", "Failed spool commits (retried)"),
    "atlasburn_ship_batches": ("counter", "Batches delivered to the AtlasBurn API"),
    "atlasburn_ship_failures": ("counter", "Failed attempts to deliver a batch (retried)"),
    "atlasburn_events_shipped": ("counter", "Events delivered to the AtlasBurn API"),
    "atlasburn_unpriced_events": ("counter", "Events of models with no known price (cost 0)"),
    "atlasburn_fleet_connected": ("gauge", "1 while connected to the fleet's Redis ([fleet])"),
    "atlasburn_fleet_messages_sent": ("counter", "Kill flag changes this daemon sent the fleet"),
    "atlasburn_fleet_messages_received": (
        "counter",
        "Messages received from the fleet (flag changes, fingerprints about to trip)",
    ),
    "atlasburn_fleet_reconnects": ("counter", "Times the connection to Redis came back"),
    "atlasburn_fleet_hot_fingerprints": (
        "gauge",
        "Fingerprints the fleet reported one short of the loop threshold, held here",
    ),
    "atlasburn_pricing_errors": ("counter", "Pricing failures (cost 0)"),
}


class _Pool(Collector):
    """The upstream connections, per upstream host:port (configured providers only)."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        now = GaugeMetricFamily(
            "atlasburn_upstream_connections",
            "Connections to each upstream, in use or idle in the pool",
            labels=["upstream", "state"],
        )
        opened = CounterMetricFamily(
            "atlasburn_upstream_connections_opened",
            "Connections opened to each upstream since start",
            labels=["upstream"],
        )
        for upstream, (busy, idle, total) in sorted(stats.items()):
            now.add_metric([upstream, "in_use"], busy)
            now.add_metric([upstream, "idle"], idle)
            opened.add_metric([upstream], total)
        yield now
        yield opened


class _Budgets(Collector):
    """``[[guardrails.budgets]]``: spend, limit and warnings per budget and window."""

    def __init__(self, read: Callable[[], list[tuple[str, str, float, float, int]]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        rows = self._read()
        if not rows:
            return
        labels = ["budget", "window"]
        spend = GaugeMetricFamily(
            "atlasburn_budget_spend_usd",
            "Spend in USD counted in each budget over its window (hour: the last 60 minutes, "
            "day: the last 24 hours); the fleet's total with [fleet]",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "atlasburn_budget_limit_usd", "Each budget's limit per window in USD", labels=labels
        )
        warnings = CounterMetricFamily(
            "atlasburn_budget_warnings",
            "Times a budget's spend crossed its warn_at fraction of a window's limit",
            labels=labels,
        )
        for name, window, spent, cap, warned in rows:
            spend.add_metric([name, window], spent)
            limit.add_metric([name, window], cap)
            warnings.add_metric([name, window], warned)
        yield spend
        yield limit
        yield warnings


class _State(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for name, (kind, doc) in STATE.items():
            if name not in values:
                continue
            family = (
                GaugeMetricFamily(name, doc) if kind == "gauge" else CounterMetricFamily(name, doc)
            )
            family.add_metric([], values[name])
            yield family
