"""Google Gemini's ``generateContent`` wire format.

The model is in the path (``/v1beta/models/{model}:generateContent``), not the body. Usage is
``usageMetadata``: ``promptTokenCount`` (which includes ``cachedContentTokenCount``) plus
``toolUsePromptTokenCount`` in, ``candidatesTokenCount`` plus ``thoughtsTokenCount`` out. A
``:streamGenerateContent`` answer is SSE with ``alt=sse`` and otherwise one JSON array delivered
piece by piece; either way each chunk's ``usageMetadata`` is the total so far, so the last one wins.

Tokens of other modalities are listed by modality: ``promptTokensDetails`` (and
``toolUsePromptTokensDetails``) in, of which ``cacheTokensDetails`` cached, and
``candidatesTokensDetails`` out (``[{"modality": "AUDIO", "tokenCount": N}, ...]``); audio, image
and video tokens are priced at their own rates where the model has them (Gemini 2.5 Flash: audio in
at $1.00 / M against $0.30 for text). Grounding with Google Search is a fee per grounded answer
(or per search query: ``billed_searches``), read from the candidates' ``groundingMetadata``.
"""

from __future__ import annotations

import re
from dataclasses import replace
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
    usage_field,
)


def read_usage(meta: Any) -> Usage | None:
    if not isinstance(meta, dict):
        return None
    thoughts = usage_field(meta, "thoughtsTokenCount")
    prompt = _modalities(meta.get("promptTokensDetails"))
    tool = _modalities(meta.get("toolUsePromptTokensDetails"))
    cached = _modalities(meta.get("cacheTokensDetails"))
    out = _modalities(meta.get("candidatesTokensDetails"))
    return Usage(
        input_tokens=usage_field(meta, "promptTokenCount")
        + usage_field(meta, "toolUsePromptTokenCount"),
        output_tokens=usage_field(meta, "candidatesTokenCount") + thoughts,
        cached_input_tokens=usage_field(meta, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
        input_audio_tokens=prompt.get("AUDIO", 0) + tool.get("AUDIO", 0),
        input_image_tokens=prompt.get("IMAGE", 0) + tool.get("IMAGE", 0),
        input_video_tokens=prompt.get("VIDEO", 0) + tool.get("VIDEO", 0),
        cached_audio_tokens=cached.get("AUDIO", 0),
        cached_image_tokens=cached.get("IMAGE", 0),
        cached_video_tokens=cached.get("VIDEO", 0),
        output_audio_tokens=out.get("AUDIO", 0),
        output_image_tokens=out.get("IMAGE", 0),
    )


def _modalities(details: Any) -> dict[str, int]:
    """A ``*TokensDetails`` list (``[{"modality": "AUDIO", "tokenCount": 2900}, ...]``) as
    modality -> tokens; ``DOCUMENT`` (PDF pages) counts as ``IMAGE``, as Google bills it and
    genai-prices reads it. TEXT and unknown modalities are left to the text rate."""
    found: dict[str, int] = {}
    if type(details) is not list:
        return found
    for item in details:
        if type(item) is dict:
            modality = item.get("modality")
            if modality == "DOCUMENT":
                modality = "IMAGE"
            if modality in _PRICED_MODALITIES:
                found[modality] = found.get(modality, 0) + as_int(item.get("tokenCount"))
    return found


_PRICED_MODALITIES = frozenset({"AUDIO", "IMAGE", "VIDEO"})


def _model_version(obj: dict[str, Any]) -> str | None:
    value = obj.get("modelVersion")
    return value if isinstance(value, str) and value else None


def _finished(chunk: dict[str, Any]) -> bool:
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(
        isinstance(c, dict) and c.get("finishReason") for c in candidates
    )


def _search_queries(chunk: dict[str, Any]) -> int:
    """The Google Search queries a grounded answer ran: its candidates' ``groundingMetadata``
    ``webSearchQueries``."""
    candidates = chunk.get("candidates")
    queries = 0
    if type(candidates) is list:
        for candidate in candidates:
            if type(candidate) is dict:
                grounding = candidate.get("groundingMetadata")
                if type(grounding) is dict and type(grounding.get("webSearchQueries")) is list:
                    queries += len(grounding["webSearchQueries"])
    return queries


_GENERATION = re.compile(r"gemini-(\d+)")


def billed_searches(model: str | None, queries: int) -> int:
    """Grounding with Google Search is billed per grounded prompt up to Gemini 2.5 ($35 per
    1,000) and per search query from Gemini 3 on ($14 per 1,000), both after a free daily or
    monthly allowance this meter does not know of (https://ai.google.dev/gemini-api/docs/pricing);
    so a grounded answer counts one search, or (Gemini 3 and later) one per query."""
    if not queries:
        return 0
    found = _GENERATION.search(model or "")
    return queries if found and int(found.group(1)) >= 3 else 1


def _with_searches(usage: Usage | None, model: str | None, queries: int) -> Usage | None:
    if usage is None or not queries:
        return usage
    return replace(usage, web_searches=billed_searches(model, queries))


def _read_body(body: Any, asked: str | None = None) -> Metered:
    """A generateContent answer, or a whole streamed JSON array of them; ``asked`` is the model
    the request's path named."""
    chunks = body if isinstance(body, list) else [body]
    usage: Usage | None = None
    model: str | None = None
    final = not isinstance(body, list)
    queries = 0
    for chunk in chunks:
        if isinstance(chunk, dict):
            usage = read_usage(chunk.get("usageMetadata")) or usage
            model = model or _model_version(chunk)
            final = final or _finished(chunk)
            queries = max(queries, _search_queries(chunk))
    return Metered(_with_searches(usage, asked or model, queries), model, final)


class GeminiStreamMeter(SSEMeter):
    __slots__ = ("usage", "model", "final", "asked", "queries")

    def __init__(self, asked: str | None = None) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self.model: str | None = None
        self.final = False  # the chunk with a finishReason (and the final counts) arrived
        self.asked = asked  # the model the request's path named
        self.queries = 0  # Google Search queries of a grounded answer

    def on_event(self, event: bytes, data: bytes) -> None:
        if (
            b'"usageMetadata"' not in data
            and self.model is not None
            and b'"groundingMetadata"' not in data
        ):
            return
        obj = loads(data)
        if isinstance(obj, dict):
            self.usage = read_usage(obj.get("usageMetadata")) or self.usage
            self.model = self.model or _model_version(obj)
            self.final = self.final or _finished(obj)
            self.queries = max(self.queries, _search_queries(obj))

    def summary(self) -> Metered:
        usage = _with_searches(self.usage, self.asked or self.model, self.queries)
        return Metered(usage, self.model, self.final)


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
            return GeminiStreamMeter(meta.model)
        asked = meta.model
        return JSONMeter(
            lambda body: _read_body(body, asked), tail_keys=("usageMetadata", "modelVersion")
        )

    def error_body(self, status: int, message: str, code: str) -> bytes:
        state = _STATUS.get(status, "INTERNAL")
        return orjson.dumps({"error": {"code": status, "message": message, "status": state}})

    def tool_uses(
        self, endpoint: str, body: Any, last: int, skip: ToolNames | None = None
    ) -> list[ToolUse]:
        if endpoint not in _CONVERSATIONS or type(body) is not dict:
            return []
        return contents_tool_uses(body.get("contents"), RecentToolCalls(last, skip))


_CONVERSATIONS = frozenset({"/models:generateContent", "/models:streamGenerateContent"})


def contents_tool_uses(contents: Any, recent: RecentToolCalls) -> list[ToolUse]:
    """The last answered function calls of a Gemini conversation: ``functionCall`` parts
    (``name``, ``args``, and in newer versions an ``id``) of the model's turns, each answered by
    a ``functionResponse`` part (``name``, ``response``, maybe ``parts``) of the turn after it:
    the one with the same ``id``, else, by name and order, the n-th response of that name
    answers the n-th call of that name. The snake_case spellings (``function_call``) are read
    too, as the API accepts them. https://ai.google.dev/gemini-api/docs/function-calling"""
    if type(contents) is not list:
        return []
    for content in reversed(contents):
        if type(content) is not dict:
            continue
        parts = content.get("parts")
        if type(parts) is not list:
            continue
        for part in reversed(parts):  # walking back within a turn too
            if type(part) is not dict:
                continue
            call = part.get("functionCall") or part.get("function_call")
            if type(call) is dict:
                key = _key(call)
                if type(key) is str and not recent.waiting(key):
                    name = call.get("name")  # a response that dropped the call's id
                    key = ("name", name) if type(name) is str else None
                if recent.call(call.get("name"), call.get("args"), key):
                    return recent.answered()
                continue
            response = part.get("functionResponse") or part.get("function_response")
            if type(response) is dict:
                result = response.get("response")
                extra = response.get("parts")
                if extra:  # a multimodal response: its parts are part of the result
                    result = {"response": result, "parts": extra}
                recent.result(_key(response), result)
    return recent.answered()


def _key(part: dict[str, Any]) -> Any:
    """What pairs a call with its response: its id, else its name."""
    key = part.get("id")
    if type(key) is str and key:
        return key
    name = part.get("name")
    return ("name", name) if type(name) is str else None
