"""Bounded decoded copies (``proxy.encoding``): bodies decode in steps, within their bounds."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import re
import tomllib
import zlib
from pathlib import Path

import brotli
import pytest
from backports import zstd

from proxy import encoding
from proxy.encoding import (
    DECODERS,
    METER_FLOOR,
    METER_RATIO,
    STEP,
    Inflater,
    accepted,
    decode_body,
    tap,
)

from .fakes.provider import compress, gzip_bomb

PACK = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw-deflate": lambda d: zlib.compress(d, wbits=-15),
    "br": brotli.compress,
    "zstd": zstd.compress,
    "gzip, br": lambda d: compress("gzip, br", d),
    "br, zstd": lambda d: compress("br, zstd", d),
    "deflate, gzip, zstd": lambda d: compress("deflate, gzip, zstd", d),
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


def test_every_coding_the_daemon_reads_or_asks_for_comes_with_the_default_install() -> None:
    """``pip install .`` without extras must bring every decoder: the module behind each
    coding of ``DECODERS`` (and so of every Accept-Encoding the daemon sends up) is the
    standard library's or a distribution named in ``[project] dependencies``, not only in the
    test extra (brotli once was, and brotli answers went unmetered after the README's install)."""
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    runtime = {
        re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")
        for dep in project["project"]["dependencies"]
    }
    owners = importlib.metadata.packages_distributions()
    modules = {"gzip": zlib, "x-gzip": zlib, "deflate": zlib, "br": brotli, "zstd": zstd}
    assert set(DECODERS) == set(modules)
    assert encoding.brotli is brotli and encoding.zstd is zstd  # what the daemon uses
    for coding, module in modules.items():
        top = module.__name__.split(".")[0]
        if top in owners:  # a module from a distribution, not the standard library
            names = {d.lower().replace("_", "-").replace(".", "-") for d in owners[top]}
            assert names & runtime, (coding, module.__name__, names)
        else:
            assert top in {"zlib"}, coding
    # Whatever the daemon asks for upstream, it can read.
    value, _ = accepted("gzip, deflate, br, zstd, dcb, dcz, compress, *")
    for item in value.split(", "):
        Inflater(item.partition(";")[0])


@pytest.mark.parametrize(
    ("header", "value", "dropped"),
    [
        ("gzip, deflate, br", "gzip, deflate, br", []),
        ("gzip, deflate, br, zstd, dcb, dcz", "gzip, deflate, br, zstd", ["dcb", "dcz"]),
        ("*", "gzip, deflate, br, zstd", ["*"]),
        ("br;q=1.0, *;q=0.5", "br;q=1.0, gzip;q=0.5, deflate;q=0.5, zstd;q=0.5", ["*"]),
        ("compress", "identity", ["compress"]),
        ("GZip;q=0.8, x-bogus", "GZip;q=0.8", ["x-bogus"]),
        ("identity", "identity", []),
    ],
)
def test_accept_encoding_is_cut_to_what_the_meter_reads(
    header: str, value: str, dropped: list[str]
) -> None:
    assert accepted(header) == (value, dropped)


@pytest.mark.parametrize(
    ("how", "pack"),
    [
        ("gzip", gzip.compress),
        ("zstd", zstd.compress),
        ("gzip, zstd", lambda d: compress("gzip, zstd", d)),
    ],
)
def test_concatenated_gzip_members_and_zstd_frames_decode_whole(how: str, pack: object) -> None:
    """RFC 1952 lets a gzip body hold several members, RFC 8878 a zstd body several frames (a
    server that compresses piece by piece sends them so): all of them are read."""
    parts = [os.urandom(300_000), bytes(600_000), b"tail"]
    packed = b"".join(pack(p) for p in parts)  # type: ignore[operator]
    inflater = Inflater(how)
    steps = range(0, len(packed), 1000)
    got = b"".join(p for i in steps for p in inflater.feed(packed[i : i + 1000]))
    assert got == b"".join(parts)
    # A member or frame that ends exactly where a piece ends.
    inflater = Inflater(how)
    got = b"".join(p for part in parts for p in inflater.feed(pack(part)))  # type: ignore[operator]
    assert got == b"".join(parts)


def test_a_zstd_frame_may_not_ask_for_a_window_over_8_mib() -> None:
    """RFC 9659: HTTP's zstd uses windows of at most 8 MiB; a frame that asks for more (to make
    the daemon allocate it) is not read."""
    data = os.urandom(100_000)
    for log, readable in [(23, True), (24, False)]:
        c = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: log})
        packed = c.compress(data, c.FLUSH_BLOCK) + c.flush(c.FLUSH_FRAME)  # size not in header
        assert (decode_body(packed, "zstd", 1 << 20) == data) is readable


def zstd_bomb() -> bytes:
    """About 1 GiB of zeros as 256 concatenated zstd frames of 4 MiB each."""
    return zstd.compress(bytes(4 << 20)) * 256


@pytest.mark.parametrize(
    ("how", "bomb"),
    [("zstd", zstd_bomb), ("zstd, br", lambda: brotli.compress(zstd_bomb()))],
)
def test_the_meter_inflates_a_zstd_bomb_only_within_its_budget(how: str, bomb: object) -> None:
    packed = bomb()  # type: ignore[operator]
    meter, hits = Collect(), []
    feed = tap(meter, how, lambda: hits.append(1))  # type: ignore[arg-type]
    for i in range(0, len(packed), 64):
        feed(packed[i : i + 64])
    assert hits == [1] and meter.abandoned
    assert meter.size <= METER_FLOOR + METER_RATIO * len(packed)
    assert decode_body(packed, how, 8 << 20) is None


def test_each_layer_of_stacked_codings_is_bounded() -> None:
    """An inner layer that inflates past the bound stops the decoding, even when the outer
    layer makes nothing of it: 100,000 empty gzip members (2 MB) decode to no bytes at all."""
    inner = gzip.compress(b"", mtime=0) * 100_000
    assert len(inner) == 2_000_000
    packed = zstd.compress(inner)  # gzip, then zstd: zstd is undone first
    assert decode_body(packed, "gzip, zstd", 2_000_000) == b""
    assert decode_body(packed, "gzip, zstd", 1_999_999) is None
