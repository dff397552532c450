"""Pricing: tiers, service tiers, overrides, provider-reported cost, and unknown models."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.adapters.base import Usage
from proxy.adapters.gemini import billed_searches
from proxy.adapters.openai import read_usage as openai_usage
from proxy.config import parse_config
from proxy.pricing import Catalog, Price, Pricer

M = Decimal(1_000_000)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog()


def pricer(catalog: Catalog | None, **config: object) -> Pricer:
    cfg = parse_config(config, {})
    return Pricer(cfg.providers, cfg.pricing, catalog)


def test_long_context_tier_is_a_cliff(catalog: Catalog) -> None:
    """gemini-2.5-pro: 1.25 / 10 up to 200k prompt tokens, 2.50 / 15 for all tokens above."""
    p = pricer(catalog)
    at_limit = p.price("gemini", "gemini-2.5-pro", Usage(200_000, 1000))
    above = p.price("gemini", "gemini-2.5-pro", Usage(200_001, 1000))
    assert at_limit == Price(float((200_000 * Decimal("1.25") + 1000 * 10) / M), True)
    assert above == Price(float((200_001 * Decimal("2.50") + 1000 * 15) / M), True)


def test_service_tier_prices(catalog: Catalog) -> None:
    """gpt-5: standard 1.25 / 0.125 / 10, flex 0.625 / 0.0625 / 5, priority 2.50 / 0.25 / 20."""
    p = pricer(catalog)
    usage = Usage(10_000, 2_000, cached_input_tokens=4_000)
    for tier, (inp, cached, out) in {
        None: ("1.25", "0.125", "10"),
        "default": ("1.25", "0.125", "10"),
        "flex": ("0.625", "0.0625", "5"),
        "priority": ("2.50", "0.25", "20"),
    }.items():
        expected = (6_000 * Decimal(inp) + 4_000 * Decimal(cached) + 2_000 * Decimal(out)) / M
        got = p.price(
            "openai",
            "gpt-5",
            replace(usage, service_tier=tier),
        )
        assert got == Price(float(expected), True), tier


def test_reasoning_priced_as_output_and_cache_write_1h(catalog: Catalog) -> None:
    p = pricer(catalog)
    # claude-haiku-4-5: 1 in, 1.25 5-min write, 2 1-hour write, 0.10 read, 5 out.
    usage = Usage(
        10_000,
        500,
        cached_input_tokens=4_000,
        cache_write_tokens=3_000,
        cache_write_1h_tokens=1_000,
    )
    expected = (
        3_000 * 1 + 2_000 * Decimal("1.25") + 1_000 * 2 + 4_000 * Decimal("0.10") + 500 * 5
    ) / M
    assert p.price("anthropic", "claude-haiku-4-5", usage) == Price(float(expected), True)
    # o3: reasoning tokens are output tokens: 2 in, 8 out.
    o3 = p.price("openai", "o3", Usage(1_000, 3_000, reasoning_tokens=2_500))
    assert o3 == Price(float((1_000 * 2 + 3_000 * 8) / M), True)


def test_config_override_wins_and_can_be_scoped(catalog: Catalog) -> None:
    p = pricer(
        catalog,
        pricing={
            "my-finetune": {"input": 0.2, "output": 0.8, "cached_input": 0.05},
            "gpt-4o-mini": {"input": 1, "output": 2, "provider": "anthropic"},
        },
    )
    usage = Usage(1_000, 100, cached_input_tokens=400)
    assert p.price("openai", "my-finetune", usage) == Price(
        float((600 * Decimal("0.2") + 400 * Decimal("0.05") + 100 * Decimal("0.8")) / M), True
    )
    rates = p.rates("openai", "my-finetune")
    assert rates is not None and rates.source == 'config [pricing."my-finetune"]'
    # Scoped to another provider: the catalog price applies on openai.
    openai_rates = p.rates("openai", "gpt-4o-mini")
    assert openai_rates is not None and openai_rates.source.startswith("genai-prices")


def test_provider_reported_cost_is_used(catalog: Catalog) -> None:
    p = pricer(catalog)
    assert p.price("openai", "anything", Usage(10, 2, cost_usd=0.00031)) == Price(0.00031, True)


def test_unknown_model_costs_zero_is_counted_and_warned_once(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    p = pricer(catalog)
    with caplog.at_level(logging.WARNING, logger="proxy.pricing"):
        for _ in range(3):
            assert p.price("openai", "no-such-model-xyz", Usage(10, 10)) == Price(0.0, False)
    assert p.unpriced_total == 3
    assert [r.getMessage() for r in caplog.records] == [
        "no price known for openai model 'no-such-model-xyz': its events cost 0 and are marked "
        'unpriced; add [pricing."no-such-model-xyz"] to the config to price it'
    ]


def test_price_as_none_and_no_catalog(catalog: Catalog) -> None:
    p = pricer(
        catalog,
        providers={
            "local": {"kind": "openai", "base_url": "http://127.0.0.1:1", "price_as": "none"}
        },
    )
    assert p.price("local", "gpt-4o-mini", Usage(10, 10)) == Price(0.0, False)
    # Without the data set (it failed to load) the config still prices.
    bare = pricer(None, pricing={"m": {"input": 1, "output": 1}})
    assert bare.price("openai", "m", Usage(1_000_000, 0)) == Price(1.0, True)
    assert bare.price("openai", "gpt-4o-mini", Usage(1, 1)) == Price(0.0, False)


def test_compatible_host_priced_by_its_base_url(catalog: Catalog) -> None:
    p = pricer(catalog, providers={"groq": {"kind": "openai", "base_url": "https://api.groq.com"}})
    rates = p.rates("groq", "llama-3.3-70b-versatile")
    assert rates is not None and rates.source.endswith("groq/llama-3.3-70b-versatile")


def test_exact_sum_not_float_accumulation(catalog: Catalog) -> None:
    """0.1 + 0.2 style errors never appear: the cost is the rounded exact value."""
    p = pricer(catalog, pricing={"m": {"input": 0.1, "output": 0.2}})
    assert p.price("openai", "m", Usage(1, 1)).cost_usd == float(Decimal("0.3") / M)


def test_a_broken_price_never_raises(catalog: Catalog) -> None:
    p = pricer(catalog)
    p._catalog = object()  # type: ignore[assignment]  # any failure inside the lookup
    assert p.price("openai", "gpt-4o-mini", Usage(1, 1)) == Price(0.0, False)
    assert p.errors_total == 1


def test_prices_command() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "prices",
            "--provider",
            "openai",
            "gpt-4o-mini",
            "no-such-model-xyz",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 1  # one model has no price
    lines = out.stdout.splitlines()
    assert lines[0] == "USD per million tokens"
    assert lines[2].split()[:7] == ["openai", "gpt-4o-mini", "0.15", "0.075", "0.15", "0.15", "0.6"]
    assert lines[2].endswith("openai/gpt-4o-mini")
    assert lines[3].split()[:2] == ["-", "no-such-model-xyz"]


def test_realtime_audio_and_cached_audio_at_their_rates(catalog: Catalog) -> None:
    """A realtime ``response.done`` usage (``input_token_details``, with the cached tokens by
    modality). gpt-realtime: text 4 in / 0.40 cached / 16 out; audio 32 in / 0.40 cached / 64
    out."""
    usage = openai_usage(
        {
            "total_tokens": 2100,
            "input_tokens": 1500,
            "output_tokens": 600,
            "input_token_details": {
                "text_tokens": 300,
                "audio_tokens": 1200,
                "image_tokens": 0,
                "cached_tokens": 640,
                "cached_tokens_details": {
                    "text_tokens": 128,
                    "audio_tokens": 512,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": 100, "audio_tokens": 500},
        }
    )
    assert usage is not None
    expected = (
        (300 - 128) * 4
        + 128 * Decimal("0.40")
        + (1200 - 512) * 32
        + 512 * Decimal("0.40")
        + 100 * 16
        + 500 * 64
    ) / M
    assert pricer(catalog).price("openai", "gpt-realtime", usage) == Price(float(expected), True)


def test_image_input_tokens_at_the_image_rate(catalog: Catalog) -> None:
    """An Images API edit's usage. gpt-image-1: text 5 in, image 10 in, 40 out."""
    usage = openai_usage(
        {
            "total_tokens": 4533,
            "input_tokens": 373,
            "output_tokens": 4160,
            "input_tokens_details": {"text_tokens": 50, "image_tokens": 323},
        }
    )
    assert usage is not None
    expected = (50 * 5 + 323 * 10 + 4160 * 40) / M
    assert pricer(catalog).price("openai", "gpt-image-1", usage) == Price(float(expected), True)


