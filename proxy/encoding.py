"""Decoded copies of compressed bodies, for the meter and the fingerprint, always bounded.

The relay forwards bodies exactly as they were compressed, both ways; only the daemon's own
readers need plain bytes: the meter (usage in an answer) and the fingerprint (a request's JSON).
(One exception: a stream whose usage chunk the daemon must hide, compressed by an upstream that
was asked for ``identity``, reaches the client decoded; see ``proxy.relay``.)

Every coding a provider or a CDN in front of it sends is read in the default install: ``gzip``
(``x-gzip``), ``deflate`` (zlib-wrapped or raw), ``br`` (brotli >= 1.2, whose output can be
bounded) and ``zstd`` (RFC 8878; ``compression.zstd``, or its backport before Python 3.14),
each also stacked (``Content-Encoding: gzip, br`` is decoded ``br`` first) and concatenated
(several gzip members or zstd frames in one body). ``DECODERS`` is the table; the relay asks
upstream only for codings in it (``accepted``).

Compression lets a peer make a small body decode to a huge one (a 1 MB gzip answer of zeros
inflates to 1 GB), so nothing here ever inflates without a bound:

- at most ``STEP`` decoded bytes exist at a time per coding (``max_length`` /
  ``output_buffer_limit``), and they are handed on before the next are made;
- an answer is metered up to ``METER_FLOOR`` decoded bytes plus ``METER_RATIO`` times the bytes
  that arrived (Envoy's decompressor stops at a ratio of 100); past that the meter stops, and
  the request is recorded without the usage it could not read (logged, counted). What the
  meter holds and parses is so tied to what arrived: an answer held open cannot pin more than
  1 MiB plus 16 times its own size. With stacked codings the bound holds for each layer's
  output, so no inner layer may inflate past it either;
- a zstd frame may ask for a window of at most 8 MiB (``ZSTD_WINDOW_LOG_MAX``: RFC 9659 caps
  HTTP's zstd window there), so a frame header cannot make the decoder allocate 128 MiB;
- a request body is decoded for the fingerprint only up to ``server.max_buffered_body_bytes``
  (what the daemon would hold of a plain body); past it the body is treated like one too large
  to hold: fingerprinted from its raw bytes.
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

import brotli

from .adapters.base import Meter

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # the same module, backported (what aiohttp uses too)
    from backports import zstd

log = logging.getLogger(__name__)

STEP = 256 * 1024  # decoded bytes produced at a time
METER_FLOOR = 1024 * 1024  # an answer may always decode to this much for the meter ...
METER_RATIO = 16  # ... plus this many bytes for each byte that arrived
ZSTD_WINDOW_LOG_MAX = 23  # 8 MiB: RFC 9659 section 3, the largest window HTTP's zstd may use

# What a corrupt body raises, by decoder.
DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error, brotli.error, zstd.ZstdError)


class DecodeLimit(Exception):
    """A body decodes to more than its bound."""


_UNREADABLE = (ValueError, DecodeLimit, zlib.error, brotli.error, zstd.ZstdError)


class _Layer(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data`` (each at most about ``STEP`` bytes)."""
        ...


class _Zlib:
    """gzip (members may be concatenated, as RFC 1952 allows) or deflate (zlib-wrapped per RFC
    9110, but some servers send it raw: both are accepted)."""

    def __init__(self, gzip: bool) -> None:
        self._wbits = 16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS
        self._gzip = gzip
        self._obj = zlib.decompressobj(self._wbits)
        self._raw_fallback = not gzip

    def feed(self, data: bytes) -> Iterator[bytes]:
        obj = self._obj
        if self._raw_fallback and data:
            self._raw_fallback = False
            try:
                out = obj.decompress(data, STEP)
            except zlib.error:
                obj = self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                out = obj.decompress(data, STEP)
        else:
            out = obj.decompress(data, STEP)
        while True:
            data = obj.unconsumed_tail
            if out:
                yield out
            if obj.eof:
                rest = obj.unused_data.lstrip(b"\0")  # (a gzip file may be padded with NULs)
                if not (self._gzip and rest):
                    return
                obj = self._obj = zlib.decompressobj(self._wbits)  # the next member
                out = obj.decompress(rest, STEP)
                continue
            # A full piece may leave output pending even when all input was taken.
            if len(out) < STEP and not data:
                return
            out = obj.decompress(data, STEP)


class _Brotli:
    def __init__(self) -> None:
        self._dec = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        dec = self._dec
        out = dec.process(data, output_buffer_limit=STEP)
        # Output may stay pending after the input is taken: drain it until a call gives none.
        while out:
            yield out
            if dec.is_finished():
                return
            out = dec.process(b"", output_buffer_limit=STEP)


class _Zstd:
    """zstd; a body may hold several frames one after another (RFC 8878 section 3)."""

    def __init__(self) -> None:
        self._dec = self._new()

    @staticmethod
    def _new() -> zstd.ZstdDecompressor:
        return zstd.ZstdDecompressor(
            options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
        )

    def feed(self, data: bytes) -> Iterator[bytes]:
        dec = self._dec
        if dec.eof and data:  # the last frame ended with the last piece: a new one starts
            dec = self._dec = self._new()
        while True:
            out = dec.decompress(data, STEP)
            data = b""
            if out:
                yield out
            if dec.eof:
                data = dec.unused_data
                if not data:
                    return
                dec = self._dec = self._new()  # the next frame
            elif dec.needs_input:
                return


