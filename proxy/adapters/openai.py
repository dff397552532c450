"""OpenAI's wire format: chat completions, completions, embeddings, the Responses API, and every
other path relayed as-is. Also the format of every OpenAI-compatible host (``kind = "openai"``).

Usage lives in ``usage``: ``prompt_tokens``/``completion_tokens`` (chat, completions, embeddings) or
``input_tokens``/``output_tokens`` (Responses API), with cached input and reasoning output in the
``*_details`` objects (DeepSeek also says ``prompt_cache_hit_tokens``; Groq's older streams put
usage in ``x_groq.usage``; OpenRouter adds its own price as ``usage.cost``). The response's
``service_tier`` says which price list applies (flex and priority are priced differently).

A chat or completion stream carries usage only when the request asked for
``stream_options.include_usage``: then every chunk has ``"usage":null`` and one extra chunk with
``"choices":[]`` carries the usage. When the client did not ask, the daemon asks for it
(``with_stream_usage``) and ``UsageChunkFilter`` takes both traces out of what the client sees. A
Responses stream carries usage in its terminal ``response.completed`` / ``response.incomplete`` /
``response.failed`` event, so nothing is asked for there.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from functools import lru_cache
from typing import Any, ClassVar

import orjson

from .base import (
    JSONMeter,
    Meter,
    Metered,
    RecentToolCalls,
    RequestMeta,
    SSEMeter,
    StreamFilter,
    ToolNames,
    ToolUse,
    Usage,
    as_int,
    loads,
    operation_path,
    str_or_none,
    text_or_value,
    usage_field,
    without_keys,
)

# Fields that change how an answer is delivered or attributed, not what is asked.
TRANSPORT_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "background",
    }
)

# Streams that report usage only when asked to.
USAGE_ON_REQUEST = frozenset({"/chat/completions", "/completions"})

_RESPONSES_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def read_usage(usage: Any, service_tier: Any = None, output: Any = None) -> Usage | None:
    """A ``Usage`` from any usage dialect, or None when ``usage`` is not a usage object.

    ``input_tokens`` (Responses, Images, transcriptions, realtime ``response.done``): the input
    details are ``input_tokens_details`` or, in realtime and transcriptions,
    ``input_token_details`` (with ``cached_tokens_details`` by modality); ``prompt_tokens``
    (chat, completions, embeddings); ``{"type": "duration", "seconds": N}`` (whisper-1, billed
    by the minute). ``output`` is a Responses answer's ``output`` items: its ``web_search_call``
    and ``file_search_call`` items are billed per call."""
    if not isinstance(usage, dict):
        return None
    cost = usage.get("cost")
    reported_cost = None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
        reported_cost = float(cost)
    tier = str_or_none(service_tier)
    if "input_tokens" in usage:
        details = usage.get("input_tokens_details") or usage.get("input_token_details")
        out = usage.get("output_tokens_details") or usage.get("output_token_details")
        web, files = _tool_calls(output)
        return Usage(
            input_tokens=as_int(usage.get("input_tokens")),
            output_tokens=as_int(usage.get("output_tokens")),
            cached_input_tokens=usage_field(details, "cached_tokens"),
            reasoning_tokens=usage_field(out, "reasoning_tokens"),
            input_audio_tokens=usage_field(details, "audio_tokens"),
            input_image_tokens=usage_field(details, "image_tokens"),
            cached_audio_tokens=usage_field(details, "cached_tokens_details", "audio_tokens"),
            cached_image_tokens=usage_field(details, "cached_tokens_details", "image_tokens"),
            output_audio_tokens=usage_field(out, "audio_tokens"),
            output_image_tokens=usage_field(out, "image_tokens"),
            web_searches=web,
            file_searches=files,
            cost_usd=reported_cost,
            service_tier=tier,
        )
    if "prompt_tokens" in usage:
        cached = usage_field(usage, "prompt_tokens_details", "cached_tokens")
        return Usage(
            input_tokens=as_int(usage.get("prompt_tokens")),
            output_tokens=as_int(usage.get("completion_tokens")),
            cached_input_tokens=cached or as_int(usage.get("prompt_cache_hit_tokens")),
            reasoning_tokens=usage_field(usage, "completion_tokens_details", "reasoning_tokens"),
            input_audio_tokens=usage_field(usage, "prompt_tokens_details", "audio_tokens"),
            output_audio_tokens=usage_field(usage, "completion_tokens_details", "audio_tokens"),
            cost_usd=reported_cost,
            service_tier=tier,
        )
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return Usage(audio_ms=round(seconds * 1000), cost_usd=reported_cost)
    return None


def _tool_calls(output: Any) -> tuple[int, int]:
    """(web searches, file searches) among a Responses answer's output items."""
    web = files = 0
    if type(output) is list:
        for item in output:
            if type(item) is dict:
                kind = item.get("type")
                if kind == "web_search_call":
                    web += 1
                elif kind == "file_search_call":
                    files += 1
    return web, files