def test_other_modalities_without_own_rate_pay_the_text_rate(catalog: Catalog) -> None:
    """gemini-2.5-pro has no audio rate: its audio tokens pay 1.25 in / 0.125 cached, as text."""
    usage = Usage(
        1_000, 10, cached_input_tokens=400, input_audio_tokens=600, cached_audio_tokens=300
    )
    expected = (600 * Decimal("1.25") + 400 * Decimal("0.125") + 10 * 10) / M
    assert pricer(catalog).price("gemini", "gemini-2.5-pro", usage) == Price(float(expected), True)


def test_duration_without_a_rate_is_unpriced(catalog: Catalog) -> None:
    """whisper-1: $0.006 a minute; a model with no duration rate is not free but unknown."""
    p = pricer(catalog)
    assert p.price("openai", "whisper-1", Usage(audio_ms=61_500)) == Price(
        float(Decimal(61_500) / 60_000 * Decimal("0.006")), True
    )
    assert p.price("openai", "gpt-4o-mini", Usage(audio_ms=61_500)) == Price(0.0, False)
    assert p.unpriced_total == 1


def test_gemini_grounding_per_prompt_then_per_query(catalog: Catalog) -> None:
    """Up to Gemini 2.5 a grounded answer is one billed search whatever its queries; from
    Gemini 3 on each query is one."""
    assert [billed_searches(m, 2) for m in ("gemini-2.5-flash", "gemini-3-pro-preview")] == [1, 2]
    assert billed_searches("gemini-3-pro-preview", 0) == 0
    # gemini-3-pro-preview: 2 in / 12 out (up to 200k), $14 per 1,000 search queries.
    usage = Usage(50, 300, web_searches=billed_searches("gemini-3-pro-preview", 2))
    expected = (50 * 2 + 300 * 12) / M + 2 * Decimal(14) / 1000
    assert pricer(catalog).price("gemini", "gemini-3-pro-preview", usage) == Price(
        float(expected), True
    )


