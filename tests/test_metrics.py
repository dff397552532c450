"""Metrics: which model names get a label of their own (read back from the rendered text)."""

from __future__ import annotations

import random

from prometheus_client.parser import text_string_to_metric_families

from proxy.adapters.base import UsageSource
from proxy.events import Event
from proxy.metrics import MAX_MODELS, Metrics


def event(model: str, status: int, provider: str = "openai") -> Event:
    ok = 200 <= status < 300
    return Event(
        ts="2026-11-29T01:55:24.123Z",
        provider=provider,
        model=model,
        endpoint="/chat/completions",
        status=status,
        tokens_in=10 if ok else 0,
        tokens_out=2 if ok else 0,
        cost_usd=0.00001 if ok else 0.0,
        latency_ms=5,
        fingerprint="sha256:" + "0" * 64,
        stream=False,
        usage_source=UsageSource.REPORTED if ok else UsageSource.NONE,
        priced=ok,
    )


def requests(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """``atlasburn_requests_total`` by (provider, model, status)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == "atlasburn_requests_total":
                out[(s.labels["provider"], s.labels["model"], s.labels["status"])] = s.value
    return out


def test_refused_random_models_take_no_label_slot() -> None:
    """A neighbour sending many made-up model names (each refused 404 or 401) fills no label
    slot: a model the provider really serves, seen after them, still gets its own label."""
    metrics = Metrics()
    rng = random.Random(13)
    names = [f"m-{rng.getrandbits(64):016x}" for _ in range(2 * MAX_MODELS)]
    for i, name in enumerate(names):
        metrics.observe(event(name, 404 if i % 2 else 401), 0.0)
    metrics.observe(event("gpt-4o-mini", 200), 0.0)
    assert requests(metrics) == {
        ("openai", "other", "401"): MAX_MODELS,
        ("openai", "other", "404"): MAX_MODELS,
        ("openai", "gpt-4o-mini", "200"): 1,
    }


def test_a_model_is_labelled_from_its_first_2xx_then_for_every_status() -> None:
    metrics = Metrics()
    metrics.observe(event("gpt-4o", 429), 0.0)  # before any 2xx: other
    metrics.observe(event("gpt-4o", 200), 0.0)
    metrics.observe(event("gpt-4o", 429), 0.0)  # labelled now, though its 429 was seen before
    metrics.observe(event("gpt-4o", 500), 0.0)
    # Per provider: another provider's refusal of the same name is not labelled by it.
    metrics.observe(event("gpt-4o", 404, provider="azure"), 0.0)
    assert requests(metrics) == {
        ("openai", "other", "429"): 1,
        ("openai", "gpt-4o", "200"): 1,
        ("openai", "gpt-4o", "429"): 1,
        ("openai", "gpt-4o", "500"): 1,
        ("azure", "other", "404"): 1,
    }


def test_labels_stay_bounded() -> None:
    metrics = Metrics()
    for i in range(MAX_MODELS + 5):
        metrics.observe(event(f"model-{i}", 200), 0.0)
    got = requests(metrics)
    assert len(got) == MAX_MODELS + 1
    assert got[("openai", "other", "200")] == 5
    assert got[("openai", f"model-{MAX_MODELS - 1}", "200")] == 1
