"""OpenAI's wire format: chat completions, completions, embeddings, the Responses API, and every
other path relayed as-is. Also the format of every OpenAI-compatible host (``kind = "openai"``).

Usage lives in ``usage``: ``prompt_tokens``/``completion_tokens`` (chat, completions, embeddings) or
``input_tokens``/``output_tokens`` (Responses API), with cached input and reasoning output in the
``*_details`` objects. A chat or completion stream carries usage only in a final chunk when the
request asked for ``stream_options.include_usage``; a Responses stream carries it in its terminal
``response.completed`` / ``response.incomplete`` / ``response.failed`` event.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import orjson

from .base import (
    JSONMeter,
    Meter,
    Metered,
    RequestMeta,
    SSEMeter,
    Usage,
    as_int,
    loads,
    operation_path,
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

_RESPONSES_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def read_usage(usage: Any) -> Usage | None:
    """A ``Usage`` from either usage dialect, or None when ``usage`` is not a usage object."""
    if not isinstance(usage, dict):
        return None
    cost = usage.get("cost")
    reported_cost = None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
        reported_cost = float(cost)
    if "input_tokens" in usage:
        return Usage(
            input_tokens=as_int(usage.get("input_tokens")),
            output_tokens=as_int(usage.get("output_tokens")),
            cached_input_tokens=usage_field(usage, "input_tokens_details", "cached_tokens"),
            reasoning_tokens=usage_field(usage, "output_tokens_details", "reasoning_tokens"),
            cost_usd=reported_cost,
        )
    if "prompt_tokens" in usage:
        return Usage(
            input_tokens=as_int(usage.get("prompt_tokens")),
            output_tokens=as_int(usage.get("completion_tokens")),
            cached_input_tokens=usage_field(usage, "prompt_tokens_details", "cached_tokens"),
            reasoning_tokens=usage_field(usage, "completion_tokens_details", "reasoning_tokens"),
            cost_usd=reported_cost,
        )
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _read_body(body: Any) -> Metered:
    if not isinstance(body, dict):
        return Metered(None, None)
    return Metered(read_usage(body.get("usage")), _str_or_none(body.get("model")))


class ChatStreamMeter(SSEMeter):
    """Chat-completion and completion chunks: the usage chunk, and the model of the first chunk."""

    __slots__ = ("usage", "model")

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None

    def on_event(self, event: bytes, data: bytes) -> None:
        want_model = self.model is None
        has_usage = b'"usage"' in data and b'"usage":null' not in data
        if not (want_model or has_usage) or data == b"[DONE]":
            return
        obj = loads(data)
        if not isinstance(obj, dict):
            return
        if want_model:
            self.model = _str_or_none(obj.get("model"))
        if has_usage:
            usage = read_usage(obj.get("usage"))
            if usage is not None:
                self.usage = usage

    def summary(self) -> Metered:
        return Metered(self.usage, self.model)


class ResponsesStreamMeter(SSEMeter):
    """Responses API events: usage and model from the terminal ``response.*`` event."""

    __slots__ = ("usage", "model")

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None

    def on_event(self, event: bytes, data: bytes) -> None:
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
        self.model = _str_or_none(response.get("model")) or self.model
        usage = read_usage(response.get("usage"))
        if usage is not None:
            self.usage = usage

    def summary(self) -> Metered:
        return Metered(self.usage, self.model)


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

    def endpoint(self, path: str) -> str:
        return _endpoint(path)

    def describe(self, path: str, body: Any) -> RequestMeta:
        endpoint = _endpoint(path)
        if isinstance(body, dict):
            return RequestMeta(
                endpoint=endpoint,
                model=_str_or_none(body.get("model")),
                stream=body.get("stream") is True,
                canonical=without_keys(body, TRANSPORT_FIELDS),
            )
        return RequestMeta(endpoint=endpoint, model=None, stream=False, canonical=body)

    def meter(self, meta: RequestMeta, content_type: str) -> Meter:
        if content_type.startswith("text/event-stream"):
            if meta.endpoint == "/responses":
                return ResponsesStreamMeter()
            return ChatStreamMeter()
        return JSONMeter(_read_body)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
        return orjson.dumps(
            {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        )


@lru_cache(maxsize=4096)
def _endpoint(path: str) -> str:
    return operation_path(path)
