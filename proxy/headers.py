"""Header filtering for both directions of the relay.

Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are dropped both ways, together
with every header the ``Connection`` header names. Towards the provider we also drop what the
client's connection to us decided (``Host``, ``Content-Length``, ``Expect``) and every header
of our own (``AtlasBurn-API-Key``, which must never leave the host, and the attribution headers
``AtlasBurn-App``, ``-User``, ``-Session``, ``-Tag-<Name>``: any name starting ``AtlasBurn-``).
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", "atlasburn-api-key"}
RESPONSE_DROP = HOP_BY_HOP
REQUEST_DROP_RAW = frozenset(name.encode() for name in REQUEST_DROP)
OWN_PREFIX = "atlasburn-"  # the daemon's own request headers: never relayed
_OWN_PREFIX_RAW = OWN_PREFIX.encode()


def is_own(name: str) -> bool:
    """Whether a request header is the daemon's own (``AtlasBurn-*``): never relayed."""
    return name.lower().startswith(OWN_PREFIX)


def filter_headers(
    headers: Iterable[tuple[str, str]],
    connection: str | None,
    drop: frozenset[str],
    extra: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """The end-to-end headers of ``headers``: without ``drop``, ``extra`` and those
    ``connection`` (the value of the Connection header) names. Order and repeated headers are
    kept. A plain list: aiohttp builds its own multidict from it, once."""
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    if extra:
        drop = drop | extra
    return [(name, value) for name, value in headers if name.lower() not in drop]


def request_head(
    raw: Iterable[tuple[bytes, bytes]],
    connection: str | None,
    extra: frozenset[bytes] = frozenset(),
) -> bytes:
    """The end-to-end request headers for the upstream, as the header lines of an HTTP/1.1
    request: the client's own bytes (``raw_headers``, as received), without ``REQUEST_DROP``,
    ``extra`` and what ``connection`` names. Nothing is decoded or re-encoded."""
    drop = REQUEST_DROP_RAW
    if connection:
        drop = drop | {token.strip().lower().encode("latin-1") for token in connection.split(",")}
    if extra:
        drop = drop | extra
    kept = [
        (name, value, lower)
        for name, value in raw
        if (lower := name.lower()) not in drop and not lower.startswith(_OWN_PREFIX_RAW)
    ]
    head = b"".join([name + b": " + value + b"\r\n" for name, value, _ in kept])
    if SESSION_COOKIE not in head:  # (the status page's cookie: only a browser sends one)
        return head
    return b"".join(
        [
            name + b": " + line + b"\r\n"
            for name, value, lower in kept
            for line in [without_session(value) if lower == b"cookie" else value]
            if line or lower != b"cookie"  # (a Cookie line of session cookies only: none)
        ]
    )


SESSION_COOKIE = b"atlasburn_session_"


def without_session(cookie: bytes) -> bytes:
    """A ``Cookie`` header's value without the status page's session cookies
    (``atlasburn_session_<port>``): a browser app on an allowed origin that sends credentials
    to a provider route must not hand the daemon's session to the provider. b"" when nothing
    is left of it."""
    kept = [
        pair.strip()
        for pair in cookie.split(b";")
        if pair.strip() and not pair.strip().startswith(SESSION_COOKIE)
    ]
    return b"; ".join(kept)
