"""Fingerprints: invariant under key order and whitespace, sensitive to every semantic field."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.adapters.form import describe_form, read_form
from proxy.fingerprint import fingerprint, form_fingerprint

openai = ADAPTERS["openai"]


def fp_of_bytes(raw: bytes, path: str = "/v1/chat/completions", kind: str = "openai") -> str:
    adapter = ADAPTERS[kind]
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    meta = adapter.describe(path, body)
    return fingerprint(kind, meta.endpoint, meta.canonical if body is not None else None, raw)


def test_known_value() -> None:
    """The definition, computed by hand: sha256 of the sorted compact JSON."""
    raw = (
        b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    )
    canonical = (
        b'{"body":{"messages":[{"content":"hi","role":"user"}],"model":"gpt-4o-mini"},'
        b'"endpoint":"/chat/completions","kind":"openai"}'
    )
    assert fp_of_bytes(raw) == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_not_json_uses_raw_bytes() -> None:
    raw = b"\x00not json{"
    expected = hashlib.sha256(b'{"endpoint":"/chat/completions","kind":"openai"}\n' + raw)
    assert fp_of_bytes(raw) == "sha256:" + expected.hexdigest()
    assert fp_of_bytes(raw + b"x") != fp_of_bytes(raw)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt-4o-mini", "gpt-4.1", "o3"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "temperature": st.floats(0, 2),
        "tools": st.lists(json_values, max_size=2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 10_000),
        "extra": json_values,
    },
)


def shuffled_dumps(value: Any, rnd: Any, indent: int | None) -> str:
    def shuffle(v: Any) -> Any:
        if isinstance(v, dict):
            items = list(v.items())
            rnd.shuffle(items)
            return {k: shuffle(x) for k, x in items}
        if isinstance(v, list):
            return [shuffle(x) for x in v]
        return v

    return json.dumps(shuffle(value), indent=indent, ensure_ascii=rnd.random() < 0.5)


@given(bodies, st.randoms(), st.sampled_from([None, 1, 4]))
def test_key_order_and_whitespace_do_not_matter(
    body: dict[str, Any], rnd: Any, indent: int | None
) -> None:
    compact = json.dumps(body, separators=(",", ":")).encode()
    assert fp_of_bytes(shuffled_dumps(body, rnd, indent).encode()) == fp_of_bytes(compact)


@given(
    bodies, st.sampled_from(["stream", "stream_options", "user", "metadata", "store"]), json_values
)
def test_transport_fields_do_not_matter(body: dict[str, Any], field: str, value: Any) -> None:
    with_field = {**body, field: value}
    assert fp_of_bytes(json.dumps(with_field).encode()) == fp_of_bytes(json.dumps(body).encode())


@given(
    bodies,
    st.sampled_from(
        [
            "model",
            "messages",
            "tools",
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
            "response_format",
            "n",
        ]
    ),
    json_values,
)
def test_every_semantic_field_matters(body: dict[str, Any], field: str, value: Any) -> None:
    changed = {**body, field: value}
    if changed == body:  # hypothesis may draw the value the body already has
        return
    assert fp_of_bytes(json.dumps(changed).encode()) != fp_of_bytes(json.dumps(body).encode())


def test_endpoint_and_kind_matter() -> None:
    raw = b'{"model":"m","input":"x"}'
    assert fp_of_bytes(raw, "/v1/embeddings") != fp_of_bytes(raw, "/v1/responses")
    assert fp_of_bytes(raw, "/v1/messages", "anthropic") != fp_of_bytes(raw, "/v1/messages")


def test_gemini_model_in_path_matters() -> None:
    raw = b'{"contents":[{"parts":[{"text":"hi"}]}]}'
    a = fp_of_bytes(raw, "/v1beta/models/gemini-2.5-flash:generateContent", "gemini")
    b = fp_of_bytes(raw, "/v1beta/models/gemini-2.5-pro:generateContent", "gemini")
    assert a != b


def test_huge_integers_still_fingerprint() -> None:
    a = fp_of_bytes(b'{"model":"m","seed":123456789012345678901234567890}')
    assert a.startswith("sha256:") and len(a) == 71


def test_a_body_nested_too_deep_to_write_is_fingerprinted_from_its_bytes() -> None:
    # orjson reads up to 1,024 levels but writes 254; the standard library's writer stops at
    # Python's recursion limit: such a body (980 levels) is hashed from its raw bytes.
    import orjson

    raw = b'{"model":"gpt-4o-mini","x":' + b"[" * 980 + b"]" * 980 + b"}"
    body = orjson.loads(raw)
    assert fingerprint("openai", "/chat/completions", body, raw) == fingerprint(
        "openai", "/chat/completions", None, raw
    )


def form_fp(body: bytes, boundary: str) -> str:
    form = read_form(f"multipart/form-data; boundary={boundary}", body)
    assert form is not None
    meta = describe_form(openai, "/v1/audio/transcriptions", form)
    return form_fingerprint("openai", meta.endpoint, meta.canonical)


def form_body(fields: list[tuple[str, str]], audio: bytes, filename: str, boundary: str) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode()
        for n, v in fields
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        "\r\nContent-Type: audio/wav\r\n\r\n".encode()
        + audio
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


FORM_FIELDS = [
    ("model", "gpt-4o-transcribe"),
    ("prompt", "Names: Ada"),
    ("language", "en"),
    ("temperature", "0.2"),
    ("response_format", "json"),
]


@given(
    st.permutations(FORM_FIELDS),
    st.text("abcdef0123456789", min_size=16, max_size=40),
    st.text("abcdefgh", min_size=1, max_size=12),
    st.sampled_from(["stream", "user"]),
)
def test_a_form_is_the_same_whatever_its_boundary_order_and_file_name(
    fields: list[tuple[str, str]], boundary: str, filename: str, transport: str
) -> None:
    """A multipart body's boundary is random per request and its file name may be a temporary
    file's: neither changes the fingerprint, nor does field order or a transport-only field."""
    audio = b"RIFF" + bytes(range(256))
    first = form_fp(form_body(FORM_FIELDS, audio, "hello.wav", "b0"), "b0")
    again = form_body([*fields, (transport, "true")], audio, f"{filename}.wav", boundary)
    assert form_fp(again, boundary) == first


@pytest.mark.parametrize(
    "field,value", [("model", "whisper-1"), ("prompt", "Names: Bo"), ("temperature", "0")]
)
def test_every_form_field_and_the_file_matter(field: str, value: str) -> None:
    audio = b"RIFF" + bytes(range(256))
    first = form_fp(form_body(FORM_FIELDS, audio, "a.wav", "b"), "b")
    changed = [(n, value if n == field else v) for n, v in FORM_FIELDS]
    assert form_fp(form_body(changed, audio, "a.wav", "b"), "b") != first
    assert form_fp(form_body(FORM_FIELDS, audio + b"\0", "a.wav", "b"), "b") != first
