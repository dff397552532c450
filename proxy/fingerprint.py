"""Request fingerprints: what the loop detector counts.

A fingerprint is ``sha256:`` + the hex SHA-256 of the canonical JSON (keys sorted at every level, no
whitespace, UTF-8) of ``{"kind", "endpoint", "body"}``, where ``body`` is the request body without
its transport-only fields (the adapter decides which those are). Key order and whitespace never
change it; any change in model, messages, tools or sampling parameters does.

A form (multipart/form-data or urlencoded: audio transcriptions, image edits, uploads) is
fingerprinted from what it asks, not from its raw bytes: a multipart body's boundary is random per
request (every SDK draws a new one), so its bytes would make every retry, and every turn of a loop,
a new fingerprint. Its fingerprint is the hash of the canonical JSON of ``{"kind", "endpoint",
"form"}``, ``form`` being ``Form.canonical`` (``proxy.adapters.form``): the non-file fields
without the transport-only ones, and the SHA-256 of each file part's bytes. So the same audio with
the same model and prompt is the same request whatever its boundary, file name or field order;
another file, model, prompt, language or temperature is another request.

Any other body that is not JSON (and a form that cannot be read) is fingerprinted from its raw
bytes: the hash of the canonical JSON of ``{"kind", "endpoint"}``, a newline, and the bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

_SORTED = orjson.OPT_SORT_KEYS


def canonical_json(value: Any) -> bytes:
    """``value`` (parsed JSON) as canonical JSON. Raises ValueError for a value nested too deep
    to write (the parser takes up to 1,024 levels; Python's own recursion limit is lower)."""
    try:
        return orjson.dumps(value, option=_SORTED)
    except TypeError:
        # orjson refuses integers beyond 64 bits and more than 254 levels; the standard library
        # is slower but takes both, up to the recursion limit.
        try:
            return json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode()
        except RecursionError:
            raise ValueError("nested too deep to write as canonical JSON") from None


def fingerprint(kind: str, endpoint: str, canonical: Any, raw: bytes) -> str:
    """The fingerprint of a request; ``canonical`` is None when the body is not JSON. A body
    nested too deep to write canonically is fingerprinted from its raw bytes too."""
    if canonical is not None:
        try:
            data = canonical_json({"body": canonical, "endpoint": endpoint, "kind": kind})
        except ValueError:
            canonical = None
    if canonical is None:
        data = canonical_json({"endpoint": endpoint, "kind": kind}) + b"\n" + raw
    return "sha256:" + hashlib.sha256(data).hexdigest()


def form_fingerprint(kind: str, endpoint: str, form: Any) -> str:
    """The fingerprint of a form request; ``form`` is its canonical value (``describe_form``):
    strings, lists and dicts only, so it always writes."""
    data = canonical_json({"endpoint": endpoint, "form": form, "kind": kind})
    return "sha256:" + hashlib.sha256(data).hexdigest()


def raw_hasher(kind: str, endpoint: str) -> Any:
    """An incremental hash for a body fingerprinted from its raw bytes (one too large to hold):
    feed it the bytes with ``update``; the fingerprint is ``"sha256:" + hexdigest()``, the same
    as ``fingerprint(kind, endpoint, None, body)``."""
    h = hashlib.sha256(canonical_json({"endpoint": endpoint, "kind": kind}))
    h.update(b"\n")
    return h
