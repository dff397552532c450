"""The SSE parser: the same events however the byte stream is split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import SSEParser

from .fakes.provider import fixture


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[tuple[bytes, bytes]]:
    parser = SSEParser()
    events: list[tuple[bytes, bytes]] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    return events + parser.end()


def test_fields_comments_and_multiline_data() -> None:
    data = (
        b": keep-alive comment\n"
        b"event: message_start\n"
        b"id: 7\n"
        b"retry: 100\n"
        b'data: {"a":\n'
        b"data:1}\n"
        b"\n"
        b"data: second\n\n"
        b"event: lonely\n\n"  # an event with no data is not dispatched
        b"data: unterminated"
    )
    assert parse_in_pieces(data, []) == [
        (b"message_start", b'{"a":\n1}'),
        (b"", b"second"),
    ]


def test_crlf_and_lone_cr_line_endings() -> None:
    lf = b"event: a\ndata: 1\n\ndata: 2\n\n"
    assert parse_in_pieces(lf.replace(b"\n", b"\r\n"), []) == parse_in_pieces(lf, [])
    assert parse_in_pieces(lf.replace(b"\n", b"\r"), []) == parse_in_pieces(lf, [])
    assert parse_in_pieces(lf, []) == [(b"a", b"1"), (b"", b"2")]


RECORDED = [
    fixture("openai", "chat_completion_stream_usage.sse"),
    fixture("openai", "response_stream.sse"),
    "event: x\ndata: ünïcödé — 日本語 🎉\n\n".encode(),
]


@given(
    st.sampled_from(RECORDED),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=7000), max_size=40),
)
def test_split_anywhere_same_events(data: bytes, newline: bytes, cuts: list[int]) -> None:
    """Cuts inside events, inside CRLF pairs and inside multi-byte characters change nothing."""
    data = data.replace(b"\n", newline)
    cuts = [c % (len(data) + 1) for c in cuts]
    assert parse_in_pieces(data, cuts) == parse_in_pieces(data, [])


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    assert parse_in_pieces(data, cuts) == parse_in_pieces(data, [])


def test_an_oversized_line_or_event_is_skipped_and_memory_stays_bounded() -> None:
    import proxy.sse

    limit = proxy.sse.MAX_HELD
    p = SSEParser()
    piece = b"x" * 65536
    # One line that never ends: the parser holds at most the limit, then drops it.
    for _ in range(limit // len(piece) + 2):
        assert p.feed(piece) == []
        assert len(p._buf) + p._held_size <= limit
    # Its end, then a normal event: the oversized one is not returned, the next one is.
    assert p.feed(b"\n\n" + b"data: ok\n\n") == [(b"", b"ok")]
    # The end of a dropped line is not a blank line: the rest of its event goes with it.
    for _ in range(limit // len(piece) + 2):
        p.feed(piece)
    assert p.feed(b"\ndata: same event\n\ndata: next\n\n") == [(b"", b"next")]
    # An event of many data lines past the limit: skipped, the next one parsed.
    big = b"data: " + b"y" * 1_000_000 + b"\n"
    events = []
    for _ in range(limit // len(big) + 2):
        events += p.feed(big)
    events += p.feed(b"\ndata: next\n\n")
    assert events == [(b"", b"next")]


def test_an_event_too_large_to_hold_comes_out_as_its_skeleton() -> None:
    """A Responses terminal event carrying a 20 MB image: the parser never holds more than its
    bound, and the event comes out with the image left out and the usage kept."""
    import orjson

    import proxy.sse

    image = b"A" * 20_000_000
    for newline in (b"\n", b"\r\n", b"\r"):
        p = SSEParser()
        events = p.feed(b"event: response.created" + newline + b'data: {"a":1}' + newline * 2)
        events += p.feed(b"event: response.completed" + newline + b'data: {"response": {"out')
        events += p.feed(b'put": [{"result": "')
        for i in range(0, len(image), 65536):
            events += p.feed(image[i : i + 65536])
            assert len(p._buf) + p._held_size + len(b"".join(p._data)) <= proxy.sse.MAX_HELD
        events += p.feed(b'"}],' + newline + b'data: "usage": {"output_tokens": 7}}}')
        events += p.feed(newline + newline + b"data: [DONE]" + newline + newline) + p.end()
        assert events[0] == (b"response.created", b'{"a":1}')
        assert events[2] == (b"", b"[DONE]")
        assert events[1][0] == b"response.completed"
        assert orjson.loads(events[1][1]) == {
            "response": {"output": [None], "usage": {"output_tokens": 7}}
        }
