"""Decoded copies of compressed bodies, for the meter and the fingerprint, always bounded.

The relay forwards bodies exactly as they were compressed, both ways; only the daemon's own
readers need plain bytes: the meter (usage in an answer) and the fingerprint (a request's JSON).
Compression lets a peer make a small body decode to a huge one (a 1 MB gzip answer of zeros
inflates to 1 GB), so nothing here ever inflates without a bound:

- at most ``STEP`` decoded bytes exist at a time (``max_length`` / ``output_buffer_limit``), and
  they are handed on before the next are made;
- an answer is metered up to ``METER_FLOOR`` decoded bytes plus ``METER_RATIO`` times the bytes
  that arrived (Envoy's decompressor stops at a ratio of 100); past that the meter stops, and
  the request is recorded without the usage it could not read (logged, counted). What the
  meter holds and parses is so tied to what arrived: an answer held open cannot pin more than
  1 MiB plus 16 times its own size;
- a request body is decoded for the fingerprint only up to ``server.max_buffered_body_bytes``
  (what the daemon would hold of a plain body); past it the body is treated like one too large
  to hold: fingerprinted from its raw bytes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator

from .adapters.base import Meter

log = logging.getLogger(__name__)

try:  # optional, as in aiohttp itself
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

# brotli < 1.2 cannot bound its output: it is then treated as an encoding the daemon cannot read.
_BOUNDED = "can_accept_more_data"
_BrotliError: type[Exception] = brotli.error if brotli is not None else ValueError

STEP = 256 * 1024  # decoded bytes produced at a time
METER_FLOOR = 1024 * 1024  # an answer may always decode to this much for the meter ...
METER_RATIO = 16  # ... plus this many bytes for each byte that arrived


class DecodeLimit(Exception):
    """A body decodes to more than its bound."""


class Inflater:
    """An incremental decoder for one Content-Encoding that never materialises more than
    ``STEP`` bytes at a time: ``feed(data)`` yields the decoded pieces."""

    def __init__(self, encoding: str | None) -> None:
        """ValueError for an encoding this cannot read (``identity``/None: bytes pass as
        they are)."""
        enc = (encoding or "").strip().lower()
        self.encoding = enc
        self._zlib: zlib._Decompress | None = None
        self._raw_fallback = False
        self._brotli = None
        if not enc or enc == "identity":
            return
        if enc in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            # zlib-wrapped per the RFC, but some servers send raw deflate: accept both.
            self._zlib = zlib.decompressobj()
            self._raw_fallback = True
        elif enc == "br" and brotli is not None and hasattr(brotli.Decompressor, _BOUNDED):
            self._brotli = brotli.Decompressor()
        else:
            raise ValueError(f"unsupported content-encoding {enc!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._zlib is not None:
            yield from self._inflate(data)
        elif self._brotli is not None:
            yield from self._unbrotli(data)
        elif data:
            yield data

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        obj = self._zlib
        assert obj is not None
        if self._raw_fallback and data:
            self._raw_fallback = False
            try:
                out = obj.decompress(data, STEP)
            except zlib.error:
                obj = self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                out = obj.decompress(data, STEP)
        else:
            out = obj.decompress(data, STEP)
        while True:
            data = obj.unconsumed_tail
            if out:
                yield out
            # A full piece may leave output pending even when all input was taken.
            if (len(out) < STEP and not data) or obj.eof:
                return
            out = obj.decompress(data, STEP)

    def _unbrotli(self, data: bytes) -> Iterator[bytes]:
        dec = self._brotli
        assert dec is not None
        out = dec.process(data, output_buffer_limit=STEP)
        # Output may stay pending after the input is taken: drain it until a call gives none.
        while out:
            yield out
            if dec.is_finished():
                return
            out = dec.process(b"", output_buffer_limit=STEP)


def decode_body(data: bytes, encoding: str, limit: int) -> bytes | None:
    """``data`` decoded, or None when it cannot be (an unknown encoding, corrupt data) or
    decodes to more than ``limit`` bytes."""
    try:
        inflater = Inflater(encoding)
        parts = []
        size = 0
        for piece in inflater.feed(data):
            size += len(piece)
            if size > limit:
                return None
            parts.append(piece)
    except (ValueError, zlib.error, _BrotliError):
        return None
    return b"".join(parts)


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
    decoded = 0

    def feed(chunk: bytes) -> None:
        nonlocal broken, received, decoded, inflater
        if broken or inflater is None:
            return
        received += len(chunk)
        budget = METER_FLOOR + METER_RATIO * received
        try:
            for piece in inflater.feed(chunk):
                decoded += len(piece)
                if decoded > budget:
                    raise DecodeLimit
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
