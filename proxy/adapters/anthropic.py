"""Anthropic's Messages API wire format (``/v1/messages``, JSON and SSE).

Input tokens are ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``, each
priced at its own rate (cache writes kept for an hour, ``cache_creation.ephemeral_1h_input_tokens``,
at theirs). The web searches the API ran for the request
(``usage.server_tool_use.web_search_requests``) are billed per search on top of the tokens ($10 per
1,000); its web fetches (``web_fetch_requests``) cost only the tokens they bring in, and are not
counted. In a stream, ``message_start`` carries the input side and a first output count; each
``message_delta`` carries the usage so far (cumulative, never to be summed), so the last value of
each field wins.

``/v1/messages/count_tokens`` is free: its answer (``{"input_tokens": N}``) counts tokens that were
not consumed, so its event records 0 tokens and costs 0 (it is still a request, and still counts
for the loop detector).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from .base import (
    JSONMeter,
    Meter,
    Metered,
    RecentToolCalls,
    RequestMeta,
    SSEMeter,
    ToolNames,
    ToolUse,
    Usage,
    UsageInStream,
    as_int,
    loads,
    operation_path,
    str_or_none,
    text_or_value,
    without_keys,
)

TRANSPORT_FIELDS = frozenset({"stream", "metadata", "service_tier"})

_USAGE_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def _usage(fields: dict[str, int]) -> Usage:
    created = fields.get("cache_creation_input_tokens", 0)
    read = fields.get("cache_read_input_tokens", 0)
    return Usage(
        input_tokens=fields.get("input_tokens", 0) + created + read,
        output_tokens=fields.get("output_tokens", 0),
        cached_input_tokens=read,
        cache_write_tokens=created,
        cache_write_1h_tokens=fields.get("ephemeral_1h_input_tokens", 0),
        web_searches=fields.get("web_search_requests", 0),
    )


def _merge(fields: dict[str, int], usage: Any) -> bool:
    """Take the fields ``usage`` reports (a later report replaces an earlier one)."""
    if not isinstance(usage, dict):
        return False
    for name in _USAGE_FIELDS:
        value = usage.get(name)
        if value is not None:
            fields[name] = as_int(value)
    creation = usage.get("cache_creation")
    if isinstance(creation, dict) and creation.get("ephemeral_1h_input_tokens") is not None:
        fields["ephemeral_1h_input_tokens"] = as_int(creation["ephemeral_1h_input_tokens"])
    tools = usage.get("server_tool_use")
    if isinstance(tools, dict) and tools.get("web_search_requests") is not None:
        fields["web_search_requests"] = as_int(tools["web_search_requests"])
    return True


def _read_body(body: Any) -> Metered:
    if not isinstance(body, dict):
        return Metered(None, None)
    fields: dict[str, int] = {}
    seen = _merge(fields, body.get("usage"))
    return Metered(_usage(fields) if seen else None, str_or_none(body.get("model")))


def _read_count_tokens(body: Any) -> Metered:
    if isinstance(body, dict) and "input_tokens" in body:
        return Metered(Usage(), None)  # free: nothing was consumed
    return Metered(None, None)


class MessagesStreamMeter(SSEMeter):
    __slots__ = ("fields", "seen", "final", "model")

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, int] = {}
        self.seen = False
        self.final = False  # a message_delta carried the final output count
        self.model: str | None = None

    def feed(self, chunk: bytes) -> None:
        # Fast path: usage travels only in message_start and message_delta events; a chunk of
        # whole events with neither (text deltas, pings) is not parsed at all.
        if chunk.endswith(b"\n\n") and self._parser.idle() and b"message_" not in chunk:
            return
        super().feed(chunk)

    def on_event(self, event: bytes, data: bytes) -> None:
        if event == b"message_start":
            obj = loads(data)
            message = obj.get("message") if isinstance(obj, dict) else None
            if isinstance(message, dict):
                self.model = str_or_none(message.get("model"))
                self.seen |= _merge(self.fields, message.get("usage"))
        elif event == b"message_delta":
            obj = loads(data)
            if isinstance(obj, dict) and _merge(self.fields, obj.get("usage")):
                self.seen = self.final = True

    def summary(self) -> Metered:
        return Metered(_usage(self.fields) if self.seen else None, self.model, self.final)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicAdapter(UsageInStream):
    kind: ClassVar[str] = "anthropic"
    # (/files: uploads cost no tokens; identical ones are no loop)
    free_endpoints: ClassVar[frozenset[str]] = frozenset({"/messages/count_tokens", "/files"})

    def endpoint(self, path: str) -> str:
        return operation_path(path)

    def describe(self, path: str, body: Any) -> RequestMeta:
        endpoint = operation_path(path)
        if isinstance(body, dict):
            return RequestMeta(
                endpoint=endpoint,
                model=str_or_none(body.get("model")),
                stream=body.get("stream") is True,
                canonical=without_keys(body, TRANSPORT_FIELDS),
            )
        return RequestMeta(endpoint=endpoint, model=None, stream=False, canonical=body)

    def meter(self, meta: RequestMeta, content_type: str) -> Meter:
        if content_type.startswith("text/event-stream"):
            return MessagesStreamMeter()
        if meta.endpoint == "/messages/count_tokens":
            return JSONMeter(_read_count_tokens)
        return JSONMeter(_read_body, tail_keys=("usage", "model"))

    def error_body(self, status: int, message: str, code: str) -> bytes:
        error_type = _ERROR_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})

    def tool_uses(
        self, endpoint: str, body: Any, last: int, skip: ToolNames | None = None
    ) -> list[ToolUse]:
        if endpoint != "/messages" or type(body) is not dict:
            return []
        return messages_tool_uses(body.get("messages"), RecentToolCalls(last, skip))


_CALLS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
_TEXT = frozenset({"text"})


def messages_tool_uses(messages: Any, recent: RecentToolCalls) -> list[ToolUse]:
    """The last answered tool calls of a Messages conversation: ``tool_use`` content blocks
    (``id``, ``name``, ``input``; also the provider's own ``server_tool_use`` and
    ``mcp_tool_use``), each answered by the ``tool_result`` block (or
    ``web_search_tool_result``, ``mcp_tool_result``, ...) whose ``tool_use_id`` names it. A
    result with ``"is_error": true`` differs from the same content without it.
    https://docs.anthropic.com/en/docs/build-with-claude/tool-use"""
    if type(messages) is not list:
        return []
    for message in reversed(messages):
        if type(message) is not dict:
            continue
        content = message.get("content")
        if type(content) is not list:
            continue  # a plain string: no blocks
        for block in reversed(content):
            if type(block) is not dict:
                continue
            kind = block.get("type")
            if type(kind) is not str:
                continue
            if kind in _CALLS:
                if recent.call(block.get("name"), block.get("input"), block.get("id")):
                    return recent.answered()
            elif kind.endswith("tool_result"):
                result = block.get("content")
                if type(result) is not str:
                    result = text_or_value(result, _TEXT)
                if block.get("is_error") is True:
                    result = {"is_error": True, "content": result}
                recent.result(block.get("tool_use_id"), result)
    return recent.answered()