# A Responses answer's billed tool calls, as their item type is written in its JSON text (quotes
# inside strings are escaped, so these bytes occur only as a string of the document itself).
_WEB_CALL = b'"web_search_call"'
_FILE_CALL = b'"file_search_call"'


class _Tokens:
    """How often ``token`` occurs in a text fed in pieces however split (one ``bytes.count`` in
    C per piece, plus the few bytes around each cut)."""

    __slots__ = ("token", "n", "_carry")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.n = 0
        self._carry = b""  # the last len(token) - 1 bytes fed

    def feed(self, chunk: bytes) -> None:
        k = len(self.token) - 1
        self.n += chunk.count(self.token) + (self._carry + chunk[:k]).count(self.token)
        self._carry = (self._carry + chunk[-k:])[-k:]


def _with_calls(usage: Usage | None, web: int, files: int) -> Usage | None:
    """``usage`` billing at least ``web`` web and ``files`` file search calls."""
    if usage is None or (web <= usage.web_searches and files <= usage.file_searches):
        return usage
    return replace(
        usage,
        web_searches=max(web, usage.web_searches),
        file_searches=max(files, usage.file_searches),
    )


class ResponsesJSONMeter(JSONMeter):
    """A Responses answer: as ``JSONMeter``, and its web and file search calls counted in its
    text as it passes. An answer too large to keep whole is read into its skeleton, which keeps
    only the first and latest items of a long ``output`` (a deep-research answer: hundreds of
    searches): the calls in between are billed all the same."""

    __slots__ = ("_web", "_files")

    def __init__(self) -> None:
        super().__init__(_read_body, tail_keys=("usage", "service_tier", "model"))
        self._web = _Tokens(_WEB_CALL)
        self._files = _Tokens(_FILE_CALL)

    def feed(self, chunk: bytes) -> None:
        super().feed(chunk)
        self._web.feed(chunk)
        self._files.feed(chunk)

    def result(self) -> Metered:
        metered = super().result()
        usage = _with_calls(metered.usage, self._web.n, self._files.n)
        return metered if usage is metered.usage else replace(metered, usage=usage)


def _read_body(body: Any) -> Metered:
    if not isinstance(body, dict):
        return Metered(None, None)
    return Metered(
        read_usage(body.get("usage"), body.get("service_tier"), body.get("output")),
        str_or_none(body.get("model")),
    )


def _chunk_usage(obj: dict[str, Any]) -> Usage | None:
    usage = obj.get("usage")
    if usage is None:
        groq = obj.get("x_groq")
        usage = groq.get("usage") if isinstance(groq, dict) else None
    return read_usage(usage, obj.get("service_tier"))


class ChatStreamMeter(SSEMeter):
    """Chat-completion and completion chunks: the usage chunk, and the model of the first chunk."""

    __slots__ = ("usage", "model")

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None

    def feed(self, chunk: bytes) -> None:
        # Fast path: once the model is known, a chunk of whole events with no usage object in it
        # has nothing to say; most chunks are exactly that, so most are not parsed at all.
        if (
            self.model is not None
            and chunk.endswith(b"\n\n")
            and self._parser.idle()
            and b'"usage":{' not in chunk
            and b'"usage": {' not in chunk
            and b"x_groq" not in chunk
        ):
            return
        super().feed(chunk)

    def on_event(self, event: bytes, data: bytes) -> None:
        want_model = self.model is None
        has_usage = b'"usage"' in data and b'"usage":null' not in data
        if not (want_model or has_usage) or data == b"[DONE]":
            return
        obj = loads(data)
        if not isinstance(obj, dict):
            return
        if want_model:
            self.model = str_or_none(obj.get("model"))
        if has_usage:
            usage = _chunk_usage(obj)
            if usage is not None:
                self.usage = usage

    def summary(self) -> Metered:
        return Metered(self.usage, self.model)


