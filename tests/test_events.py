"""``proxy.events.parse_event``: the validator every event posted to ``/api/ingest`` passes.

Every number bounded, every pattern matched whole (no trailing newline), no ``ts`` far ahead of
this host's clock, and nothing accepted that the store cannot encode."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters.base import UsageSource
from proxy.events import Event, InvalidEvent, check_encodable, parse_event, ts_epoch

from .fakes.ingest import ingest_event

NOW = ts_epoch("2026-11-29T01:55:24.123Z")  # the fake's ts, as "now"
FP = "sha256:" + "c" * 64


def bad(change: dict[str, Any], now: float = NOW) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(ingest_event(0, **change), now=now)
    return str(caught.value)


def test_the_attack_body_is_refused_by_its_field() -> None:
    # The body of the attack review (H2): latency_ms 1e30 became an int past 64 bits, which
    # killed the spool writer.
    attack = {
        "ts": "2026-11-29T01:55:24.123Z",
        "provider": "openai",
        "model": "m",
        "endpoint": "/chat/completions",
        "status": 200,
        "tokens_in": 1,
        "tokens_out": 1,
        "cost_usd": 0,
        "latency_ms": 1e30,
        "fingerprint": FP,
        "stream": False,
    }
    with pytest.raises(InvalidEvent) as caught:
        parse_event(attack, now=NOW)
    assert str(caught.value) == (
        "latency_ms: expected a whole number of milliseconds from 0 to 2592000000, got 1e+30"
    )


@pytest.mark.parametrize(
    ("latency", "shown"),
    [
        (1e30, "1e+30"),
        (2**70, "1180591620717411303424"),
        (2**64 - 1, "18446744073709551615"),
        (2_592_000_001, "2592000001"),
        (2_592_000_000.5, "2592000000.5"),
        (812.5, "812.5"),
        (-1, "-1"),
        (-0.5, "-0.5"),
        (math.inf, "inf"),
        (math.nan, "nan"),
        (True, "True"),
        ("812", "'812'"),
        (None, "None"),
    ],
)
def test_latency_is_a_whole_number_of_milliseconds_up_to_30_days(latency: Any, shown: str) -> None:
    assert bad({"latency_ms": latency}) == (
        f"latency_ms: expected a whole number of milliseconds from 0 to 2592000000, got {shown}"
    )


@pytest.mark.parametrize(
    ("latency", "kept"), [(0, 0), (812, 812), (812.0, 812), (2_592_000_000, 2_592_000_000)]
)
def test_latency_bounds_that_pass(latency: Any, kept: int) -> None:
    event = parse_event(ingest_event(0, latency_ms=latency), now=NOW)
    assert event.latency_ms == kept and type(event.latency_ms) is int


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"status": 2**70},
            "status: expected an integer from 100 to 599, got 1180591620717411303424",
        ),
        (
            {"tokens_in": 2**64},
            "tokens_in: expected an integer from 0 to 1000000000000, got 18446744073709551616",
        ),
        (
            {"tokens_out": 10**12 + 1},
            "tokens_out: expected an integer from 0 to 1000000000000, got 1000000000001",
        ),
        ({"tokens_out": 1.0}, "tokens_out: expected an integer from 0 to 1000000000000, got 1.0"),
        (
            {"cost_usd": 2**70},
            "cost_usd: expected a number from 0 to 1000000000, got 1180591620717411303424",
        ),
        ({"cost_usd": math.nan}, "cost_usd: expected a number from 0 to 1000000000, got nan"),
    ],
)
def test_every_other_number_is_bounded(change: dict[str, Any], error: str) -> None:
    assert bad(change) == error


@pytest.mark.parametrize(
    ("change", "error"),
    [
        # "$" matched before a final newline: each of these was accepted (and "openai\n" was a
        # provider of its own in `report --by provider`).
        ({"provider": "openai\n"}, "provider: expected a name (1-64 characters), got 'openai\\n'"),
        ({"fingerprint": FP + "\n"}, "fingerprint: expected 'sha256:' and 64 lowercase hex digits"),
        (
            {"ts": "2026-11-29T01:55:24.123Z\n"},
            "ts: expected ISO 8601 UTC like 2026-11-29T01:55:24.123Z,"
            " got '2026-11-29T01:55:24.123Z\\n'",
        ),
        ({"provider": "\nopenai"}, "provider: expected a name (1-64 characters), got '\\nopenai'"),
    ],
)
def test_patterns_match_the_whole_value(change: dict[str, Any], error: str) -> None:
    assert bad(change) == error


def test_a_ts_more_than_5_minutes_ahead_is_refused() -> None:
    year_ahead = "2027-11-29T01:55:24.123Z"
    assert bad({"ts": year_ahead}) == (
        "ts: more than 5 minutes ahead of this host's clock, got '2027-11-29T01:55:24.123Z'"
    )
    # 5 minutes and a millisecond ahead: refused; 5 minutes ahead: accepted (clocks differ).
    assert bad({"ts": "2026-11-29T02:00:24.124Z"}) == (
        "ts: more than 5 minutes ahead of this host's clock, got '2026-11-29T02:00:24.124Z'"
    )
    assert parse_event(ingest_event(0, ts="2026-11-29T02:00:24.123Z"), now=NOW).ts == (
        "2026-11-29T02:00:24.123Z"
    )
    # A year ago is the past: kept (report --since selects on it).
    assert parse_event(ingest_event(0, ts="2025-11-29T01:55:24.123Z"), now=NOW).status == 200


def test_the_hosts_clock_is_the_default() -> None:
    with pytest.raises(InvalidEvent, match="more than 5 minutes ahead"):
        parse_event(ingest_event(0, ts="9999-12-31T23:59:59.999Z"))
    assert parse_event(ingest_event(0)).ts == "2026-11-29T01:55:24.123Z"


def test_check_encodable_names_the_field() -> None:
    event = parse_event(ingest_event(0), now=NOW)
    check_encodable(event)  # a good one passes
    event.latency_ms = 2**70  # what parse_event accepted before its bounds
    with pytest.raises(InvalidEvent) as caught:
        check_encodable(event)
    assert (
        str(caught.value) == "latency_ms: cannot be encoded as JSON: Integer exceeds 64-bit range"
    )
    made = Event(
        "2026-11-29T01:55:24.123Z",
        "openai",
        "\ud800",
        "/x",
        200,
        1,
        1,
        0.0,
        1,
        FP,
        False,
        UsageSource.REPORTED,
        True,
    )
    with pytest.raises(InvalidEvent) as caught:
        check_encodable(made)
    assert str(caught.value) == (
        "model: cannot be encoded as JSON: str is not valid UTF-8: surrogates not allowed"
    )


json_numbers = (
    st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**65)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=1e15, max_value=1e300)
    | st.booleans()
)
fields = {
    "ts": st.sampled_from(["2026-11-29T01:55:24.123Z", "2026-11-29T01:55:24Z", "x", ""])
    | st.text(max_size=30),
    "provider": st.sampled_from(["openai", "openai\n", ""]) | st.text(max_size=70),
    "model": st.text(max_size=300) | st.sampled_from(["\ud800", "m\n"]),
    "endpoint": st.text(max_size=300).map(lambda t: "/" + t),
    "status": json_numbers,
    "tokens_in": json_numbers,
    "tokens_out": json_numbers,
    "cost_usd": json_numbers,
    "latency_ms": json_numbers,
    "fingerprint": st.just(FP) | st.text(max_size=80),
    "stream": st.booleans() | json_numbers,
}


@given(st.fixed_dictionaries({}, optional=fields))
def test_whatever_is_accepted_can_be_encoded(changes: dict[str, Any]) -> None:
    obj = {**ingest_event(0), **changes}
    try:
        event = parse_event(obj, now=NOW)
    except InvalidEvent as exc:
        assert str(exc).split(":", 1)[0] in fields or str(exc).startswith("ts:")
        return
    body = orjson.loads(orjson.dumps(event.to_ingest()))
    assert body["latency_ms"] == obj["latency_ms"] and type(body["latency_ms"]) is int
    assert 0 <= body["latency_ms"] <= 2_592_000_000
    assert body["model"].isprintable() and len(body["model"]) <= 256
