"""The adapter interface: what the relay needs to know about one provider's wire format.

Adapters are sans-IO. ``relay.py`` owns sockets, streaming, timeouts and recording; an adapter is a
set of pure functions over bytes and dicts:

- ``endpoint(path)``: the operation a request path names, without version prefix or ids
  (``/v1/chat/completions`` -> ``/chat/completions``);
- ``describe(path, body)``: the request's ``RequestMeta`` (endpoint, model, stream flag, and the
  canonical body the fingerprint is computed from);
- ``with_stream_usage(meta, body)``: where a stream reports usage only when asked, the body that
  asks for it (else None), and ``hide_stream_usage()``, the filter that takes what was asked for
  back out of the client's stream;
- ``meter(meta, content_type)``: a fresh ``Meter`` that is fed the (decoded) response body chunk by
  chunk as it passes and then says what usage it saw;
- ``error_body(status, message, code)``: an error in the provider's own JSON shape, so an SDK raises
  the exception it would raise for the provider itself; ``code`` is the daemon's short reason
  (``upstream_timeout``, ``body_too_large``, ...);
- ``tool_uses(endpoint, body, last, skip)``: the last ``last`` tool calls of a request's
  conversation that carry their result (``ToolUse``, oldest first; calls named in ``skip``, a
  ``ToolNames`` or None, left out), read from the body already parsed for the fingerprint
  (``RecentToolCalls``); ``[]`` for an endpoint that holds no conversation (the agent-loop
  detector).

``Usage`` counts follow the event schema: ``input_tokens`` includes cached and cache-write tokens,
``output_tokens`` includes reasoning tokens; the breakdowns are kept for pricing.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import orjson

from ..skeleton import BUDGET, Skeleton
from ..sse import SSEParser
from ..text import inert


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # of cache_write_tokens, those kept for an hour (Anthropic)
    reasoning_tokens: int = 0
    # Of input_tokens, those of another modality (priced at their own rates where the model has
    # them, else at the text rate): audio, images (and documents, which Gemini bills as images),
    # video; of cached_input_tokens, the cached ones of each. Each modality's count includes its
    # cached tokens, as OpenAI (realtime) and Gemini report them.
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    input_video_tokens: int = 0
    cached_audio_tokens: int = 0
    cached_image_tokens: int = 0
    cached_video_tokens: int = 0
    # Of output_tokens, the audio and image ones.
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    # Fees per call of a provider-run tool: web searches (Anthropic ``server_tool_use``, OpenAI
    # ``web_search_call`` items), file searches (OpenAI ``file_search_call`` items).
    web_searches: int = 0
    file_searches: int = 0
    # Audio billed by its length (Whisper's ``usage: {"type": "duration", "seconds": N}``), ms.
    audio_ms: int = 0
    # The price the provider itself reported for this request (OpenRouter's ``usage.cost``).
    cost_usd: float | None = None
    # The service tier the provider says served the request (priced differently: flex, priority).
    service_tier: str | None = None


class UsageSource(StrEnum):
    """How an event's token numbers were obtained (kept in the local store only)."""

    REPORTED = "reported"  # the provider reported usage in the response the client asked for
    REQUESTED = "requested"  # the daemon asked for stream usage the client did not ask for
    PARTIAL = "partial"  # an answer began but was cut (client gone, upstream cut) before its usage
    MISSING = "missing"  # the answer ended normally but carried no usage
    # No answer was metered: a guardrail refusal, an error the daemon made before any answer
    # (502, 504, 413), a client that left before any answer (499). Its tokens are 0 because
    # nothing was counted, not because a provider said so.
    NONE = "none"


@dataclass(frozen=True, slots=True)
class RequestMeta:
    endpoint: str
    model: str | None
    stream: bool
    # The request body without transport-only fields, as parsed JSON; None when the body is not
    # JSON (the fingerprint then covers the raw bytes).
    canonical: Any


@dataclass(slots=True)  # built per request: see Event for why it is not frozen
class Metered:
    usage: Usage | None
    model: str | None  # the model the response names, if the meter saw one
    # False when the usage is a running count from a stream that ended before its final count
    # (an Anthropic stream cut after message_start): recorded, but marked partial.
    final: bool = True


# One tool call of a conversation and its result: (tool name, arguments, result), each as the wire
# format has it (arguments a JSON text or an object; a result that is text as one ``str``, else
# its JSON value). The agent-loop detector compares arguments and results as canonical JSON.
ToolUse = tuple[str, Any, Any]