class ResponsesStreamMeter(SSEMeter):
    """Responses API events: usage and model from the terminal ``response.*`` event; the web and
    file search calls also from each ``response.output_item.done`` (a terminal event too large
    to read whole keeps only the first and latest items of its ``output``)."""

    __slots__ = ("usage", "model", "web", "files")

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None
        self.web = 0  # web search calls done
        self.files = 0  # file search calls done

    def on_event(self, event: bytes, data: bytes) -> None:
        if (event == b"response.output_item.done" or not event) and (
            _WEB_CALL in data or _FILE_CALL in data
        ):
            obj = loads(data)
            if type(obj) is dict and obj.get("type") == "response.output_item.done":
                web, files = _tool_calls([obj.get("item")])
                self.web += web
                self.files += files
                return
        wanted = (
            event in _RESPONSES_TERMINAL
            or (not event and b'"usage":{' in data)  # a host that sends no event names
            or (self.model is None and b'"model"' in data)
        )
        if not wanted:
            return
        obj = loads(data)
        response = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(response, dict):
            return
        self.model = str_or_none(response.get("model")) or self.model
        usage = read_usage(
            response.get("usage"), response.get("service_tier"), response.get("output")
        )
        if usage is not None:
            self.usage = usage

    def summary(self) -> Metered:
        return Metered(_with_calls(self.usage, self.web, self.files), self.model)


log = logging.getLogger(__name__)

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")
# "usage":null as a member: first (with the comma after it), later (with the comma before it), or
# alone. JSON escapes quotes inside strings, so these bytes cannot occur inside a string value.
_USAGE_NULL = re.compile(
    rb'\s*"usage"\s*:\s*null\s*,|,\s*"usage"\s*:\s*null|(?<=\{)\s*"usage"\s*:\s*null\s*(?=\})'
)


