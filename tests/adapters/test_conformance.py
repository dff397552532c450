"""Checks every registered adapter must pass, whatever its wire format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.adapters.base import Metered, operation_path

KINDS = sorted(ADAPTERS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [400, 404, 413, 429, 502, 504])
def test_error_body_is_json_carrying_the_message(kind: str, status: int) -> None:
    body = json.loads(ADAPTERS[kind].error_body(status, 'a "quoted" message', "some_code"))
    assert 'a "quoted" message' in json.dumps(body, ensure_ascii=False).replace('\\"', '"')
    assert isinstance(body.get("error"), dict)
    assert body["error"]["message"] == 'a "quoted" message'


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body", [None, [], "text", 3, {"model": ["not", "a", "string"]}, {}])
def test_describe_accepts_any_json(kind: str, body: object) -> None:
    meta = ADAPTERS[kind].describe("/v1/x", body)
    assert meta.endpoint == "/x"
    assert meta.stream is False


@settings(max_examples=50)
@given(
    st.sampled_from(KINDS),
    st.sampled_from(["application/json", "text/event-stream"]),
    st.lists(st.binary(max_size=64), max_size=8),
)
def test_meter_never_raises_on_garbage(kind: str, ctype: str, chunks: list[bytes]) -> None:
    adapter = ADAPTERS[kind]
    m = adapter.meter(adapter.describe("/v1/x", None), ctype)
    for chunk in chunks:
        m.feed(chunk)
    assert isinstance(m.result(), Metered)


@settings(max_examples=50)
@given(
    st.sampled_from(KINDS),
    st.sampled_from(["application/json", "text/event-stream"]),
    st.sampled_from(
        [
            b'{"usage": 5, "model": 7, "usageMetadata": []}',
            b'data: {"usage": {"prompt_tokens": "x"}, "type": []}\n\n',
            b'event: message_start\ndata: {"message": {"usage": null}}\n\n',
            b'event: message_delta\ndata: {"usage": {"output_tokens": -4}}\n\n',
            b'[{"usageMetadata": {"promptTokenCount": 1.5}}]',
        ]
    ),
)
def test_meter_ignores_wrong_types(kind: str, ctype: str, data: bytes) -> None:
    adapter = ADAPTERS[kind]
    m = adapter.meter(adapter.describe("/v1/x", None), ctype)
    m.feed(data)
    result = m.result()
    if result.usage is not None:
        assert min(result.usage.input_tokens, result.usage.output_tokens) >= 0


@pytest.mark.parametrize(
    ("path", "op"),
    [
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "/models:streamGenerateContent"),
        ("/v1/models/gemini-2.0-flash-001:generateContent", "/models:generateContent"),
        ("/v1/messages/count_tokens", "/messages/count_tokens"),
        ("/v1/messages/batches/msgbatch_01abc/results", "/messages/batches/results"),
        ("/2024-06-01/x", "/x"),
        # A token placed after ":" was kept, and logged (fresh attack review): only a method
        # that looks like one is.
        ("/v1beta/models/gemini-pro:CANARYSECRET9f3z", "/models"),
        ("/v1beta/models/x:generateContent9", "/models/x"),
        ("/v1beta/models/gemini-pro:countTokens", "/models:countTokens"),
    ],
)
def test_operation_path(path: str, op: str) -> None:
    assert operation_path(path) == op


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("openai", "/v1/moderations"),
        ("openai", "/v1/responses/input_tokens"),
        ("openai", "/v1/files"),
        ("openai", "/v1/uploads/upload_abc123/parts"),
        ("openai", "/v1/containers/cntr_682e0e7318108198aa783fd921ff305e08e78805b9fdbb04/files"),
        ("anthropic", "/v1/files"),
        ("anthropic", "/v1/messages/count_tokens"),
        ("gemini", "/v1beta/models/gemini-2.0-flash:countTokens"),
    ],
)
def test_free_endpoints_are_what_the_real_paths_name(kind: str, path: str) -> None:
    # The loop detector skips these: each must be the endpoint its real path gives.
    adapter = ADAPTERS[kind]
    assert adapter.endpoint(path) in adapter.free_endpoints
