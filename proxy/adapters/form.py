"""Request bodies that are forms: what a multipart/form-data or urlencoded request asks for.

OpenAI's upload endpoints take forms, not JSON: ``/v1/audio/transcriptions`` and
``/v1/audio/translations`` (``file``, ``model``, ``prompt``, ``language``, ``response_format``,
``temperature``, ``stream``, ...), ``/v1/images/edits`` and ``/v1/images/variations`` (``image``,
``mask``, ``model``, ``prompt``, ``size``, ...), ``/v1/files`` and ``/v1/uploads/{id}/parts``
(https://platform.openai.com/docs/api-reference/audio/createTranscription). The model is a form
field, so the daemon reads the form to know it.

``FormReader`` is sans-IO: it is fed the body as it passes (whole, or chunk by chunk while a body
too large to hold streams upstream) and keeps only the fields that are not files, each up to
``MAX_FIELD_BYTES``; a file part (one with a ``filename``), a field too long to keep, and a field
that is not UTF-8 are hashed as they pass (SHA-256) and never held. The parsing is
python-multipart's (the streaming parser Starlette and FastAPI use, https://github.com/Kludex/
python-multipart): boundaries, part headers and the urlencoded syntax are its job; the bounds,
what is kept and what is hashed are ours.

``Form.canonical`` is what the fingerprint covers: ``{"fields": {name: value, or [values] for a
name sent more than once}, "files": {name: ["<sha256 hex>", ...]}}``, parts of one name in the
order sent. File names and part content types are left out (an SDK derives them from a local
path, often a temporary file: the same audio sent again is the same request). A form that cannot
be read (malformed, cut short, more than ``MAX_PARTS`` parts) is no form: the caller falls back to
the raw bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import (
    MultipartParser,
    QuerystringParser,
    parse_options_header,
)

from .base import Adapter, RequestMeta

log = logging.getLogger(__name__)
# The parser logs a warning for each malformed body before it raises: a client's mistake (or a
# flood of them) that the daemon's log is not for. We log it at debug level ourselves.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)

# A field's value is kept up to this many bytes (a transcription prompt is a few hundred); a
# longer one is hashed like a file.
MAX_FIELD_BYTES = 64 * 1024
# All kept values together: past this, further fields are hashed too.
MAX_HELD_BYTES = 1024 * 1024
# Parts (or urlencoded fields) in one form: a form of more is not read (each costs a few
# hundred bytes of state however small it is).
MAX_PARTS = 1000

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Form:
    fields: dict[str, str | list[str]]  # the non-file fields, as sent
    files: dict[str, list[str]]  # name -> the SHA-256 (hex) of each part's bytes

    def field(self, name: str) -> str | None:
        """The value of a field sent once (None when absent or repeated)."""
        value = self.fields.get(name)
        return value if isinstance(value, str) else None

    @property
    def canonical(self) -> dict[str, Any]:
        return {"fields": self.fields, "files": self.files}


class FormReader:
    """Reads a form as it passes: ``feed`` each chunk, then ``result``. Never raises on the
    client's bytes: a form it cannot read makes ``result`` None."""

    __slots__ = (
        "_parser",
        "_fields",
        "_files",
        "_held",
        "_parts",
        "_ended",
        "_broken",
        "_header",
        "_value",
        "_name",
        "_is_file",
        "_data",
        "_size",
        "_hash",
        "_urlencoded",
    )

    def __init__(self, boundary: bytes | None) -> None:
        """A reader of a multipart body with ``boundary``, or (None) of an urlencoded one."""
        self._fields: dict[str, str | list[str]] = {}
        self._files: dict[str, list[str]] = {}
        self._held = 0
        self._parts = 0
        self._ended = False
        self._broken = False
        self._header = bytearray()
        self._value = bytearray()
        self._name = bytearray()
        self._is_file = False
        self._data: list[bytes] = []
        self._size = 0
        self._hash: Any = None
        self._urlencoded = boundary is None
        self._parser: MultipartParser | QuerystringParser
        if boundary is None:
            self._parser = QuerystringParser(
                {
                    "on_field_start": self._part_begin,
                    "on_field_name": self._field_name,
                    "on_field_data": self._data_in,
                    "on_field_end": self._part_end,
                    "on_end": self._end,
                }
            )
        else:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_part_data": self._data_in,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )

    @classmethod
    def open(cls, content_type: str | None) -> FormReader | None:
        """A reader for a body of ``content_type`` (the request's header), or None when it is
        not a form (or a multipart one without a usable boundary)."""
        if not content_type:
            return None
        mime, options = parse_options_header(content_type)
        if mime == URLENCODED.encode():
            return cls(None)
        if mime != MULTIPART.encode():
            return None
        boundary = options.get(b"boundary")
        if not boundary or len(boundary) > 200:  # RFC 2046: 1 to 70 characters
            return None
        return cls(boundary)

    def feed(self, chunk: bytes) -> None:
        if self._broken or not chunk:
            return
        try:
            self._parser.write(chunk)
        except Exception as exc:  # malformed, or over a bound: not a form the daemon reads
            log.debug("request form not read: %s", exc)
            self._fail()

    def result(self) -> Form | None:
        """The form, once the whole body was fed; None if it was not a readable form."""
        if not self._broken:
            try:
                self._parser.finalize()
            except Exception as exc:
                log.debug("request form not read: %s", exc)
                self._fail()
        if self._broken or not self._ended:
            return None
        return Form(self._fields, self._files)

    def _fail(self) -> None:
        self._broken = True
        self._fields, self._files, self._data = {}, {}, []

    # ------------------------------------------------------------------ parser callbacks

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ValueError(f"more than {MAX_PARTS} parts")
        self._name.clear()
        self._is_file = False
        self._data = []
        self._size = 0
        self._hash = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header).strip().lower() == b"content-disposition":
            _, options = parse_options_header(self._value.decode("latin-1"))
            self._name[:] = options.get(b"name", b"")
            self._is_file = b"filename" in options
            if self._is_file:
                self._hash = hashlib.sha256()
        self._header.clear()
        self._value.clear()

    def _field_name(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]
        if len(self._name) > MAX_FIELD_BYTES:
            raise ValueError("a field name too long")

    def _data_in(self, data: bytes, start: int, end: int) -> None:
        if self._hash is not None:
            self._hash.update(memoryview(data)[start:end])
            return
        piece = data[start:end]
        self._size += len(piece)
        if self._size > MAX_FIELD_BYTES or self._held + self._size > MAX_HELD_BYTES:
            self._to_hash().update(piece)
            return
        self._data.append(piece)

    def _to_hash(self) -> Any:
        """The part being read is kept no longer: what came of it is hashed instead."""
        h = self._hash = hashlib.sha256()
        for piece in self._data:
            h.update(piece)
        self._data = []
        return h

    def _part_end(self) -> None:
        name = self._text(bytes(self._name))
        if name is None:
            raise ValueError("a part name that is not UTF-8")
        if self._hash is None:
            raw = b"".join(self._data)
            value = self._text(raw)
            if value is not None:
                self._held += len(raw)
                _add(self._fields, name, value)
                self._data = []
                return
            self._to_hash()
        self._files.setdefault(name, []).append(self._hash.hexdigest())
        self._hash = None

    def _text(self, raw: bytes) -> str | None:
        if self._urlencoded:
            raw = unquote_to_bytes(raw.replace(b"+", b" "))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    def _end(self) -> None:
        self._ended = True


