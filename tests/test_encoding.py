"""Bounded decoded copies (``proxy.encoding``): bodies decode in steps, within their bounds."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest

from proxy.encoding import METER_FLOOR, METER_RATIO, STEP, Inflater, decode_body, tap

from .fakes.provider import gzip_bomb

PACK = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw-deflate": lambda d: zlib.compress(d, wbits=-15),
    "br": brotli.compress,
}


@pytest.mark.parametrize("how", list(PACK))
@pytest.mark.parametrize("data", [os.urandom(700_000), bytes(5_000_000)], ids=["random", "zeros"])
def test_every_encoding_decodes_whole_in_bounded_steps(how: str, data: bytes) -> None:
    packed = PACK[how](data)
    inflater = Inflater("deflate" if how == "raw-deflate" else how)
    pieces = []
    for i in range(0, len(packed), 4096):
        pieces += list(inflater.feed(packed[i : i + 4096]))
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) <= 2 * STEP  # (brotli may pass its limit by one buffer)


def test_a_request_body_decodes_only_within_its_limit() -> None:
    data = os.urandom(1000)
    assert decode_body(gzip.compress(data), "gzip", 1000) == data
    assert decode_body(gzip.compress(data), "gzip", 999) is None
    assert decode_body(gzip_bomb(), "gzip", 4 << 20) is None
    assert decode_body(b"not gzip", "gzip", 1000) is None
    assert decode_body(data, "zstd-or-whatever", 1000) is None
    assert decode_body(data, "identity", 1000) == data


class Collect:
    def __init__(self) -> None:
        self.size = 0
        self.abandoned = False

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)

    def abandon(self) -> None:
        self.abandoned = True


def test_the_meter_inflates_a_bomb_only_within_its_budget() -> None:
    bomb = gzip_bomb()
    meter, hits = Collect(), []
    feed = tap(meter, "gzip", lambda: hits.append(1))  # type: ignore[arg-type]
    for i in range(0, len(bomb), 65536):
        feed(bomb[i : i + 65536])
    # The first 64 KiB already inflate past the budget they allow: metering stops there.
    budget = METER_FLOOR + METER_RATIO * 65536
    assert budget - 2 * STEP < meter.size <= budget
    assert hits == [1] and meter.abandoned
    # A plain answer's bytes all pass.
    meter = Collect()
    tap(meter, None)(bytes(50_000_000))  # type: ignore[arg-type]
    assert meter.size == 50_000_000