def prices(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "prices", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_a_model_is_priced_only_on_providers_that_can_carry_it(catalog: Catalog) -> None:
    """Google's catalog prices Claude (as Vertex AI serves it, in Anthropic's wire format): the
    Gemini API cannot carry it, so a gemini provider does not price it, nor list it."""
    p = pricer(catalog)
    assert p.rates("gemini", "claude-sonnet-4-5") is None
    assert p.rates("gemini", "claude-opus-4-1") is None  # (Google's fallback to Anthropic's)
    anthropic = p.rates("anthropic", "claude-sonnet-4-5")
    assert anthropic is not None and anthropic.source.endswith("anthropic/claude-sonnet-4-5")
    done = prices("claude-sonnet-4-5", "claude-opus-4-1", "gemini-2.5-flash", "gpt-4o-mini")
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:2] for line in done.stdout.splitlines()[2:]]
    assert rows == [
        ["anthropic", "claude-sonnet-4-5"],
        ["anthropic", ">"],  # its rates above 200,000 input tokens
        ["anthropic", "claude-opus-4-1"],
        ["gemini", "gemini-2.5-flash"],
        ["openai", "gpt-4o-mini"],
    ]


def test_a_price_for_every_provider_is_one_row(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[pricing."gpt-4o-mini"]\ninput = 1\noutput = 2\n'
        '[pricing."my-ft"]\ninput = 0.5\noutput = 1\nprovider = "openai"\n'
    )
    done = prices("--config", str(config), "gpt-4o-mini", "my-ft")
    assert done.returncode == 0, done.stderr
    assert [line.split() for line in done.stdout.splitlines()[2:]] == [
        ["(any)", "gpt-4o-mini", "1", "1", "1", "1", "2", "config", '[pricing."gpt-4o-mini"]'],
        ["openai", "my-ft", "0.5", "0.5", "0.5", "0.5", "1", "config", '[pricing."my-ft"]'],
    ]


def test_an_unknown_service_tier_is_an_error(catalog: Catalog) -> None:
    assert catalog.service_tiers() == ("default", "fast", "flex", "priority")
    done = prices("--service-tier", "flx", "gpt-4o-mini")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "--service-tier: unknown tier 'flx'; known: default, fast, flex, priority\n"
    )
    done = prices("--service-tier", "flex", "gpt-4o-mini")
    assert done.returncode == 0, done.stderr
