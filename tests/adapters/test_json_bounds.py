"""JSON bodies are parsed only within bounds (``adapters.base``): a dense document is not parsed,
and the usage of an answer too large or too dense to parse is read from its end."""

from __future__ import annotations

import json

from proxy.adapters import ADAPTERS
from proxy.adapters.base import MAX_JSON_VALUES, RequestMeta, loads, tail_members


def test_a_dense_document_is_not_parsed_but_a_long_text_is() -> None:
    dense = b"[" + b"{}," * (MAX_JSON_VALUES + 1) + b"{}]"
    assert loads(dense) is None
    text = json.dumps({"messages": [{"role": "user", "content": "word " * 1_000_000}]}).encode()
    assert len(text) > 4_000_000 and loads(text) is not None


def test_commas_inside_strings_are_not_values() -> None:
    # A tool result that is a CSV file: 400,000 commas, all inside one string.
    csv = "id,name,qty,price\n" + "17,widget,3,9.99\n" * 100_000
    body = json.dumps({"messages": [{"role": "tool", "tool_call_id": "c1", "content": csv}]})
    assert body.count(",") > MAX_JSON_VALUES and loads(body.encode()) is not None
    # A quoted CSV (or a JSON text) in a tool result: its quotes are escaped, not strings.
    quoted = "\n".join(",".join(f'"f{i}"' for i in range(10)) for _ in range(30_000))
    body = json.dumps({"messages": [{"role": "tool", "tool_call_id": "c1", "content": quoted}]})
    assert body.count('"') > 2 * MAX_JSON_VALUES and loads(body.encode()) is not None
    # Many short strings are many values: still not parsed.
    strings = b"[" + b'"a,b",' * (MAX_JSON_VALUES + 1) + b'""]'
    assert loads(strings) is None
    # Few strings, but dense outside them: not parsed.
    mixed = b'["' + b"," * MAX_JSON_VALUES + b'",' + b"[]," * (MAX_JSON_VALUES + 1) + b"[]]"
    assert loads(mixed) is None


def test_members_are_read_from_the_end() -> None:
    data = (
        b'{"object":"list","data":[' + b"0.125," * 100_000 + b'0.5],"model":"text-embedding-3'
        b'-small","usage" : {"prompt_tokens": 8, "total_tokens": 8, "note": "a } and \\" in"}}'
    )
    assert tail_members(data, ("usage", "model", "absent")) == {
        "usage": {"prompt_tokens": 8, "total_tokens": 8, "note": 'a } and " in'},
        "model": "text-embedding-3-small",
    }
    # A key quoted inside a string is not a member.
    assert tail_members(b'{"text": "say \\"usage\\": {}", "usage": {"a": 1}}', ("usage",)) == {
        "usage": {"a": 1}
    }


def test_an_embeddings_answer_too_large_to_keep_is_still_metered() -> None:
    """2,048 embeddings of 1,536 dimensions: about 40 MB of JSON, none of it held whole."""
    meta = RequestMeta("/embeddings", "text-embedding-3-small", False, None)
    meter = ADAPTERS["openai"].meter(meta, "application/json")
    vector = b"[" + b"0.0123456," * 1535 + b"0.5]"
    meter.feed(b'{"object":"list","data":[')
    for i in range(2048):
        meter.feed(b'{"object":"embedding","index":%d,"embedding":%s},' % (i, vector))
    meter.feed(
        b'{"index":2048,"embedding":[0.1]}],"model":"text-embedding-3-small",'
        b'"usage":{"prompt_tokens":16384,"total_tokens":16384}}'
    )
    metered = meter.result()
    assert metered.usage is not None and metered.usage.input_tokens == 16384
    assert metered.model == "text-embedding-3-small"
