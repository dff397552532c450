"""The usage of a Realtime session (OpenAI's Realtime API over WebSocket, and Azure's), sans-IO.

A session is one WebSocket; the server bills it per response. Each ``response.done`` server event
carries that response's usage (source: the Realtime API reference, server event ``response.done``,
``response.usage``)::

    {"total_tokens", "input_tokens", "output_tokens",
     "input_token_details": {"text_tokens", "audio_tokens", "image_tokens", "cached_tokens",
                             "cached_tokens_details": {"text_tokens", "audio_tokens",
                                                       "image_tokens"}},
     "output_token_details": {"text_tokens", "audio_tokens"}}

``input_tokens`` includes the cached ones, and the modality counts add up to their totals. The
meter sums every response of the session, totals and modality counts alike, so that one event per
session can be priced. The model comes from the ``session.created`` (or ``session.updated``)
event's ``session.model`` where the handshake's query did not name one.

Only text frames from the server are fed here, one message at a time. Most of a session's frames
are audio deltas (base64 in JSON, tens of KiB each): a frame is parsed only if its text names one
of the events read here, so the others cost one substring search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .base import Usage

# The server events the meter reads, as they appear in a frame's JSON text.
_MARKERS = ('"response.done"', '"session.created"', '"session.updated"')


@dataclass(slots=True)
class RealtimeUsage:
    """Token counts summed over a session's responses (tokens; each ``*_text`` / ``*_audio`` /
    ``*_image`` count is part of the total above it)."""

    responses: int = 0
    input_tokens: int = 0
    input_text: int = 0
    input_audio: int = 0
    input_image: int = 0
    cached_tokens: int = 0
    cached_text: int = 0
    cached_audio: int = 0
    cached_image: int = 0
    output_tokens: int = 0
    output_text: int = 0
    output_audio: int = 0

    def add(self, usage: dict[str, Any]) -> None:
        """Add one ``response.usage`` object (missing or malformed counts are 0)."""
        details = _object(usage.get("input_token_details"))
        cached = _object(details.get("cached_tokens_details"))
        out = _object(usage.get("output_token_details"))
        self.responses += 1
        self.input_tokens += _count(usage.get("input_tokens"))
        self.input_text += _count(details.get("text_tokens"))
        self.input_audio += _count(details.get("audio_tokens"))
        self.input_image += _count(details.get("image_tokens"))
        self.cached_tokens += _count(details.get("cached_tokens"))
        self.cached_text += _count(cached.get("text_tokens"))
        self.cached_audio += _count(cached.get("audio_tokens"))
        self.cached_image += _count(cached.get("image_tokens"))
        self.output_tokens += _count(usage.get("output_tokens"))
        self.output_text += _count(out.get("text_tokens"))
        self.output_audio += _count(out.get("audio_tokens"))

    def usage(self) -> Usage:
        """The session's usage for the pricer: input (cached included), cached input, output,
        and of each the audio and image tokens (each modality's count includes its cached
        tokens, as ``Usage`` counts them), priced at the model's rates for each."""
        cached = min(self.cached_tokens, self.input_tokens)
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=cached,
            input_audio_tokens=self.input_audio,
            input_image_tokens=self.input_image,
            cached_audio_tokens=min(self.cached_audio, self.input_audio),
            cached_image_tokens=min(self.cached_image, self.input_image),
            output_audio_tokens=self.output_audio,
        )


class RealtimeMeter:
    """Reads a session's server events: the summed usage of its responses and the model."""

    __slots__ = ("total", "model", "errors")

    def __init__(self) -> None:
        self.total = RealtimeUsage()
        self.model: str | None = None  # from session.created / session.updated
        self.errors = 0  # frames that named an event read here but were not JSON objects

    def feed(self, text: str) -> None:
        """One text message the server sent."""
        if not any(marker in text for marker in _MARKERS):
            return
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.errors += 1
            return
        if not isinstance(event, dict):
            self.errors += 1
            return
        kind = event.get("type")
        if kind == "response.done":
            usage = _object(event.get("response")).get("usage")
            if isinstance(usage, dict):
                self.total.add(usage)
        elif kind in ("session.created", "session.updated"):
            model = _object(event.get("session")).get("model")
            if isinstance(model, str) and model:
                self.model = model

    def usage(self) -> Usage | None:
        """The session's usage so far; None when no response reported any."""
        return self.total.usage() if self.total.responses else None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    """A token count as the wire has it: a non-negative int (a bool or anything else is 0)."""
    return value if type(value) is int and value > 0 else 0
