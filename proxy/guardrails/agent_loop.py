"""The agent-loop detector: a tool call answered by the same result again and again.

A looping agent rarely sends the same request twice: each turn appends one more tool call and
its result to the conversation, so every fingerprint is new and the dumb loop detector never
sees a repeat. This layer reads the conversation inside each request instead. A tool call is its
name plus its arguments as canonical JSON (key order and whitespace do not matter); its result is
the output paired with it (canonical JSON too; text sent as a string or as text blocks is the
same text). Among the conversation's last ``lookback`` answered calls (``exempt_tools`` left
out), a (call, result) pair seen ``threshold`` times trips it, whether the call repeats in a row
or inside a cycle (A, B, A, B, A: A's third time). A different result is progress: the same call
answered differently (a job status that changes) never trips; different calls never trip.

The adapter of each wire format reads the calls (``Adapter.tool_uses``) from the body already
parsed for the fingerprint; this module only compares them, and only the calls of a name seen
``threshold`` times among the last ``lookback`` are canonicalised at all.

With scope ``conversation`` no state is kept: the request that carries the loop is refused, and
so is any later request of the same conversation, which carries it in its history; other
conversations pass. With scope ``org`` the trip also suspends the org for ``ttl_seconds`` (and,
through the kill flag, the whole fleet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from ..adapters.base import Adapter, ToolUse
from ..config import AgentLoopConfig
from ..fingerprint import canonical_json
from ..text import inert
from .kill_switch import KillSwitch, Suspension

AGENT_LOOP_LAYER = "agent_loop_detector"

# What a refusal by this layer tells the developer after its reason: what to do about it.
CONVERSATION_HINT = (
    "the agent is looping. This request is refused, and so is every request that carries this"
    " history: change the agent's course or start a new conversation"
)
EXEMPT_HINT = (
    "if repeating that tool call is expected (a status poll), add the tool to"
    " guardrails.agent_loop_detector.exempt_tools"
)


@dataclass(frozen=True, slots=True)
class AgentLoop:
    """A loop found in one conversation: ``tool`` (bounded, inert) was called ``count`` times
    with the same arguments and got the same result, among its last ``lookback`` calls."""

    tool: str
    count: int
    lookback: int

    @property
    def reason(self) -> str:
        return (
            f"tool '{self.tool}' called {self.count} times with the same arguments and got the"
            f" same result each time, among the conversation's last {self.lookback} tool calls"
        )


class AgentLoopDetector:
    """Finds loops in a request's conversation (``find``) and says what a trip does
    (``check``: the refusal, and with scope ``org`` the org's suspension)."""

    def __init__(self, config: AgentLoopConfig, kill: KillSwitch) -> None:
        self.kill = kill
        self.configure(config)

    def configure(self, config: AgentLoopConfig) -> None:
        self.enabled = config.enabled
        self.threshold = config.threshold
        self.lookback = config.lookback
        self.per_org = config.scope == "org"
        self.ttl = config.ttl_seconds
        self.exempt = config.exempt_tools

    def check(self, adapter: Adapter, endpoint: str, body: Any) -> Suspension | None:
        """The refusal of a request whose conversation (``body``, parsed JSON, read by
        ``adapter``) loops, or None. Scope ``org``: the org's suspension, set now. Scope
        ``conversation``: a suspension of this request alone (source ``"conversation"``, for
        ``ttl_seconds``), kept nowhere."""
        loop = self.find(adapter.tool_uses(endpoint, body))
        if loop is None:
            return None
        if self.per_org:
            return self.kill.suspend_now(AGENT_LOOP_LAYER, loop.reason, self.ttl, "local")[0]
        return Suspension(
            self.kill.org_id, AGENT_LOOP_LAYER, loop.reason, "conversation", time.time() + self.ttl
        )

    def find(self, uses: list[ToolUse]) -> AgentLoop | None:
        """The worst loop among the last ``lookback`` answered calls (exempt ones left out):
        the (call, result) pair seen most often, if that is ``threshold`` times or more."""
        threshold = self.threshold
        if len(uses) < threshold:
            return None
        if self.exempt:
            uses = [use for use in uses if use[0] not in self.exempt]
        recent = uses[-self.lookback :]
        if len(recent) < threshold:
            return None
        # Only names called ``threshold`` times can loop: the rest is never canonicalised.
        names: dict[str, int] = {}
        for use in recent:
            names[use[0]] = names.get(use[0], 0) + 1
        if max(names.values()) < threshold:
            return None
        pairs: dict[tuple[str, int, int], int] = {}
        worst: tuple[str, int] | None = None
        for name, arguments, result in recent:
            if names[name] < threshold:
                continue
            key = (name, _digest(_arguments(arguments)), _digest(_result(result)))
            count = pairs[key] = pairs.get(key, 0) + 1
            if count >= threshold and (worst is None or count > worst[1]):
                worst = (name, count)
        if worst is None:
            return None
        return AgentLoop(inert(worst[0], 128), worst[1], self.lookback)


def _arguments(arguments: Any) -> bytes:
    """A call's arguments as canonical JSON: a JSON text (OpenAI's ``arguments``) is parsed
    first; a text that is not JSON compares as that string."""
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            pass
    return canonical_json(arguments)


def _result(result: Any) -> bytes:
    """A result as bytes to compare: text as it is, anything else as canonical JSON (tagged
    apart, so that the text ``null`` and the value null differ)."""
    if isinstance(result, str):
        return b"s" + result.encode("utf-8", "surrogatepass")
    return b"j" + canonical_json(result)


def _digest(data: bytes) -> int:
    return xxhash.xxh3_128_intdigest(data)
