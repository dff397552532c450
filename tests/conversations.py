"""Agent conversations in each wire format, built from turns of tool calls, for the agent-loop
detector's tests.

A turn is the tool calls the model made in one answer (several: parallel calls), each a
``Call`` (tool name, arguments object, result). ``BUILDERS`` makes the request body that follows
the last turn in each wire format, the way an agent framework sends it: OpenAI chat
(``tool_calls`` and ``role: "tool"`` messages), OpenAI Responses (``function_call`` and
``function_call_output`` items), Anthropic (``tool_use`` and ``tool_result`` blocks), Gemini
(``functionCall`` and ``functionResponse`` parts). ``variant`` (the call's index) changes how
the arguments are written, never what they say: key order, and for JSON texts the whitespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Call(NamedTuple):
    name: str
    arguments: dict[str, Any]
    result: Any  # a str, or (Gemini, Anthropic blocks) a JSON value
    error: bool = False  # Anthropic's is_error


Turn = Sequence[Call]

TASK = "The service fails to start; find out why and fix the config."
SYSTEM = "You are a careful coding agent. Use the tools to inspect and fix the repository."


def reordered(arguments: dict[str, Any], variant: int) -> dict[str, Any]:
    """The same object with its keys in another order for odd variants."""
    if variant % 2:
        return dict(reversed(list(arguments.items())))
    return dict(arguments)


def json_text(arguments: dict[str, Any], variant: int) -> str:
    """The arguments as a JSON text, written three ways."""
    value = reordered(arguments, variant)
    if variant % 3 == 0:
        return json.dumps(value)
    if variant % 3 == 1:
        return json.dumps(value, separators=(",", ":"))
    return json.dumps(value, indent=2)


def _text(result: Any) -> str:
    return result if isinstance(result, str) else json.dumps(result)


def chat(turns: Sequence[Turn], model: str = "gpt-4.1-mini") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK},
    ]
    n = 0
    for t, turn in enumerate(turns):
        ids = [f"call_t{t:03d}c{i}Xq8Lr2Vn5Kp7Wd3Z" for i in range(len(turn))]
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": ids[i],
                        "type": "function",
                        "function": {"name": c.name, "arguments": json_text(c.arguments, n + i)},
                    }
                    for i, c in enumerate(turn)
                ],
            }
        )
        for i, c in enumerate(turn):
            messages.append({"role": "tool", "tool_call_id": ids[i], "content": _text(c.result)})
        n += len(turn)
    return {"model": model, "messages": messages}


def responses(turns: Sequence[Turn], model: str = "gpt-4.1-mini") -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": TASK}]}
    ]
    n = 0
    for t, turn in enumerate(turns):
        ids = [f"call_r{t:03d}c{i}Hj4Tm9Bq2Ws6Yf" for i in range(len(turn))]
        for i, c in enumerate(turn):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{t:03d}{i}7d0c1e5a9b3f2a6c",
                    "call_id": ids[i],
                    "name": c.name,
                    "arguments": json_text(c.arguments, n + i),
                    "status": "completed",
                }
            )
        for i, c in enumerate(turn):
            items.append(
                {"type": "function_call_output", "call_id": ids[i], "output": _text(c.result)}
            )
        n += len(turn)
    return {"model": model, "instructions": SYSTEM, "input": items}


def anthropic(turns: Sequence[Turn], model: str = "claude-sonnet-4-6") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    n = 0
    for t, turn in enumerate(turns):
        ids = [f"toolu_01T{t:03d}c{i}Qm7Zp3Lk8Vr2Nw" for i in range(len(turn))]
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    *(
                        {
                            "type": "tool_use",
                            "id": ids[i],
                            "name": c.name,
                            "input": reordered(c.arguments, n + i),
                        }
                        for i, c in enumerate(turn)
                    ),
                ],
            }
        )
        results = []
        for i, c in enumerate(turn):
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": ids[i],
                "content": _text(c.result),
            }
            if c.error:
                block["is_error"] = True
            results.append(block)
        messages.append({"role": "user", "content": results})
        n += len(turn)
    return {"model": model, "max_tokens": 1024, "system": SYSTEM, "messages": messages}


def gemini(turns: Sequence[Turn]) -> dict[str, Any]:
    contents: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": TASK}]}]
    n = 0
    for turn in turns:
        contents.append(
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"name": c.name, "args": reordered(c.arguments, n + i)}}
                    for i, c in enumerate(turn)
                ],
            }
        )
        contents.append(
            {
                "role": "user",
                "parts": [
                    {
                        "functionResponse": {
                            "name": c.name,
                            "response": c.result
                            if isinstance(c.result, dict)
                            else {"output": c.result},
                        }
                    }
                    for c in turn
                ],
            }
        )
        n += len(turn)
    return {"systemInstruction": {"parts": [{"text": SYSTEM}]}, "contents": contents}


BUILDERS: dict[str, Callable[[Sequence[Turn]], dict[str, Any]]] = {
    "chat": chat,
    "responses": responses,
    "anthropic": anthropic,
    "gemini": gemini,
}

# (adapter kind, endpoint) each shape is read as.
ENDPOINTS = {
    "chat": ("openai", "/chat/completions"),
    "responses": ("openai", "/responses"),
    "anthropic": ("anthropic", "/messages"),
    "gemini": ("gemini", "/models:generateContent"),
}

READ_CONFIG = Call(
    "read_file",
    {"path": "config/app.yaml", "encoding": "utf-8"},
    "Error: ENOENT: no such file or directory, open 'config/app.yaml'",
    error=True,
)


def one_call_turns(calls: Sequence[Call]) -> list[list[Call]]:
    return [[c] for c in calls]