# Content-Encoding token -> a new decoder for it: the codings the daemon reads.
DECODERS: dict[str, Callable[[], _Layer]] = {
    "gzip": lambda: _Zlib(gzip=True),
    "x-gzip": lambda: _Zlib(gzip=True),
    "deflate": lambda: _Zlib(gzip=False),
    "br": _Brotli,
    "zstd": _Zstd,
}


def codings(header: str | None) -> list[str]:
    """The codings a Content-Encoding value names, in the order they were applied, without
    ``identity`` (RFC 9110 section 8.4: ``gzip, br`` is gzip, then brotli)."""
    if not header:
        return []
    names = (c.strip().lower() for c in header.split(","))
    return [c for c in names if c and c != "identity"]


class Inflater:
    """An incremental decoder for one Content-Encoding value (one coding or several stacked)
    that never materialises more than ``STEP`` bytes at a time per layer: ``feed(data)`` yields
    the decoded pieces, and raises DecodeLimit once any layer's output passes ``limit``."""

    def __init__(self, encoding: str | None, limit: int | None = None) -> None:
        """ValueError for a coding this cannot read (``identity``/None: bytes pass as
        they are)."""
        self.encoding = (encoding or "").strip().lower()
        self.limit = limit  # decoded bytes each layer may produce in all; None: no bound
        layers = []
        for name in reversed(codings(encoding)):  # the last applied is undone first
            make = DECODERS.get(name)
            if make is None:
                raise ValueError(f"unsupported content-encoding {name!r}")
            layers.append(make())
        self._layers = layers
        self._sizes = [0] * len(layers)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self._layers:
            if data:
                yield data
            return
        pieces = self._count(0, self._layers[0].feed(data))
        for i in range(1, len(self._layers)):
            pieces = self._through(i, pieces)
        yield from pieces

    def _through(self, i: int, pieces: Iterator[bytes]) -> Iterator[bytes]:
        layer = self._layers[i]
        for piece in pieces:
            yield from self._count(i, layer.feed(piece))

    def _count(self, i: int, pieces: Iterator[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            self._sizes[i] += len(piece)
            if self.limit is not None and self._sizes[i] > self.limit:
                raise DecodeLimit
            yield piece


def decode_body(data: bytes, encoding: str, limit: int) -> bytes | None:
    """``data`` decoded, or None when it cannot be (an unknown encoding, corrupt data) or
    decodes to more than ``limit`` bytes (in any layer)."""
    try:
        return b"".join(Inflater(encoding, limit).feed(data))
    except _UNREADABLE:
        return None


def tap(
    meter: Meter, encoding: str | None, on_limit: Callable[[], None] | None = None
) -> Callable[[bytes], None]:
    """A function that feeds ``meter`` a decoded copy of each body chunk, within the meter's
    bound (``METER_FLOOR`` + ``METER_RATIO`` x the bytes received), and never raises.
    ``on_limit`` is called once if the bound stops the metering."""
    broken = False
    inflater: Inflater | None = None
    try:
        inflater = Inflater(encoding)
    except ValueError as exc:
        log.warning("cannot meter a response body: %s", exc)
        broken = True
    received = 0

    def feed(chunk: bytes) -> None:
        nonlocal broken, received, inflater
        if broken or inflater is None:
            return
        received += len(chunk)
        budget = inflater.limit = METER_FLOOR + METER_RATIO * received
        try:
            for piece in inflater.feed(chunk):
                meter.feed(piece)
        except DecodeLimit:
            broken = True
            # What the decoder and the meter hold for this body is no use any more: let it go
            # now, not when the answer ends (a brotli decoder's window alone may be 16 MiB).
            inflater = None
            meter.abandon()
            log.warning(
                "a response body (encoding %r) decodes to over %d bytes from %d: metered only "
                "in part",
                encoding,
                budget,
                received,
            )
            if on_limit is not None:
                on_limit()
        except Exception:
            broken = True
            log.warning("cannot meter a response body (encoding %r)", encoding, exc_info=True)

    return feed


def accepted(header: str) -> tuple[str, list[str]]:
    """An Accept-Encoding value cut to the codings ``DECODERS`` reads (weights kept), and the
    codings it dropped. ``*`` (any coding) becomes the readable codings the value does not
    name, with its weight. Nothing left means ``identity``, which a server may always send."""
    kept: list[str] = []
    named: set[str] = set()
    dropped: list[str] = []
    wildcard: str | None = None
    for item in header.split(","):
        name, semi, params = item.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        named.add(name)
        if name in DECODERS or name == "identity":
            kept.append(item.strip())
        elif name == "*":
            wildcard = semi + params
        else:
            dropped.append(name)
    if wildcard is not None:
        dropped.append("*")
        kept += [c + wildcard for c in _WILDCARD if c not in named]
    return (", ".join(kept) or "identity"), dropped


_WILDCARD = ("gzip", "deflate", "br", "zstd")  # what ``*`` stands for, most widely served first
