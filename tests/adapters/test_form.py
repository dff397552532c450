"""FormReader: the fields of a multipart or urlencoded body, read as it passes, files hashed."""

from __future__ import annotations

import hashlib
import tracemalloc
from urllib.parse import urlencode

from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.adapters.base import RequestMeta
from proxy.adapters.form import (
    MAX_FIELD_BYTES,
    MAX_HELD_BYTES,
    MAX_PARTS,
    Form,
    FormReader,
    describe_form,
    read_form,
)

BOUNDARY = "----atlasburnTestBoundary7MA4YWxk"


def part(name: str, value: bytes, filename: str | None = None, ctype: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = disposition + "\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
    return f"--{BOUNDARY}\r\n{head}\r\n".encode() + value + b"\r\n"


def multipart(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body.replace(BOUNDARY.encode(), boundary.encode())


def ctype(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


AUDIO = b"RIFF" + bytes(range(256)) * 40


def test_fields_are_kept_and_files_hashed() -> None:
    body = multipart(
        part("model", b"gpt-4o-transcribe"),
        part("prompt", "Namen: Jürgen, Zoë".encode()),
        part("timestamp_granularities[]", b"word"),
        part("timestamp_granularities[]", b"segment"),
        part("file", AUDIO, "hello.wav", "audio/wav"),
        part("empty", b""),
    )
    assert read_form(ctype(), body) == Form(
        fields={
            "model": "gpt-4o-transcribe",
            "prompt": "Namen: Jürgen, Zoë",
            "timestamp_granularities[]": ["word", "segment"],
            "empty": "",
        },
        files={"file": [sha(AUDIO)]},
    )


def test_a_file_with_an_empty_name_is_a_file() -> None:
    """A part is a file when it has a ``filename`` parameter at all (curl -F 'f=@-' sends
    ``filename=""`` for stdin)."""
    body = multipart(part("file", b"abc", ""))
    assert read_form(ctype(), body) == Form({}, {"file": [sha(b"abc")]})


def test_a_field_too_long_to_keep_is_hashed() -> None:
    long = b"x" * (MAX_FIELD_BYTES + 1)
    body = multipart(part("model", b"m"), part("prompt", long), part("prompt", b"short"))
    assert read_form(ctype(), body) == Form(
        {"model": "m", "prompt": "short"}, {"prompt": [sha(long)]}
    )


def test_fields_past_the_total_bound_are_hashed() -> None:
    value = b"v" * MAX_FIELD_BYTES
    count = MAX_HELD_BYTES // MAX_FIELD_BYTES  # these fill the bound exactly
    parts = [part(f"f{i}", value) for i in range(count)]
    body = multipart(*parts, part("late", b"z"))
    form = read_form(ctype(), body)
    assert form is not None
    assert len(form.fields) == count and form.files == {"late": [sha(b"z")]}


def test_a_field_that_is_not_utf8_is_hashed() -> None:
    body = multipart(part("model", b"m"), part("prompt", b"\xff\xfe"))
    assert read_form(ctype(), body) == Form({"model": "m"}, {"prompt": [sha(b"\xff\xfe")]})


def test_too_many_parts_is_no_form() -> None:
    body = multipart(*[part("a", b"1")] * (MAX_PARTS + 1))
    assert read_form(ctype(), body) is None
    assert read_form(ctype(), multipart(*[part("a", b"1")] * MAX_PARTS)) is not None


def test_a_body_cut_short_or_malformed_is_no_form() -> None:
    body = multipart(part("model", b"gpt-4o-transcribe"), part("file", AUDIO, "a.wav"))
    assert read_form(ctype(), body[:-10]) is None  # no closing boundary
    assert read_form(ctype(), b'{"model": "gpt-4o"}') is None
    assert read_form(ctype("otherboundary"), body) is None
    assert read_form(ctype(), b"") is None


def test_only_forms_are_read() -> None:
    assert FormReader.open("application/json") is None
    assert FormReader.open(None) is None
    assert FormReader.open("multipart/form-data") is None  # no boundary
    assert FormReader.open("multipart/form-data; boundary=" + "b" * 201) is None
    assert FormReader.open('Multipart/Form-Data; charset=utf-8; boundary="q b"') is not None
    assert FormReader.open("application/x-www-form-urlencoded; charset=utf-8") is not None


def test_urlencoded() -> None:
    body = b"model=gpt-4o-transcribe&prompt=caf%C3%A9+au+lait&x=1&x=2&flag&bad=%FF"
    assert read_form("application/x-www-form-urlencoded", body) == Form(
        {"model": "gpt-4o-transcribe", "prompt": "café au lait", "x": ["1", "2"], "flag": ""},
        {"bad": [sha(b"%FF")]},
    )


def test_each_adapter_describes_a_form_by_its_own_rules() -> None:
    form = Form(
        {"model": "gpt-4o-transcribe", "stream": "true", "user": "u-1", "language": "en"},
        {"file": ["ab" * 32]},
    )
    assert describe_form(ADAPTERS["openai"], "/v1/audio/transcriptions", form) == RequestMeta(
        endpoint="/audio/transcriptions",
        model="gpt-4o-transcribe",
        stream=True,
        canonical={
            "fields": {"model": "gpt-4o-transcribe", "language": "en"},
            "files": {"file": ["ab" * 32]},
        },
    )
    # An Azure deployment names no model (the answer does); it is part of what is asked.
    azure = ADAPTERS["azure"]
    path = "/openai/deployments/my-transcriber/audio/transcriptions"
    assert describe_form(azure, path, form) == RequestMeta(
        endpoint="/audio/transcriptions",
        model=None,
        stream=True,
        canonical={
            "fields": {
                "model": "gpt-4o-transcribe",
                "language": "en",
                "deployment": "my-transcriber",
            },
            "files": {"file": ["ab" * 32]},
        },
    )
    sent_once = Form({"stream": ["true", "true"]}, {})
    assert describe_form(ADAPTERS["openai"], "/v1/x", sent_once).stream is False


def test_file_parts_are_never_held() -> None:
    """32 MiB of audio fed in 64 KiB pieces: the reader's memory stays under 256 KiB."""
    piece = bytes(range(256)) * 256
    head = (
        part("model", b"gpt-4o-transcribe")
        + (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        ).encode()
    )
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    whole = hashlib.sha256()
    reader = FormReader.open(ctype())
    assert reader is not None
    tracemalloc.start()
    try:
        reader.feed(head)
        for _ in range(512):
            reader.feed(piece)
            whole.update(piece)
        reader.feed(tail)
        form = reader.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert form == Form({"model": "gpt-4o-transcribe"}, {"file": [whole.hexdigest()]})
    assert peak < 256 * 1024, peak


names = st.text(st.characters(codec="utf-8", exclude_characters='"\r\n\\'), max_size=12)
texts = st.text(st.characters(codec="utf-8"), max_size=200)
files = st.binary(max_size=3000)
fields = st.lists(
    st.one_of(st.tuples(st.just("field"), names, texts), st.tuples(st.just("file"), names, files)),
    max_size=8,
)


@given(
    fields,
    st.text("abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./=?", min_size=1, max_size=70),
    st.lists(st.integers(min_value=0), max_size=12),
)
def test_any_form_split_anywhere_reads_the_same(
    items: list[tuple[str, str, object]], boundary: str, cuts: list[int]
) -> None:
    """A form reads as what was encoded, whatever its boundary and wherever the body is split
    as it passes (a boundary or a header cut in two, a piece of one byte)."""
    parts = []
    expected_fields: dict[str, str | list[str]] = {}
    expected_files: dict[str, list[str]] = {}
    for kind, name, value in items:
        if kind == "field":
            assert isinstance(value, str)
            parts.append(part(name, value.encode()))
            held = expected_fields.get(name)
            if held is None:
                expected_fields[name] = value
            elif isinstance(held, list):
                held.append(value)
            else:
                expected_fields[name] = [held, value]
        else:
            assert isinstance(value, bytes)
            parts.append(part(name, value, "f.bin", "application/octet-stream"))
            expected_files.setdefault(name, []).append(sha(value))
    body = multipart(*parts, boundary=boundary)
    if boundary.encode() in b"".join(parts).replace(BOUNDARY.encode(), b""):
        return  # a value that holds the boundary is not a well-formed body: not this test
    reader = FormReader.open(ctype(f'"{boundary}"'))
    assert reader is not None
    offsets = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for start, end in zip(offsets, offsets[1:], strict=False):
        reader.feed(body[start:end])
    assert reader.result() == Form(expected_fields, expected_files)


@given(st.lists(st.tuples(names, texts), max_size=8), st.lists(st.integers(min_value=0)))
def test_any_urlencoded_form_split_anywhere_reads_the_same(
    pairs: list[tuple[str, str]], cuts: list[int]
) -> None:
    pairs = [(n, v) for n, v in pairs if n]  # (a pair without a name is no field)
    body = urlencode(pairs).encode()
    expected: dict[str, str | list[str]] = {}
    for name, value in pairs:
        held = expected.get(name)
        if held is None:
            expected[name] = value
        elif isinstance(held, list):
            held.append(value)
        else:
            expected[name] = [held, value]
    reader = FormReader.open("application/x-www-form-urlencoded")
    assert reader is not None
    offsets = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for start, end in zip(offsets, offsets[1:], strict=False):
        reader.feed(body[start:end])
    assert reader.result() == Form(expected, {})
