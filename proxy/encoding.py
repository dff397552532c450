"""Decoded copies of compressed bodies for the meter.

The relay forwards bodies exactly as the provider compressed them; only the meter, on the side,
needs the plain bytes. ``tap`` wraps a meter so that it is fed a decoded copy of each chunk, and so
that a body it cannot decode or parse costs the request nothing but its usage.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

from .adapters.base import Meter

log = logging.getLogger(__name__)

try:  # optional, as in aiohttp itself
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None


def tap(meter: Meter, encoding: str | None) -> Callable[[bytes], None]:
    """A function that feeds ``meter`` a decoded copy of each body chunk and never raises."""
    broken = False
    decode: Callable[[bytes], bytes] | None = None
    try:
        decode = decoder(encoding)
    except ValueError as exc:
        log.warning("cannot meter a response body: %s", exc)
        broken = True

    def feed(chunk: bytes) -> None:
        nonlocal broken
        if broken:
            return
        try:
            meter.feed(decode(chunk) if decode is not None else chunk)
        except Exception:
            broken = True
            log.warning("cannot meter a response body (encoding %r)", encoding, exc_info=True)

    return feed


def decoder(encoding: str | None) -> Callable[[bytes], bytes] | None:
    """An incremental decoder for a Content-Encoding (None for identity); ValueError if unknown."""
    enc = (encoding or "").strip().lower()
    if not enc or enc == "identity":
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if enc == "deflate":
        return _Inflate().decompress
    if enc == "br" and brotli is not None:
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    raise ValueError(f"unsupported content-encoding {enc!r}")


class _Inflate:
    """``deflate`` is zlib-wrapped per the RFC, but some servers send raw deflate: accept both."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj()
        self._started = False

    def decompress(self, data: bytes) -> bytes:
        if not self._started:
            self._started = True
            try:
                return self._obj.decompress(data)
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._obj.decompress(data)
