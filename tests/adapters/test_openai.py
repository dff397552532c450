"""The OpenAI adapter on recorded wire shapes: exact usage, however the stream is split."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.adapters.base import Metered, Usage

from ..fakes.provider import fixture

adapter = ADAPTERS["openai"]


def test_openrouter_reported_cost() -> None:
    m = adapter.meter(adapter.describe("/api/v1/chat/completions", None), "application/json")
    m.feed(
        b'{"model":"openai/gpt-4o","usage":{"prompt_tokens":10,"completion_tokens":2,'
        b'"total_tokens":12,"cost":0.00031}}'
    )
    assert m.result() == Metered(
        Usage(input_tokens=10, output_tokens=2, cost_usd=0.00031), "openai/gpt-4o"
    )


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "/chat/completions"),
        ("/v1/completions", "/completions"),
        ("/v1/embeddings", "/embeddings"),
        ("/v1/responses", "/responses"),
        ("/v1/responses/resp_0b8e4d02e3c5/cancel", "/responses/cancel"),
        ("/v1/models/gpt-4o-mini", "/models"),
        ("/openai/v1/chat/completions", "/openai/chat/completions"),
        ("/v1/fine_tuning/jobs/ftjob-abc123/events", "/fine_tuning/jobs/events"),
        ("/", "/"),
    ],
)
def test_endpoint(path: str, endpoint: str) -> None:
    assert adapter.endpoint(path) == endpoint


def test_describe() -> None:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u1",
        "messages": [],
    }
    meta = adapter.describe("/v1/chat/completions", body)
    assert (meta.endpoint, meta.model, meta.stream) == ("/chat/completions", "gpt-4o-mini", True)
    assert meta.canonical == {"model": "gpt-4o-mini", "messages": []}
    assert adapter.describe("/v1/chat/completions", [1, 2]).canonical == [1, 2]
    assert adapter.describe("/v1/chat/completions", {"model": 5}).model is None


@given(
    st.sampled_from(["chat_completion_stream", "completion_stream"]),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_usage_filter_is_the_same_however_split(name: str, cuts: list[int]) -> None:
    """The usage the daemon asked for comes out exactly, wherever the network split the stream."""
    data = fixture("openai", f"{name}_usage.sse")
    f = adapter.hide_stream_usage()
    out = []
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        out.append(f.feed(data[start:cut]))
        start = cut
    out.append(f.end())
    assert b"".join(out) == fixture("openai", f"{name}.sse")


def test_usage_filter_handles_spaced_json_and_crlf() -> None:
    f = adapter.hide_stream_usage()
    stream = (
        b'data: {"id": "x", "usage": null, "choices": [{"delta": {}}]}\r\n\r\n'
        b'data: {"usage" : null}\r\n\r\n'
        b'data: {"id": "x", "choices": [], "usage": {"prompt_tokens": 3}}\r\n\r\n'
        b": comment\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
        b'data: {"cut'
    )
    assert f.feed(stream) + f.end() == (
        b'data: {"id": "x", "choices": [{"delta": {}}]}\r\n\r\n'
        b"data: {}\r\n\r\n"
        b": comment\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
        b'data: {"cut'
    )


@given(st.data())
def test_search_calls_of_a_large_responses_answer_counted_however_split(
    data: st.DataObject,
) -> None:
    """Past what the meter keeps whole, the web and file search calls are counted in the text
    as it passes: every cut, even inside an item's type, counts each call once."""
    searches = data.draw(st.integers(0, 40))
    files = data.draw(st.integers(0, 5))
    # 20 KB reasoning items among the calls: the skeleton passes its budget again and again.
    summary = [{"type": "summary_text", "text": "x" * 20_000}]
    items: list[dict[str, object]] = [{"type": "reasoning", "summary": summary}] * 30
    items += [{"type": "web_search_call", "id": "ws", "status": "completed"}] * searches
    items += [{"type": "file_search_call", "id": "fs", "queries": ["q"]}] * files
    items = data.draw(st.permutations(items))
    usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    body = orjson.dumps({"model": "gpt-4.1", "output": items, "usage": usage})
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    m = adapter.meter(adapter.describe("/v1/responses", None), "application/json")
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        m.feed(body[start:end])
    got = m.result().usage
    assert got is not None
    assert (got.web_searches, got.file_searches) == (searches, files)
