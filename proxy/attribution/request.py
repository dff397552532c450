"""Who a request says it comes from: the ``AtlasBurn-*`` headers, the ``/@<app>/`` path prefix,
and the provider credential it carries (as a ``key_id``).

Headers (DESIGN "Attribution"): ``AtlasBurn-App``, ``AtlasBurn-User``, ``AtlasBurn-Session``, and
``AtlasBurn-Tag-<Name>`` (free dimensions). Every ``AtlasBurn-*`` header is the daemon's own and is
removed before the request goes upstream (``headers.request_head``). Bounds: at most ``MAX_TAGS``
tags (the first ones sent), names and values at most ``MAX_BYTES`` UTF-8 bytes (cut at a character
boundary), made inert (``proxy.text``); more or longer are cut, never refused. An empty value says
nothing. A header given twice: the first counts. Tag names are lower-cased (HTTP header names are
not case-sensitive, and HTTP/2 sends them lower-case), so ``AtlasBurn-Tag-Team`` is ``team``.

The path prefix ``/@<app>/`` is for clients that can only set a base URL
(``OPENAI_BASE_URL=http://127.0.0.1:8787/@ci-bot/v1``): ``split_app`` takes it off the path, which
is then routed as usual. A header wins over the prefix.

The credential, in this order: ``Authorization`` (the token after ``Bearer ``, else the whole
value), ``x-api-key`` (Anthropic), ``api-key`` (Azure OpenAI), ``x-goog-api-key`` (Gemini), then
``key=`` in the query (Gemini). Only its ``key_id`` is kept (``keys``).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

from ..text import inert
from . import MAX_BYTES, MAX_TAGS, Attributes, Process
from .keys import KeyIds

PREFIX = b"atlasburn-"
_OWN = b"atlasburn-api-key"
# Credential headers, lower-case, in the order they are preferred.
_CREDENTIALS = (b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key")
_RANK = {name: rank for rank, name in enumerate(_CREDENTIALS)}


def bounded(value: str) -> str:
    """``value`` inert (``proxy.text``) in at most ``MAX_BYTES`` UTF-8 bytes; a cut one ends
    with ``…`` like any inert text."""
    limit = MAX_BYTES
    while True:
        out = inert(value, limit)
        excess = len(out.encode("utf-8", "surrogatepass")) - MAX_BYTES
        if excess <= 0:
            return out
        limit = min(limit, len(out)) - max(1, excess // 4)


def split_app(raw_path: str) -> tuple[str | None, str]:
    """(app, the rest of the path) for a path ``/@<app>/<rest>``; (None, path) for any other.
    The app is percent-decoded and bounded; ``/@/...`` names none."""
    if not raw_path.startswith("/@"):
        return None, raw_path
    segment, slash, rest = raw_path[2:].partition("/")
    app = bounded(unquote(segment, errors="replace")) if segment else None
    return app or None, "/" + rest if slash else "/"


_CACHED = 4096  # values and key ids remembered (the same few repeat on every request)


class RequestAttribution:
    """Reads a request's attribution; ``keys`` None: no ``key_id`` (no secret available).

    The same apps, users, tags and keys come with request after request: their bounded text and
    their key ids are remembered (at most ``_CACHED`` each, forgotten all at once when full), so
    a request costs dictionary lookups, not an HMAC and a UTF-8 check per header."""

    def __init__(self, keys: KeyIds | None) -> None:
        self.keys = keys
        self._texts: dict[bytes, str] = {}
        self._ids: dict[bytes, str] = {}

    def _text(self, value: bytes) -> str:
        text = self._texts.get(value)
        if text is None:
            if len(self._texts) >= _CACHED:
                self._texts.clear()
            text = self._texts[value] = _text(value)
        return text

    def _key_id(self, keys: KeyIds, credential: bytes) -> str:
        key_id = self._ids.get(credential)
        if key_id is None:
            if len(self._ids) >= _CACHED:
                self._ids.clear()
            key_id = self._ids[credential] = keys.key_id(credential)
        return key_id

    def read(
        self,
        raw_headers: Iterable[tuple[bytes, bytes]],
        raw_query: str,
        app: str | None,
        process: Process | None,
    ) -> Attributes:
        """The request's ``Attributes``: headers, then ``app`` from the path prefix where no
        header names one, the credential's ``key_id`` (and its configured name), ``process``."""
        user = session = None
        header_app = None
        tags: dict[str, str] = {}
        credential: bytes | None = None
        rank = len(_CREDENTIALS)
        for name, value in raw_headers:
            lower = name.lower()
            if lower.startswith(PREFIX):
                if lower == _OWN or not value:
                    continue
                what = lower[len(PREFIX) :]
                if what == b"app":
                    if header_app is None:
                        header_app = self._text(value)
                elif what == b"user":
                    if user is None:
                        user = self._text(value)
                elif what == b"session":
                    if session is None:
                        session = self._text(value)
                elif what.startswith(b"tag-") and len(what) > 4 and len(tags) < MAX_TAGS:
                    tag = self._text(what[4:])
                    if tag not in tags:
                        tags[tag] = self._text(value)
                continue
            r = _RANK.get(lower)
            if r is not None and r < rank and (token := _token(value)):
                credential, rank = token, r
        key_id = key_name = None
        if self.keys is not None:
            if credential is None and "key=" in raw_query:
                credential = _query_key(raw_query)
            if credential:
                key_id = self._key_id(self.keys, credential)
                key_name = self.keys.names.get(key_id)
        return Attributes(
            app=header_app or app,
            user=user or None,
            session=session or None,
            tags=tuple((k, v) for k, v in tags.items() if v),
            key_id=key_id,
            key_name=key_name,
            process=process,
        )


def _text(value: bytes) -> str:
    return bounded(value.decode("utf-8", "replace").strip())


def _token(value: bytes) -> bytes:
    """The key in a credential header: ``Bearer <token>``'s token, else the value; empty for
    ``Bearer`` alone (no token: no credential, not the word)."""
    value = value.strip()
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return b"" if value.lower() == b"bearer" else value


def _query_key(raw_query: str) -> bytes | None:
    for name, value in parse_qsl(raw_query, keep_blank_values=False):
        if name == "key":
            return value.encode("utf-8", "surrogatepass")
    return None