class UsageChunkFilter:
    """Takes the usage the daemon asked for out of a chat/completion stream, so the client gets
    the stream it asked for: the usage-only chunk is dropped and ``"usage":null`` removed from
    every other chunk. Works on whole events (a partial event is held until its blank line, and
    flushed as-is if the stream ends inside it); everything else passes byte for byte. A partial
    event over ``MAX_HELD`` bytes (no chat chunk is anywhere near) means the stream is not what
    it seems: what is held is flushed and the rest passes untouched."""

    __slots__ = ("_buf", "_off")

    MAX_HELD = 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""
        self._off = False

    def feed(self, chunk: bytes) -> bytes:
        if self._off:
            return chunk
        if (
            not self._buf
            and chunk.endswith(b"\n\n")
            and b'"usage":null,' not in chunk
            and b'{"usage":null' not in chunk
            and b'"usage": ' not in chunk
            and b'"usage" ' not in chunk
            and b'"usage":{' not in chunk
        ):
            # Fast path: whole events in OpenAI's compact form, with the usage member after
            # another one: one pass in C. (Quotes inside JSON strings are escaped, so these bytes
            # occur only as the member itself.)
            return chunk.replace(b',"usage":null', b"")
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            out.append(_without_usage(buf[start : m.end()]))
            start = m.end()
        self._buf = buf[start:]
        if len(self._buf) > self.MAX_HELD:
            log.warning(
                "a stream event passed %d bytes without ending: the usage chunk is no longer "
                "filtered from this stream",
                self.MAX_HELD,
            )
            out.append(self._buf)
            self._buf = b""
            self._off = True
        return b"".join(out)

    def end(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


def _without_usage(event: bytes) -> bytes:
    if b'"usage"' not in event:
        return event
    if b'"usage":null' not in event:
        for line in event.splitlines():
            if line.startswith(b"data:"):
                obj = loads(line[5:])
                if isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage"):
                    return b""  # the usage-only chunk
    return _USAGE_NULL.sub(b"", event)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIAdapter:
    kind: ClassVar[str] = "openai"
    # (File uploads cost no tokens, and identical ones are no loop: one file of identical
    # parts, one batch file uploaded by several jobs. A form is fingerprinted by its content.)
    free_endpoints: ClassVar[frozenset[str]] = frozenset(
        {"/moderations", "/responses/input_tokens", "/files", "/uploads/parts", "/containers/files"}
    )

    def endpoint(self, path: str) -> str:
        return _endpoint(path)

    def describe(self, path: str, body: Any) -> RequestMeta:
        endpoint = self.endpoint(path)
        if isinstance(body, dict):
            return RequestMeta(
                endpoint=endpoint,
                model=str_or_none(body.get("model")),
                stream=body.get("stream") is True,
                canonical=without_keys(body, TRANSPORT_FIELDS),
            )
        return RequestMeta(endpoint=endpoint, model=None, stream=False, canonical=body)

    def with_stream_usage(self, meta: RequestMeta, body: Any) -> Any | None:
        """The body asking for stream usage, or None where the stream reports it anyway (or the
        client asked for it itself)."""
        if not meta.stream or meta.endpoint not in USAGE_ON_REQUEST or not isinstance(body, dict):
            return None
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return None
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        return {**body, "stream_options": options}

    def hide_stream_usage(self) -> StreamFilter:
        return UsageChunkFilter()

    def meter(self, meta: RequestMeta, content_type: str) -> Meter:
        if content_type.startswith("text/event-stream"):
            if meta.endpoint == "/responses":
                return ResponsesStreamMeter()
            return ChatStreamMeter()
        if meta.endpoint == "/responses":
            return ResponsesJSONMeter()
        return JSONMeter(_read_body, tail_keys=("usage", "service_tier", "model"))

    def error_body(self, status: int, message: str, code: str) -> bytes:
        error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
        return orjson.dumps(
            {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        )

    def tool_uses(
        self, endpoint: str, body: Any, last: int, skip: ToolNames | None = None
    ) -> list[ToolUse]:
        if type(body) is not dict:
            return []
        if endpoint == "/chat/completions":
            return chat_tool_uses(body.get("messages"), RecentToolCalls(last, skip))
        if endpoint == "/responses":
            return responses_tool_uses(body.get("input"), RecentToolCalls(last, skip))
        return []


# The blocks of a tool result that are text: a chat ``role: "tool"`` message's content parts, a
# Responses ``function_call_output`` output's input items.
_CHAT_TEXT = frozenset({"text"})
_RESPONSES_TEXT = frozenset({"input_text", "output_text"})


def chat_tool_uses(messages: Any, recent: RecentToolCalls) -> list[ToolUse]:
    """The last answered tool calls of a chat conversation: an assistant message's
    ``tool_calls`` (``{"id", "type": "function", "function": {"name", "arguments": "<JSON
    text>"}}``, or ``"type": "custom"`` with ``"custom": {"name", "input"}``), each answered by
    the ``{"role": "tool", "tool_call_id", "content"}`` message naming its id; and the legacy
    ``function_call``, answered by the ``{"role": "function", "name"}`` message after it.
    https://platform.openai.com/docs/api-reference/chat/create"""
    if type(messages) is not list:
        return []
    for message in reversed(messages):
        if type(message) is not dict:
            continue
        role = message.get("role")
        if role == "tool":
            content = message.get("content")
            if type(content) is not str:
                content = text_or_value(content, _CHAT_TEXT)
            recent.result(message.get("tool_call_id"), content)
        elif role == "assistant":
            tool_calls = message.get("tool_calls")
            if type(tool_calls) is not list:
                legacy = message.get("function_call")
                if type(legacy) is dict:
                    name = legacy.get("name")
                    arguments = legacy.get("arguments")
                    if type(name) is str and recent.call(name, arguments, ("fn", name)):
                        break
                continue
            enough = False
            for call in reversed(tool_calls):
                if type(call) is not dict:
                    continue
                function = call.get("function")
                if type(function) is dict:
                    arguments = function.get("arguments")
                else:
                    function = call.get("custom")
                    if type(function) is not dict:
                        continue
                    arguments = function.get("input")
                if recent.call(function.get("name"), arguments, call.get("id")):
                    enough = True
                    break
            if enough:
                break
        elif role == "function":
            name = message.get("name")
            if type(name) is str:
                recent.result(("fn", name), text_or_value(message.get("content"), _CHAT_TEXT))
    return recent.answered()


def responses_tool_uses(items: Any, recent: RecentToolCalls) -> list[ToolUse]:
    """The last answered tool calls of a Responses API input: ``function_call`` items
    (``name``, ``arguments`` as JSON text, ``call_id``) and ``custom_tool_call`` items
    (``input``), and the built-in tools the client runs itself (``local_shell_call``,
    ``shell_call``, ``computer_call``, ...: named by their type, ``action`` as arguments), each
    answered by the ``<type>_output`` item with the same ``call_id`` (``function_call_output``
    for a function). An input that is a plain string holds no calls.
    https://platform.openai.com/docs/api-reference/responses/create"""
    if type(items) is not list:
        return []
    for item in reversed(items):
        if type(item) is not dict:
            continue
        kind = item.get("type")
        if type(kind) is not str:
            continue
        if kind.endswith("_output"):
            output = item.get("output")
            if type(output) is not str:
                output = text_or_value(output, _RESPONSES_TEXT)
            # (local_shell_call_output names its call in "id", the others in "call_id")
            recent.result(item.get("call_id") or item.get("id"), output)
        elif kind.endswith("_call"):
            if kind == "function_call":
                name, arguments = item.get("name"), item.get("arguments")
            elif kind == "custom_tool_call":
                name, arguments = item.get("name"), item.get("input")
            else:
                name, arguments = kind, item.get("action")
            if recent.call(name, arguments, item.get("call_id")):
                break
    return recent.answered()


@lru_cache(maxsize=4096)
def _endpoint(path: str) -> str:
    return operation_path(path)
