"""Google Gemini's ``generateContent`` wire format.

The model is in the path (``/v1beta/models/{model}:generateContent``), not the body. Usage is
``usageMetadata``: ``promptTokenCount`` (which includes ``cachedContentTokenCount``) plus
``toolUsePromptTokenCount`` in, ``candidatesTokenCount`` plus ``thoughtsTokenCount`` out. A
``:streamGenerateContent`` answer is SSE with ``alt=sse`` and otherwise one JSON array delivered
piece by piece; either way each chunk's ``usageMetadata`` is the total so far, so the last one wins.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from .base import (
    JSONMeter,
    Meter,
    Metered,
    RequestMeta,
    SSEMeter,
    ToolCalls,
    ToolUse,
    Usage,
    UsageInStream,
    loads,
    operation_path,
    usage_field,
)


def read_usage(meta: Any) -> Usage | None:
    if not isinstance(meta, dict):
        return None
    thoughts = usage_field(meta, "thoughtsTokenCount")
    return Usage(
        input_tokens=usage_field(meta, "promptTokenCount")
        + usage_field(meta, "toolUsePromptTokenCount"),
        output_tokens=usage_field(meta, "candidatesTokenCount") + thoughts,
        cached_input_tokens=usage_field(meta, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def _model_version(obj: dict[str, Any]) -> str | None:
    value = obj.get("modelVersion")
    return value if isinstance(value, str) and value else None


def _finished(chunk: dict[str, Any]) -> bool:
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(
        isinstance(c, dict) and c.get("finishReason") for c in candidates
    )


def _read_body(body: Any) -> Metered:
    """A generateContent answer, or a whole streamed JSON array of them."""
    chunks = body if isinstance(body, list) else [body]
    usage: Usage | None = None
    model: str | None = None
    final = not isinstance(body, list)
    for chunk in chunks:
        if isinstance(chunk, dict):
            usage = read_usage(chunk.get("usageMetadata")) or usage
            model = model or _model_version(chunk)
            final = final or _finished(chunk)
    return Metered(usage, model, final)


class GeminiStreamMeter(SSEMeter):
    __slots__ = ("usage", "model", "final")

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None
        self.final = False  # the chunk with a finishReason (and the final counts) arrived

    def on_event(self, event: bytes, data: bytes) -> None:
        if b'"usageMetadata"' not in data and self.model is not None:
            return
        obj = loads(data)
        if isinstance(obj, dict):
            self.usage = read_usage(obj.get("usageMetadata")) or self.usage
            self.model = self.model or _model_version(obj)
            self.final = self.final or _finished(obj)

    def summary(self) -> Metered:
        return Metered(self.usage, self.model, self.final)


def path_model(path: str) -> str | None:
    """``/v1beta/models/gemini-2.5-flash:generateContent`` -> ``gemini-2.5-flash``."""
    for prefix in ("/models/", "/tunedModels/"):
        start = path.find(prefix)
        if start >= 0:
            name = path[start + len(prefix) :].split(":", 1)[0].split("/", 1)[0]
            return name or None
    return None


_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GeminiAdapter(UsageInStream):
    kind: ClassVar[str] = "gemini"
    free_endpoints: ClassVar[frozenset[str]] = frozenset({"/models:countTokens"})

    def endpoint(self, path: str) -> str:
        return operation_path(path)

    def describe(self, path: str, body: Any) -> RequestMeta:
        endpoint = operation_path(path)
        model = path_model(path)
        canonical = body
        if isinstance(body, dict):
            # The model is part of what is asked even though it travels in the path.
            canonical = {**body, "model": model}
        return RequestMeta(
            endpoint=endpoint,
            model=model,
            stream=endpoint.endswith(":streamGenerateContent"),
            canonical=canonical,
        )

    def meter(self, meta: RequestMeta, content_type: str) -> Meter:
        if content_type.startswith("text/event-stream"):
            return GeminiStreamMeter()
        return JSONMeter(_read_body, tail_keys=("usageMetadata", "modelVersion"))

    def error_body(self, status: int, message: str, code: str) -> bytes:
        state = _STATUS.get(status, "INTERNAL")
        return orjson.dumps({"error": {"code": status, "message": message, "status": state}})

    def tool_uses(self, endpoint: str, body: Any) -> list[ToolUse]:
        if endpoint not in _CONVERSATIONS or not isinstance(body, dict):
            return []
        return contents_tool_uses(body.get("contents"))


_CONVERSATIONS = frozenset({"/models:generateContent", "/models:streamGenerateContent"})


def contents_tool_uses(contents: Any) -> list[ToolUse]:
    """The answered function calls of a Gemini conversation: ``functionCall`` parts (``name``,
    ``args``, and in newer versions an ``id``) of the model's turns, each answered by a
    ``functionResponse`` part (``name``, ``response``) of a later turn: the one with the same
    ``id``, else the oldest unanswered call of that name (calls and responses come in the same
    order). The snake_case spellings (``function_call``) are read too, as the API accepts them.
    https://ai.google.dev/gemini-api/docs/function-calling"""
    if not isinstance(contents, list):
        return []
    calls = ToolCalls()
    for content in contents:
        if not isinstance(content, dict):
            continue
        parts = content.get("parts")
        if not isinstance(parts, list):
            continue
        for part in parts:
            if not isinstance(part, dict):
                continue
            call = part.get("functionCall") or part.get("function_call")
            if isinstance(call, dict):
                calls.call(call.get("name"), call.get("args"), call.get("id"))
                continue
            response = part.get("functionResponse") or part.get("function_response")
            if isinstance(response, dict):
                result = response.get("response")
                parts_of = response.get("parts")
                if parts_of:  # a multimodal response: its parts are part of the result
                    result = {"response": result, "parts": parts_of}
                key = response.get("id")
                if isinstance(key, str) and calls.has(key):
                    calls.answer(key, result)
                else:
                    calls.answer_next(response.get("name"), result)
    return calls.answered()