class ToolNames:
    """A set of tool names (``exempt_tools``): exact names, and patterns with ``*`` and ``?``
    (``transfer_to_*``), matched like shell globs; ``name in names``."""

    __slots__ = ("exact", "_pattern")

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self.exact = frozenset(n for n in names if not _GLOB.search(n))
        globs = sorted(n for n in names if _GLOB.search(n))
        self._pattern = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    def __contains__(self, name: object) -> bool:
        if name in self.exact:
            return True
        return self._pattern is not None and type(name) is str and bool(self._pattern.match(name))

    def __bool__(self) -> bool:
        return bool(self.exact) or self._pattern is not None


_GLOB = re.compile(r"[*?\[]")


class Meter(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> Metered: ...

    def abandon(self) -> None:
        """No more of the body will be fed (it could not be decoded within its bound): let go
        of what is held for it; ``result`` says only what was already seen."""


class StreamFilter(Protocol):
    """Rewrites a response body on its way to the client: bytes in, bytes out, as they pass."""

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class Adapter(Protocol):
    kind: ClassVar[str]
    # Endpoints that cost nothing (counting tokens, moderation): never a loop to stop.
    free_endpoints: ClassVar[frozenset[str]]

    def endpoint(self, path: str) -> str: ...

    def describe(self, path: str, body: Any) -> RequestMeta: ...

    def with_stream_usage(self, meta: RequestMeta, body: Any) -> Any | None: ...

    def hide_stream_usage(self) -> StreamFilter: ...

    def meter(self, meta: RequestMeta, content_type: str) -> Meter: ...

    def error_body(self, status: int, message: str, code: str) -> bytes: ...

    def tool_uses(
        self, endpoint: str, body: Any, last: int, skip: ToolNames | None = None
    ) -> list[ToolUse]: ...


class UsageInStream:
    """For wire formats whose streams always carry usage: nothing to ask for, nothing to hide."""

    def with_stream_usage(self, meta: RequestMeta, body: Any) -> Any | None:
        return None

    def hide_stream_usage(self) -> StreamFilter:
        raise NotImplementedError("this wire format never asks for stream usage")


# --------------------------------------------------------------------------- shared helpers

_VERSION = re.compile(r"^(v\d+[a-z0-9]*|\d{4}-\d{2}-\d{2})$")
_WORD = re.compile(r"^[a-z_.]+$")
# A method after ":" (Gemini's generateContent, countTokens): camelCase letters, no digits.
_METHOD = re.compile(r"[a-z][A-Za-z]{0,63}")


def operation_path(path: str) -> str:
    """The operation a path names: version segments and id-like segments removed.

    ``/v1/chat/completions`` -> ``/chat/completions``; ``/v1/responses/resp_123/cancel`` ->
    ``/responses/cancel``; a segment ``name:method`` keeps only ``:method``, glued to the segment
    before it (``/v1beta/models/gemini-2.0-flash:generateContent`` -> ``/models:generateContent``),
    and only a method that looks like one (camelCase letters: ``x:CANARY9f3z`` keeps nothing).
    The client chose the path (up to 16 KiB of it): the result is ``inert``, at most 256
    characters.
    """
    out: list[str] = []
    for seg in path.split("/"):
        if not seg or _VERSION.match(seg):
            continue
        name, colon, method = seg.partition(":")
        if _WORD.match(name):
            out.append(name)
        if colon and _METHOD.fullmatch(method):
            if out:
                out[-1] += ":" + method
            else:
                out.append(":" + method)
    return inert("/" + "/".join(out))


def without_keys(body: Any, drop: frozenset[str]) -> Any:
    """``body`` with the top-level keys in ``drop`` removed (bodies that are not objects as-is)."""
    if isinstance(body, dict) and not drop.isdisjoint(body):
        return {k: v for k, v in body.items() if k not in drop}
    return body


def as_int(value: Any) -> int:
    """A token count from a usage object; anything that is not a non-negative int counts 0."""
    return value if type(value) is int and value > 0 else 0


# A JSON document is parsed only if it holds at most this many values, counted (cheaply, before
# parsing) as its "{", "[" and "," bytes: parsed, a document of tiny values ("{},{},...") takes
# about 25 times its size in Python objects (a 4 MiB one, 100 MB, and 50 ms of the event loop).
# Real bodies hold a few values per KiB of text: a 1 MiB agent conversation some thousands.
MAX_JSON_VALUES = 1 << 18
# A document shorter than this cannot hold more values (each takes two bytes or more).
_DENSE_FROM = 2 * MAX_JSON_VALUES


# A JSON string (possessive: linear time on any input).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')


def _dense(data: bytes) -> bool:
    """Whether a document that ``json_values`` counts over the bound really holds that many
    values: its strings may hold the commas (a CSV file in a tool result). Many strings are
    many values already (counted by their quotes, those escaped inside strings left out: a
    quoted CSV or a JSON text in a tool result); a few long ones are taken out (a regular
    expression, C speed: about 7 ms per MB) and the rest counted again."""
    quotes = data.count(b'"') - data.count(b'\\"') + data.count(b'\\\\"')
    if quotes // 2 > MAX_JSON_VALUES:
        return True
    return json_values(_STRING.sub(b'""', data)) > MAX_JSON_VALUES


def json_values(data: bytes) -> int:
    """About how many values a JSON document holds (an upper bound: commas in strings count).
    One pass over the bytes (``translate`` drops the three, C speed): two thirds of the time of
    three ``count`` passes (0.9 against 1.4 ms for a 1 MB agent conversation)."""
    return len(data) - len(data.translate(None, b"{[,"))


def loads(data: bytes) -> Any:
    """Parse JSON, or None when it is not JSON (a meter never raises on a provider's bytes) or
    holds more than ``MAX_JSON_VALUES`` values (it is then not parsed at all)."""
    if len(data) > _DENSE_FROM and json_values(data) > MAX_JSON_VALUES and _dense(data):
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


TAIL = 64 * 1024  # bytes of a document's end searched by ``tail_members``


def tail_members(data: bytes, keys: tuple[str, ...]) -> dict[str, Any]:
    """The members ``keys`` found in the last ``TAIL`` bytes of a JSON object too large (or too
    dense) to parse whole: for each key its last ``"key": value`` there, the value parsed on its
    own (an object or array by matching brackets, a string, a number or a literal). Answers put
    their usage and model at the end (OpenAI, Gemini; Anthropic its usage): enough to price one
    whose body is not kept. Keys not found are left out."""
    tail = data[-TAIL:]
    found: dict[str, Any] = {}
    for key in keys:
        needle = b'"' + key.encode() + b'"'
        at = tail.rfind(needle)
        while at >= 0:
            value = _value_after(tail, at + len(needle))
            if value is not _NONE:
                found[key] = value
                break
            at = tail.rfind(needle, 0, at)
    return found


_NONE = object()


def _value_after(data: bytes, i: int) -> Any:
    """The JSON value after ``i`` (which must be followed by optional spaces and a colon), or
    ``_NONE``."""
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or data[i] != 58:  # ":"
        return _NONE
    i += 1
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n:
        return _NONE
    start, first = i, data[i]
    if first in b"{[":
        depth, in_string = 0, False
        while i < n:
            c = data[i]
            if in_string:
                if c == 92:  # a backslash: skip what it escapes
                    i += 1
                elif c == 34:
                    in_string = False
            elif c == 34:
                in_string = True
            elif c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        end = i + 1
    elif first == 34:
        i += 1
        while i < n and data[i] != 34:
            i += 2 if data[i] == 92 else 1
        end = i + 1
    else:
        while i < n and data[i] not in b",}] \t\r\n":
            i += 1
        end = i
    try:
        return orjson.loads(data[start:end])
    except orjson.JSONDecodeError:
        return _NONE


class JSONMeter:
    """Reads usage from a JSON response body as it passes, in bounded memory.

    ``read`` maps the parsed body (any JSON value but null) to ``Metered``; it is the only
    provider-specific part. A body of at most ``WHOLE`` bytes is kept and parsed whole (the
    common case: one parse in C). A larger one is not kept: from then on it is read into its
    ``Skeleton`` (``proxy.skeleton``: the same document with its big values left out, its small
    ones, the usage among them, wherever they are), and ``read`` gets that. Only a document with
    no skeleton (not JSON, or a hostile shape) falls back to its last ``TAIL`` bytes, where
    ``read`` gets the members ``tail_keys`` found there (``tail_members``). Memory per answer:
    ``WHOLE``, then the skeleton's ``HARD`` bound and the tail, whatever the answer's size.
    """

    __slots__ = ("_chunks", "_size", "_read", "_tail_keys", "_skeleton", "_tail")

    WHOLE = BUDGET  # bytes of a body kept whole and parsed at the end

    def __init__(self, read: Any, tail_keys: tuple[str, ...] = ()) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._read = read
        self._tail_keys = tail_keys
        self._skeleton: Skeleton | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        skeleton = self._skeleton
        if skeleton is None:
            if self._size <= self.WHOLE:
                self._chunks.append(chunk)
                return
            # Past what is kept whole: what was kept goes into the skeleton, and so does the rest.
            skeleton = self._skeleton = Skeleton()
            for held in self._chunks:
                skeleton.feed(held)
            self._tail = b"".join(self._chunks)[-TAIL:]
            self._chunks = []
        skeleton.feed(chunk)
        if self._tail_keys:
            self._tail = (self._tail + chunk)[-TAIL:] if len(chunk) < TAIL else chunk[-TAIL:]

    def abandon(self) -> None:
        # An unfinished document says nothing.
        self._chunks, self._skeleton, self._tail = [], None, b""

    def result(self) -> Metered:
        body: Any = None
        if self._skeleton is None:
            if self._chunks:
                body = loads(b"".join(self._chunks))
        else:
            skeleton = self._skeleton.result()
            if skeleton is not None:
                body = loads(skeleton)
            elif self._tail_keys and self._tail:
                body = tail_members(self._tail, self._tail_keys) or None
        if body is None:
            return Metered(None, None)
        result: Metered = self._read(body)
        return result


class SSEMeter(ABC):
    """Parses a Server-Sent Events body and hands each complete event to ``on_event``."""

    __slots__ = ("_parser",)
    _parser: SSEParser

    def __init__(self) -> None:
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> None:
        for event, data in self._parser.feed(chunk):
            self.on_event(event, data)

    def abandon(self) -> None:
        self._parser = SSEParser()  # the events seen so far stay counted; their bytes go

    def result(self) -> Metered:
        for event, data in self._parser.end():
            self.on_event(event, data)
        return self.summary()

    @abstractmethod
    def on_event(self, event: bytes, data: bytes) -> None:
        """One complete event: its ``event:`` name (b"" when absent) and its joined ``data:``."""

    @abstractmethod
    def summary(self) -> Metered:
        """What the events seen so far say."""


class RecentToolCalls:
    """The last answered tool calls of a conversation, read from its end (where a loop is): a
    reader walks the conversation backwards, telling ``result`` of each result it meets and then
    ``call`` of each call (a result comes after its call, so walking back it is met first), and
    stops once ``call`` says enough were found.

    A call is paired by ``key``: its id (a reader that pairs by name passes a tuple made of the
    name). A call takes the first result met after it that names its key; the calls of one
    turn that share a key take that turn's results in order. So an id used again in every turn
    (servers that number calls ``call_0``, ``call_1`` in each turn) pairs turn by turn, and
    calls and results without an id (``None`` or ``""``: some OpenAI-compatible servers) pair
    by their position. A call without a result, or one named in ``skip`` (exempt: it takes no
    place among the last ``last``), is passed over."""

    __slots__ = ("found", "last", "skip", "_results", "_more")

    def __init__(self, last: int, skip: ToolNames | None) -> None:
        self.found: list[ToolUse] = []  # newest first
        self.last = last
        self.skip = skip  # None: none
        # key -> the newest result met that no call took yet; older ones of the same key wait
        # in _more, newest first (almost every key is met once: no list for it).
        self._results: dict[Any, Any] = {}
        self._more: dict[Any, list[Any]] = {}

    def result(self, key: Any, value: Any) -> None:
        if type(key) is not str or not key:
            if not key:
                key = _NO_ID
            elif type(key) is not tuple:
                return
        if key in self._results:
            self._more.setdefault(key, []).append(value)
        else:
            self._results[key] = value

    def waiting(self, key: Any) -> bool:
        """Whether a result met so far names ``key`` and has no call yet."""
        return (key or _NO_ID) in self._results

    def call(self, name: Any, arguments: Any, key: Any) -> bool:
        """One call met walking back; True once ``last`` answered calls were found."""
        if type(key) is not str or not key:
            if not key:
                key = _NO_ID
            elif type(key) is not tuple:
                return False
        # The calls of one turn are met last first, and its results too: the last call takes
        # the last result. Results of one key never wait across turns (each turn's calls take
        # its results), so the newest one waiting belongs to this turn.
        result = self._results.pop(key, _NONE)
        if result is _NONE:
            return False
        if self._more:  # (almost always empty: each key met once)
            more = self._more.get(key)
            if more:
                self._results[key] = more.pop(0)
        if type(name) is not str or (self.skip is not None and name in self.skip):
            return False
        self.found.append((name, arguments, result))
        return len(self.found) >= self.last

    def answered(self) -> list[ToolUse]:
        """The calls found, oldest first."""
        self.found.reverse()
        return self.found


_NO_ID = ("no id",)


def text_or_value(content: Any, text_types: frozenset[str]) -> Any:
    """A tool result as the agent-loop detector compares it: a string as it is; a list of text
    blocks (``{"type": t, "text": ...}`` with ``t`` in ``text_types``) as the one string they
    make, so that the same text sent either way is the same result; anything else as it is."""
    if isinstance(content, list) and content:
        texts = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") in text_types):
                return content
            text = block.get("text")
            if not isinstance(text, str):
                return content
            texts.append(text)
        return "".join(texts)
    return content


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def usage_field(obj: Any, *keys: str) -> int:
    """``obj[k1][k2]...`` as a token count; 0 where any level is missing or not a count."""
    for key in keys:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    return as_int(obj)
