"""The agent-loop detector: a tool call answered by the same result again and again.

A looping agent rarely sends the same request twice: each turn appends one more tool call and
its result to the conversation, so every fingerprint is new and the dumb loop detector never
sees a repeat. This layer reads the conversation inside each request instead. A tool call is its
name plus its arguments as canonical JSON (key order and whitespace do not matter); its result is
the output paired with it (canonical JSON too; text sent as a string or as text blocks is the
same text). Among the conversation's last ``lookback`` answered calls (``exempt_tools`` left
out), a (call, result) pair seen ``threshold`` times with no progress in between trips it,
whether the call repeats in a row or inside a cycle (A, B, A, B, A: A's third time). Progress is
a different result: the same call answered differently (a job status that changes never trips,
and neither does a call repeated between such polls). Different calls never trip.

The adapter of each wire format reads the last ``lookback`` answered calls
(``Adapter.tool_uses``) from the end of the body already parsed for the fingerprint; this module
only compares them, and parses arguments only in a conversation where some call got the same
result ``threshold`` times (see ``AgentLoopDetector.find``).

With scope ``conversation`` no state is kept: the request that carries the loop is refused, and
so is any later request of the same conversation, which carries it in its history; other
conversations pass. With scope ``org`` the trip also suspends the org for ``ttl_seconds`` (and,
through the kill flag, the whole fleet).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..adapters.base import Adapter, ToolNames, ToolUse
from ..config import AgentLoopConfig
from ..fingerprint import canonical_json
from ..logs import Throttle
from ..text import inert
from .kill_switch import KillSwitch, Suspension

log = logging.getLogger(__name__)

AGENT_LOOP_LAYER = "agent_loop_detector"

# What a refusal by this layer tells the developer after its reason: what to do about it.
CONVERSATION_HINT = (
    "the agent is looping. This request is refused, and so is every later one that carries"
    " these calls: start a new conversation (or take the repeated calls out of its history)"
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
            f"tool '{self.tool}' called {self.count} times with the same arguments and the same"
            f" result, no progress in between, among the conversation's last {self.lookback}"
            " tool calls"
        )


class AgentLoopDetector:
    """Finds loops in a request's conversation (``find``) and says what a trip does
    (``check``: the refusal, and with scope ``org`` the org's suspension)."""

    def __init__(self, config: AgentLoopConfig, kill: KillSwitch) -> None:
        self.kill = kill
        self._throttle = Throttle(10.0)  # a looping client is refused as often as it asks
        self.configure(config)

    def configure(self, config: AgentLoopConfig) -> None:
        self.enabled = config.enabled
        self.threshold = config.threshold
        self.lookback = config.lookback
        self.per_org = config.scope == "org"
        self.ttl = config.ttl_seconds
        self.exempt = ToolNames(config.exempt_tools) if config.exempt_tools else None

    def check(self, adapter: Adapter, endpoint: str, body: Any) -> Suspension | None:
        """The refusal of a request whose conversation (``body``, parsed JSON, read by
        ``adapter``) loops, or None. Scope ``org``: the org's suspension, set now. Scope
        ``conversation``: a suspension of this request alone (source ``"conversation"``, for
        ``ttl_seconds``), kept nowhere."""
        loop = self.scan(adapter, endpoint, body)
        if loop is None:
            return None
        if self.per_org:
            return self.kill.suspend_now(AGENT_LOOP_LAYER, loop.reason, self.ttl, "local")[0]
        allowed, held = self._throttle.allow()
        if allowed:
            log.warning(
                "guardrail: %s refused a %s request: %s%s",
                AGENT_LOOP_LAYER,
                endpoint,
                loop.reason,
                f" ({held} more refusals since the last line)" if held else "",
            )
        return Suspension(
            self.kill.org_id, AGENT_LOOP_LAYER, loop.reason, "conversation", time.time() + self.ttl
        )

    def scan(self, adapter: Adapter, endpoint: str, body: Any) -> AgentLoop | None:
        """The loop in a request's conversation, if any (nothing is changed)."""
        return self.find(adapter.tool_uses(endpoint, body, self.lookback, self.exempt))

    def find(self, uses: list[ToolUse]) -> AgentLoop | None:
        """The worst loop among ``uses`` (the conversation's last answered calls, oldest first,
        exempt ones left out): the (call, result) pair repeated most often without progress in
        between, if ``threshold`` times or more.

        Progress, between two occurrences of a pair, is a call answered differently from the
        last time it was made (a job status that changed). So a call repeated in a row, in a
        cycle (A, B, A, B, A) or between other calls counts up, while a call that gets the same
        answer between polls whose answer changes (``sleep`` between status checks) does not.
        Other calls, new or not, are no progress: a loop with a different step each turn (a
        note, an edit while the tests fail alike) still trips.

        Most conversations hold no pair ``threshold`` times at all, which is found cheaply: the
        calls are counted by name and result length, then (those still in a group of
        ``threshold``) by name and result; only a conversation with such a group has its
        arguments parsed and is read in order."""
        threshold = self.threshold
        if len(uses) < threshold:
            return None
        # Names and result lengths (texts of different lengths differ), then names and
        # results, only for the calls still in a group of ``threshold``.
        sized: dict[tuple[str, int], int] = {}
        for name, _, result in uses:
            key = (name, len(result) if type(result) is str else -1)
            sized[key] = sized.get(key, 0) + 1
        if max(sized.values()) < threshold:
            return None
        answered: dict[Any, int] = {}
        for use in uses:
            result = use[2]
            if sized[(use[0], len(result) if type(result) is str else -1)] >= threshold:
                key = (use[0], _result(use))
                answered[key] = answered.get(key, 0) + 1
        if max(answered.values()) < threshold:
            return None
        return self._in_order(uses)

    def _in_order(self, uses: list[ToolUse]) -> AgentLoop | None:
        """``find``'s count, walking ``uses`` in order (see ``find`` for what progress is)."""
        pairs = [((use[0], _arguments(use)), _result(use)) for use in uses]
        answered: dict[Any, Any] = {}  # call -> its last result
        seen: dict[Any, tuple[int, int]] = {}  # pair -> (its last index, its count)
        progress = -1  # index of the last progress
        worst: tuple[str, int] | None = None
        for i, pair in enumerate(pairs):
            call, result = pair
            before = answered.get(call, _NOTHING)
            if before is not _NOTHING and before != result:
                progress = i
            answered[call] = result
            last = seen.get(pair)
            count = 1 if last is None or progress > last[0] else last[1] + 1
            seen[pair] = (i, count)
            if count >= self.threshold and (worst is None or count > worst[1]):
                worst = (call[0], count)
        if worst is None:
            return None
        return AgentLoop(inert(worst[0], 128), worst[1], self.lookback)


_NOTHING = object()


def _result(use: ToolUse) -> Any:
    """A result to compare: a text as it is, anything else as canonical JSON (bytes, so the text
    ``null`` and the value null differ); one nested too deep to write compares equal to
    nothing."""
    result = use[2]
    if type(result) is str:
        return result
    try:
        return canonical_json(result)
    except (ValueError, RecursionError):
        return object()


def _arguments(use: ToolUse) -> Any:
    """A call's arguments as canonical JSON: a JSON text (OpenAI's ``arguments``) is parsed
    first (with the standard library where it holds integers too long for orjson, which would
    read them as floats that no longer differ); a text that is not JSON compares as that
    string. Arguments nested too deep to write canonically compare equal to nothing."""
    arguments = use[1]
    if type(arguments) is str:
        try:
            if _LONG_NUMBER.search(arguments) is None:
                arguments = orjson.loads(arguments)
            else:
                arguments = json.loads(arguments)
        except ValueError:  # (orjson's JSONDecodeError is one)
            pass
        except RecursionError:
            return object()
    try:
        return canonical_json(arguments)
    except (ValueError, RecursionError):
        return object()


# 19 digits and more: an integer orjson does not keep exactly (beyond 64 bits).
_LONG_NUMBER = re.compile(r"\d{19}")
