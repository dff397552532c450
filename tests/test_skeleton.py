"""The JSON skeleton (``proxy.skeleton``): a document's small values, read in bounded memory
however the bytes were split."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.skeleton import BUDGET, HARD, VALUE_MAX, Skeleton


def skeleton(data: bytes, cuts: list[int] | None = None) -> Any:
    s = Skeleton()
    start = 0
    for cut in sorted(set(cuts or [])) + [len(data)]:
        s.feed(data[start:cut])
        start = cut
    out = s.result()
    return None if out is None else orjson.loads(out)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(JSON, st.booleans(), st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_a_small_document_is_kept_whole_however_split(
    doc: Any, indent: bool, cuts: list[int]
) -> None:
    data = json.dumps(doc, indent=2 if indent else None, ensure_ascii=False).encode()
    assert skeleton(data, [c % (len(data) + 1) for c in cuts]) == orjson.loads(data)


def raw(data: bytes, cuts: list[int]) -> bytes | None:
    s = Skeleton()
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        s.feed(data[start:cut])
        start = cut
    return s.result()


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_arbitrary_bytes_never_raise_and_cuts_change_nothing(data: bytes, cuts: list[int]) -> None:
    # (Scalars are not checked until parsed: a skeleton of bytes that are not JSON may not be.)
    assert raw(data, cuts) == raw(data, [])


def test_escapes_cut_anywhere() -> None:
    doc = {'a\\"\\\\': ['\\\\"x"\\', '"', "\\", '\\"' * 50], "b": "é\n\u2028"}
    data = json.dumps(doc).encode()
    for a in range(len(data) + 1):
        for b in range(a, min(a + 7, len(data) + 1)):
            assert skeleton(data, [a, b]) == doc


def test_not_json_or_unfinished_has_no_skeleton() -> None:
    for data in (b"", b"<html>", b'{"a" 1}', b'{"a": 1', b'{"a": 1}}', b"[1,]", b'{"a": tru'):
        assert skeleton(data) is None, data


def test_big_values_are_left_out_and_small_ones_kept_wherever_they_are() -> None:
    image = "A" * (VALUE_MAX + 1)
    doc = {
        "usage": {"prompt_tokens": 3, "details": {"cached_tokens": [1, 2]}},
        "output": [{"type": "image", "result": image, "id": "i1"}],
        image: 1,
        "response": {"output": [{"content": [{"text": image}]}], "usage": {"out": 7}},
        "model": "m",
    }
    assert skeleton(json.dumps(doc).encode(), [5, 1000, 70000]) == {
        "usage": {"prompt_tokens": 3, "details": {"cached_tokens": [1, 2]}},
        "output": [{"type": "image", "result": None, "id": "i1"}],
        "": 1,
        # (level 4, the items of response.output: whole or nothing)
        "response": {"output": [None], "usage": {"out": 7}},
        "model": "m",
    }


def test_a_long_array_keeps_its_first_and_latest_elements() -> None:
    item = {"index": 0, "embedding": "x" * 1000}
    n = 5 * BUDGET // 1000
    data = (
        b'{"data":['
        + b",".join(orjson.dumps({**item, "index": i}) for i in range(n))
        + b'],"usage":{"prompt_tokens":9}}'
    )
    s = Skeleton()
    most = 0
    for i in range(0, len(data), 4096):
        s.feed(data[i : i + 4096])
        most = max(most, len(s._out))
    assert most <= BUDGET + 2 * 1024
    out = s.result()
    assert out is not None
    doc = orjson.loads(out)
    assert doc["usage"] == {"prompt_tokens": 9}
    indexes = [d["index"] for d in doc["data"]]
    assert indexes[0] == 0 and indexes[-1] == n - 1 and indexes == sorted(indexes)


def test_a_hostile_shape_has_no_skeleton_and_holds_little() -> None:
    s = Skeleton()
    s.feed(b"[")
    for _ in range(200):
        s.feed(b"{}," * 10_000)
        assert len(s._out) <= HARD
    s.feed(b"{}]")
    assert s.failed and s.result() is None
