"""``proxy.text.inert``: the one bound on client- and provider-chosen strings, and the log
formats that carry them."""

from __future__ import annotations

import json
import logging

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters.base import Usage
from proxy.config import parse_config
from proxy.logs import JSONFormatter, LogfmtFormatter, _logfmt_value
from proxy.pricing import Pricer
from proxy.text import inert


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("gpt-4o-mini", 256, "gpt-4o-mini"),
        ("", 256, ""),
        ("a b\\c", 256, "a b\\c"),  # printable: unchanged, backslash and space included
        ("x" * 256, 256, "x" * 256),
        ("x" * 257, 256, "x" * 255 + "…"),
        ("\x1b[2J", 256, "\\x1b[2J"),
        ("a\nb\rc\td", 256, "a\\x0ab\\x0dc\\x09d"),
        ("\x9b31m\x7f\x00", 256, "\\x9b31m\\x7f\\x00"),
        (
            "\u202egpt\u2066\u200d\u2028\u2029\xa0\xad",
            256,
            "\\u202egpt\\u2066\\u200d\\u2028\\u2029\\xa0\\xad",
        ),
        ("\U000e0001\ud800", 256, "\\U000e0001\\ud800"),
        ("日本語 ✓", 256, "日本語 ✓"),
        ("\x1b" * 100, 10, "\\x1b\\x1b…"),  # an escape is never split by the cut
        ("ab\x1bcd", 6, "ab…"),
        ("ab\x1bc", 8, "ab\\x1bc"),  # exactly the limit once escaped: no cut
        ("abcdef", 1, "…"),
        ("abcdef", 48, "abcdef"),
    ],
)
def test_inert_exact(value: str, limit: int, expected: str) -> None:
    assert inert(value, limit) == expected


def test_inert_returns_a_fitting_printable_value_itself() -> None:
    value = "claude-sonnet-4-6-20250929"
    assert inert(value) is value


def test_inert_refuses_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="^limit: expected at least 1, got 0$"):
        inert("\x1b", 0)


def test_inert_cuts_megabytes_of_escapes_between_escapes() -> None:
    huge = ("\x1b[2J" * 600_000)[: 2 << 20]  # 2 MiB of escape sequences
    assert inert(huge) == "\\x1b[2J" * 36 + "…"  # 252 + 1: the next escape would not fit


@given(st.text(), st.integers(1, 300))
def test_inert_is_bounded_printable_and_a_prefix_when_printable(value: str, limit: int) -> None:
    out = inert(value, limit)
    assert len(out) <= limit
    assert out.isprintable()
    if value.isprintable():
        assert out == value if len(value) <= limit else out == value[: limit - 1] + "…"
    assert inert(out, limit) == out  # inert is a fixed point


def _spec(c: str) -> str:
    """The escape the module docstring promises for one character."""
    if c.isprintable():
        return c
    code = ord(c)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


@given(st.text(st.characters(codec=None, categories=None)))
def test_inert_escapes_as_promised(value: str) -> None:
    pieces = [_spec(c) for c in value]
    escaped = "".join(pieces)
    if len(escaped) <= 256:
        assert inert(value) == escaped
    else:
        kept, size = [], 0
        for piece in pieces:
            if size + len(piece) > 255:
                break
            kept.append(piece)
            size += len(piece)
        assert inert(value) == "".join(kept) + "…"


# --------------------------------------------------------------------------- log formats


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpt-4o", "gpt-4o"),
        ("", '""'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines", '"two\\nlines"'),
        ("\x1b[2J\r\t", '"\\u001b[2J\\r\\t"'),
        ("\x9b\x7f\u202e\u2028", '"\\u009b\\u007f\\u202e\\u2028"'),
        ("\U000e0001", '"\\udb40\\udc01"'),
        ("日本", "日本"),
    ],
)
def test_logfmt_escapes_every_non_printable_character(value: str, expected: str) -> None:
    assert _logfmt_value(value) == expected
    if expected.startswith('"'):
        assert json.loads(expected) == value  # the escapes are JSON's: logfmt readers decode them


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("atlasburn.test", logging.WARNING, __file__, 1, msg, None, None)


def test_log_lines_carry_no_raw_control_character() -> None:
    msg = "reason \x1b[31mred\n\u202eforged\x9b"
    line = LogfmtFormatter().format(_record(msg))
    assert line.isprintable()
    assert line.endswith(' msg="reason \\u001b[31mred\\n\\u202eforged\\u009b"')
    line = JSONFormatter().format(_record(msg))
    assert line.isprintable()
    assert orjson.loads(line)["msg"] == msg


# --------------------------------------------------------------------------- the pricer


def test_the_pricer_keys_and_logs_bounded_names(caplog: pytest.LogCaptureFixture) -> None:
    """Model names and service tiers come from clients and providers; the pricer caches rates
    per name and warns once per unknown name: both hold the bounded name."""
    config = parse_config({}, env={})
    pricer = Pricer.from_config(config.providers, config.pricing)
    huge = "\x1b[2J" + "m" * (2 << 20)
    tier = "\n" + "t" * (2 << 20)
    with caplog.at_level(logging.WARNING, logger="proxy.pricing"):
        for _ in range(3):
            price = pricer.price("openai", huge, Usage(10, 10, service_tier=tier))
            assert (price.cost_usd, price.priced) == (0.0, False)
    model = "\\x1b[2J" + "m" * 248 + "…"
    assert list(pricer._cache) == [("openai", model, "\\x0a" + "t" * 251 + "…")]
    [warning] = caplog.messages
    assert warning == (
        f"no price known for openai model {model!r}: its events cost 0 and are marked unpriced;"
        f' add [pricing."{model}"] to the config to price it'
    )
    assert pricer.unpriced_total == 3