def _add(fields: dict[str, str | list[str]], name: str, value: str) -> None:
    """A field's value: the text when sent once, the texts in order when sent more often."""
    held = fields.get(name)
    if held is None:
        fields[name] = value
    elif isinstance(held, list):
        held.append(value)
    else:
        fields[name] = [held, value]


def read_form(content_type: str | None, body: bytes) -> Form | None:
    """The form a whole body holds, or None when it is not one (or cannot be read)."""
    reader = FormReader.open(content_type)
    if reader is None:
        return None
    reader.feed(body)
    return reader.result()


def describe_form(adapter: Adapter, path: str, form: Form) -> RequestMeta:
    """A form request's ``RequestMeta``: what the adapter makes of its fields as if they were a
    JSON body (the model of a ``model`` field, except where the adapter says otherwise: an Azure
    deployment names no model; the fields less the transport-only ones), the stream flag from a
    ``stream`` field (the text ``true`` in a form, where JSON has ``true``), and the canonical
    body ``{"fields": ..., "files": ...}`` with the file hashes."""
    meta = adapter.describe(path, form.fields)
    return RequestMeta(
        endpoint=meta.endpoint,
        model=meta.model,
        stream=form.field("stream") == "true",
        canonical={"fields": meta.canonical, "files": form.files},
    )
