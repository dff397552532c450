"""The adapter registry: config ``kind`` -> the adapter for that wire format.

A new wire format is one module here plus one line below (and its tests); config validation and
routing pick it up from this table.
"""

from __future__ import annotations

from .anthropic import AnthropicAdapter
from .azure import AzureOpenAIAdapter
from .base import Adapter
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    OpenAIAdapter.kind: OpenAIAdapter(),
    AnthropicAdapter.kind: AnthropicAdapter(),
    GeminiAdapter.kind: GeminiAdapter(),
    AzureOpenAIAdapter.kind: AzureOpenAIAdapter(),
}

__all__ = ["ADAPTERS", "Adapter"]
