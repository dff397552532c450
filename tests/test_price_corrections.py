"""The packaged corrections to genai-prices (issue 16.8): exact costs with and without each, the
precedence user ``[pricing]`` > correction > genai-prices, the sources ``prices`` names, and the
TOML shipping in the package."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path

import genai_prices
import pytest

from proxy.adapters.base import Usage
from proxy.config import parse_config
from proxy.price_corrections import RESOURCE, parse
from proxy.pricing import _KNOWN_KEYS, Catalog, Pricer

M = Decimal(1_000_000)
ROOT = Path(__file__).parent.parent
DEEPSEEK = {"deepseek": {"kind": "openai", "base_url": "https://api.deepseek.com"}}
GENAI = f"genai-prices {genai_prices.__version__} (packaged data)"
DEEPSEEK_URL = "https://api-docs.deepseek.com/quick_start/pricing"
AUDIO_URL = "https://developers.openai.com/api/docs/models/gpt-4o-audio-preview"


@pytest.fixture(scope="module")
def corrected() -> Catalog:
    return Catalog()


@pytest.fixture(scope="module")
def bare() -> Catalog:
    return Catalog(corrections=())


def pricer(catalog: Catalog, **config: object) -> Pricer:
    cfg = parse_config(config, {})
    return Pricer(cfg.providers, cfg.pricing, catalog)


def close(got: float, expected: Decimal) -> bool:
    return abs(got - float(expected)) < 1e-12


def test_deepseek_has_one_price_day_and_night(corrected: Catalog, bare: Catalog) -> None:
    """DeepSeek's page: from 2025-09-05 16:00 UTC one list, no night-time discount; since
    DeepSeek-V3.2 (2025-09-29) 0.28 per million input (cache miss), 0.028 cache hit, 0.42
    output, for deepseek-chat and -reasoner.
    genai-prices 0.2.3 has chat 0.27 / 0.07 / 1.10 by day (UTC 00:30-16:30) and
    0.135 / 0.035 / 0.55 by night; reasoner 0.55 / 0.14 / 2.19 by day, the same night prices."""
    usage = Usage(10_000, 2_000, cached_input_tokens=4_000)
    fixed = (6_000 * Decimal("0.28") + 4_000 * Decimal("0.028") + 2_000 * Decimal("0.42")) / M
    assert fixed == Decimal("0.002632")  # 0.00168 + 0.000112 + 0.00084
    night = (6_000 * Decimal("0.135") + 4_000 * Decimal("0.035") + 2_000 * Decimal("0.55")) / M
    days = {
        "deepseek-chat": (
            6_000 * Decimal("0.27") + 4_000 * Decimal("0.07") + 2_000 * Decimal("1.10")
        )
        / M,
        "deepseek-reasoner": (
            6_000 * Decimal("0.55") + 4_000 * Decimal("0.14") + 2_000 * Decimal("2.19")
        )
        / M,
    }
    for model, day in days.items():
        got = pricer(corrected, providers=DEEPSEEK).price("deepseek", model, usage)
        assert got.priced and close(got.cost_usd, fixed), model
        rates = pricer(corrected, providers=DEEPSEEK).rates("deepseek", model)
        assert rates is not None and rates.source.startswith(f"correction {DEEPSEEK_URL} ")
        # Without the correction: genai-prices' day or night price, whichever applies now.
        now = datetime.now(tz=UTC).time()
        before = pricer(bare, providers=DEEPSEEK).price("deepseek", model, usage).cost_usd
        assert close(before, day) or close(before, night), (model, now, before)
        assert not close(before, fixed)


def test_gpt_4o_audio_preview_audio_rates(corrected: Catalog, bare: Catalog) -> None:
    """OpenAI's model page: text 2.50 in / 10 out, audio 40 in / 80 out per million tokens
    (gpt-4o-mini-audio-preview: text 0.15 / 0.60, audio 10 / 20). genai-prices 0.2.3 has the
    text rates only, so audio was priced as text."""
    # 1000 input tokens of which 600 audio; 500 output tokens of which 300 audio.
    usage = Usage(1_000, 500, input_audio_tokens=600, output_audio_tokens=300)
    for model, (t_in, t_out, a_in, a_out) in {
        "gpt-4o-audio-preview": ("2.5", "10", "40", "80"),
        "gpt-4o-audio-preview-2025-06-03": ("2.5", "10", "40", "80"),
        "gpt-4o-mini-audio-preview": ("0.15", "0.6", "10", "20"),
    }.items():
        with_ = (
            400 * Decimal(t_in) + 600 * Decimal(a_in) + 200 * Decimal(t_out) + 300 * Decimal(a_out)
        ) / M
        without = (1_000 * Decimal(t_in) + 500 * Decimal(t_out)) / M
        got = pricer(corrected).price("openai", model, usage)
        assert got.priced and close(got.cost_usd, with_), model
        assert close(pricer(bare).price("openai", model, usage).cost_usd, without), model
    assert close(
        pricer(corrected).price("openai", "gpt-4o-audio-preview", usage).cost_usd,
        Decimal("0.051"),  # 0.001 + 0.024 + 0.002 + 0.024 (text in, audio in, text out, audio out)
    )
    # The 2024-10-01 snapshot had other audio prices (100 / 200): left to genai-prices.
    old = pricer(corrected).rates("openai", "gpt-4o-audio-preview-2024-10-01")
    assert old is not None and old.source.startswith("genai-prices")
    assert close(
        pricer(corrected).price("openai", "gpt-4o-audio-preview-2024-10-01", usage).cost_usd,
        (1_000 * Decimal("2.5") + 500 * 10) / M,
    )


def test_user_pricing_over_correction_over_genai_prices(corrected: Catalog) -> None:
    p = pricer(
        corrected,
        providers=DEEPSEEK,
        pricing={"deepseek-chat": {"input": 1, "output": 2, "cached_input": 0.5}},
    )
    usage = Usage(10_000, 2_000, cached_input_tokens=4_000)
    expected = (6_000 * 1 + 4_000 * Decimal("0.5") + 2_000 * 2) / M
    assert close(p.price("deepseek", "deepseek-chat", usage).cost_usd, expected)
    user = p.rates("deepseek", "deepseek-chat")
    assert user is not None and user.source == 'config [pricing."deepseek-chat"]'
    corr = p.rates("deepseek", "deepseek-reasoner")
    assert corr is not None and corr.source.startswith("correction ")
    plain = p.rates("openai", "gpt-4o-mini")
    assert plain is not None and plain.source == f"{GENAI}: openai/gpt-4o-mini"


def test_prices_command_names_each_source(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[providers.deepseek]\nkind = "openai"\nbase_url = "https://api.deepseek.com"\n\n'
        '[providers.openai]\nkind = "openai"\nbase_url = "https://api.openai.com"\n\n'
        '[pricing."my-model"]\ninput = 1\noutput = 2\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "prices", "--config", str(config)]
        + ["deepseek-chat", "gpt-4o-mini", "my-model"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:2]): line for line in out.stdout.splitlines()[2:]}
    chat = rows[("deepseek", "deepseek-chat")]
    assert chat.split()[2:7] == ["0.28", "0.028", "0.28", "0.28", "0.42"]
    assert rows[("deepseek", "deepseek-chat")].endswith(
        f"correction {DEEPSEEK_URL} (checked 2026-11-30; cache_read_mtok, input_mtok,"
        f" output_mtok) over {GENAI}: deepseek/deepseek-chat"
    )
    assert rows[("openai", "gpt-4o-mini")].endswith(f"{GENAI}: openai/gpt-4o-mini")
    # A [pricing] entry for every provider: one row.
    assert rows[("(any)", "my-model")].endswith('config [pricing."my-model"]')
    assert [key for key in rows if key[1] == "my-model"] == [("(any)", "my-model")]


def test_the_table_ships_in_the_package(tmp_path: Path) -> None:
    """Read through importlib.resources (as the daemon does), and present in a built wheel."""
    text = resources.files("proxy").joinpath(RESOURCE).read_text(encoding="utf-8")
    entries = parse(text, _KNOWN_KEYS)
    assert [(c.provider, c.model) for c in entries] == [
        ("deepseek", "deepseek-chat"),
        ("deepseek", "deepseek-reasoner"),
        ("openai", "gpt-4o-audio-preview"),
        ("openai", "gpt-4o-mini-audio-preview"),
    ]
    assert all(c.source.startswith("https://") and c.checked for c in entries)
    # What setuptools copies into an install (``pip install .`` builds from the same step).
    built = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()"]
        + ["-q", "build_py", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "proxy" / RESOURCE).read_text(encoding="utf-8") == text


def test_a_mistyped_rate_key_is_an_error() -> None:
    text = '[[correction]]\nprovider="openai"\nmodel="m"\nsource="https://x"\nchecked="d"\n'
    with pytest.raises(ValueError, match=r"unknown rate key\(s\) \['input_mtk'\]"):
        parse(text + 'input_mtk = "1"\n', _KNOWN_KEYS)
    assert parse(text + 'input_mtok = "1"\n', _KNOWN_KEYS)[0].rates == {"input_mtok": Decimal(1)}
