"""The agent-loop detector: repeated tool calls in a growing conversation, in every wire format.

The first half reads conversations through the real adapters (``Adapter.tool_uses``) and the
detector's ``find``; the second sends them through a daemon with the real ``openai`` and
``anthropic`` SDKs (raw HTTP for Gemini) to a fake provider on loopback.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anthropic as anthropic_sdk
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.config import AgentLoopConfig
from proxy.guardrails import AgentLoopDetector, KillSwitch

from .conftest import RunningDaemon, StartDaemon
from .conversations import BUILDERS, ENDPOINTS, READ_CONFIG, Call, Turn, one_call_turns
from .fakes.provider import FakeProvider

SHAPES = list(BUILDERS)
FIXTURES = Path(__file__).parent / "fixtures"
ALL = 1_000_000  # tool_uses: every answered call


def detector(**config: Any) -> AgentLoopDetector:
    return AgentLoopDetector(AgentLoopConfig(**config), KillSwitch("org_local", None))


def loops(shape: str, turns: Sequence[Turn], **config: Any) -> tuple[str, int] | None:
    """(tool, count) of the loop the detector finds in the request after ``turns``, or None."""
    kind, endpoint = ENDPOINTS[shape]
    body = BUILDERS[shape](turns)
    found = detector(**config).scan(ADAPTERS[kind], endpoint, body)
    return None if found is None else (found.tool, found.count)


def trips_at(shape: str, calls: Sequence[Call], **config: Any) -> list[int]:
    """The 1-based numbers of the requests (one per answered call, each request carrying
    the calls so far) that the detector refuses."""
    turns = one_call_turns(calls)
    return [k for k in range(1, len(turns) + 1) if loops(shape, turns[:k], **config)]


def run_tests(i: int) -> Call:
    """A test run whose output changes every time: progress."""
    return Call("run_tests", {"path": "tests/"}, f"{5 - i % 5} failed, {40 + i} passed in 1.{i}s")


OTHER = Call("list_dir", {"path": "."}, "README.md\nconfig/\nsrc/\ntests/")


# --------------------------------------------------------------------------- what counts


@pytest.mark.parametrize("shape", SHAPES)
def test_trips_exactly_on_the_request_that_reaches_the_threshold(shape: str) -> None:
    # list_dir, then read_file answered by the same error again and again: the request that
    # carries the 4th identical (call, result) is refused, every later one too (no state).
    calls = [OTHER] + [READ_CONFIG] * 7
    assert trips_at(shape, calls) == [5, 6, 7, 8]
    assert loops(shape, one_call_turns(calls[:5])) == ("read_file", 4)
    assert trips_at(shape, calls, threshold=6) == [7, 8]


@pytest.mark.parametrize("shape", SHAPES)
def test_argument_key_order_and_whitespace_do_not_matter(shape: str) -> None:
    # The builders write each repetition's arguments differently (key order; for JSON texts
    # compact, spaced or indented); the detector sees one call.
    args = {"path": "config/app.yaml", "encoding": "utf-8", "lines": {"from": 1, "to": 40}}
    call = Call("read_file", args, "Error: EACCES")
    body = BUILDERS[shape](one_call_turns([call] * 3))
    kind, endpoint = ENDPOINTS[shape]
    written = {json.dumps(u[1]) for u in ADAPTERS[kind].tool_uses(endpoint, body, ALL)}
    assert len(written) > 1  # the arguments really were written differently
    assert trips_at(shape, [call] * 4) == [4]


@pytest.mark.parametrize("shape", SHAPES)
def test_progress_never_trips(shape: str) -> None:
    # The same call answered differently each time (a job status that changes): 10 turns.
    assert trips_at(shape, [run_tests(i) for i in range(10)]) == []
    status = [Call("job_status", {"id": "job_42"}, f"running: {p}%") for p in range(0, 100, 10)]
    assert trips_at(shape, status) == []


@pytest.mark.parametrize("shape", SHAPES)
def test_different_calls_never_trip(shape: str) -> None:
    # The same result for different arguments is not a repeat either.
    calls = [Call("read_file", {"path": f"src/m{i}.py"}, "Error: ENOENT") for i in range(12)]
    assert trips_at(shape, calls) == []


@pytest.mark.parametrize("shape", SHAPES)
def test_a_cycle_trips(shape: str) -> None:
    a = Call("read_file", {"path": "a.yaml"}, "Error: invalid YAML at line 3")
    b = Call("edit_file", {"path": "a.yaml", "patch": "-x\n+y"}, "Error: patch does not apply")
    # A, B, A, B, A: A's third time, with threshold 3 (the contract's example).
    assert trips_at(shape, [a, b, a, b, a], threshold=3) == [5]
    assert loops(shape, one_call_turns([a, b, a, b, a]), threshold=3) == ("read_file", 3)
    # Default threshold 4: A B C A B C A B C A -> the 10th request (A's 4th).
    c = Call("run_command", {"cmd": "make"}, "make: *** [all] Error 2")
    assert trips_at(shape, [a, b, c] * 3 + [a]) == [10]


@pytest.mark.parametrize("shape", SHAPES)
def test_parallel_calls_count_one_each(shape: str) -> None:
    # Two turns of two identical parallel calls: 4 occurrences.
    turns = [[READ_CONFIG, READ_CONFIG], [READ_CONFIG, READ_CONFIG]]
    assert loops(shape, turns[:1]) is None
    assert loops(shape, turns) == ("read_file", 4)
    # Parallel different calls, each answered by its own result, are 2 calls, no loop.
    pair = [[Call("read_file", {"path": "a"}, "A"), Call("read_file", {"path": "b"}, "B")]] * 3
    assert loops(shape, pair) is None


@pytest.mark.parametrize("shape", SHAPES)
def test_exempt_tools_are_never_counted(shape: str) -> None:
    poll = Call("job_status", {"id": "job_42"}, "running")
    assert trips_at(shape, [poll] * 10, exempt_tools=frozenset({"job_status"})) == []
    assert trips_at(shape, [poll] * 10)[0] == 4
    # Exempt calls take no place in the lookback: the loop around them is still seen.
    calls = [READ_CONFIG, poll, poll, poll] * 4
    assert trips_at(shape, calls, lookback=5, exempt_tools=frozenset({"job_status"})) == [
        13,
        14,
        15,
        16,
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_only_the_last_lookback_calls_count(shape: str) -> None:
    # Three repeats, then 18 other calls (six, three times each: no progress), then one more
    # repeat: with lookback 20 the first repeats have left the window, so the 4th is no loop.
    other = [Call("read_file", {"path": f"src/m{i}.py"}, f"# module {i}") for i in range(6)]
    calls = [READ_CONFIG] * 3 + other * 3 + [READ_CONFIG]
    assert trips_at(shape, calls) == []
    assert trips_at(shape, calls, lookback=22) == [22]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_constant_call_between_polls_that_progress_never_trips(shape: str) -> None:
    # sleep between status polls whose answer changes: 10 rounds.
    sleep = Call("sleep", {"seconds": 30}, "Slept 30 seconds.")
    polls = [[sleep, Call("get_job_status", {"id": "j1"}, f"running {p}%")] for p in range(10)]
    assert trips_at(shape, [c for pair in polls for c in pair]) == []


@pytest.mark.parametrize("shape", SHAPES)
def test_other_calls_between_repeats_are_no_progress(shape: str) -> None:
    # A different step each turn (a note, an edit) while the same call fails alike: a loop.
    fail = Call("run_tests", {}, "FAIL test_x")
    notes = [Call("note", {"i": i}, "ok") for i in range(8)]
    assert trips_at(shape, [fail, fail, fail, notes[0], fail, fail, fail]) == [5, 6, 7]
    interleaved = [c for i in range(4) for c in (fail, notes[i])][:-1]
    assert trips_at(shape, interleaved) == [7]
    # A constant hand-off before each new sub-task counts too, unless its tools are exempt.
    handoff = Call("transfer_to_billing_agent", {}, "{'assistant': 'Billing agent'}")
    tasks = [
        c
        for i in range(6)
        for c in (handoff, Call("lookup_invoice", {"id": f"inv_{i}"}, f"invoice {i}: $1{i}"))
    ]
    assert trips_at(shape, tasks)[0] == 7
    assert trips_at(shape, tasks, exempt_tools=frozenset({"transfer_to_*"})) == []


@pytest.mark.parametrize("shape", SHAPES)
def test_a_loop_between_calls_that_repeat_too_trips(shape: str) -> None:
    # The same constant call, but what runs between repeats as well (a cycle): no progress.
    sleep = Call("sleep", {"seconds": 30}, "Slept 30 seconds.")
    stuck = Call("get_job_status", {"id": "j1"}, "error: job j1 not found")
    assert trips_at(shape, [sleep, stuck] * 4) == [7, 8]
    # An answer that alternates is an answer that changes: progress.
    flip = [Call("get_job_status", {"id": "j1"}, s) for s in ("pending", "running") * 5]
    assert trips_at(shape, flip) == []


def test_a_result_as_text_blocks_is_the_same_text() -> None:
    # OpenAI chat: a tool message's content as a string or as a list of text parts.
    kind, endpoint = ENDPOINTS["chat"]
    body = BUILDERS["chat"](one_call_turns([READ_CONFIG] * 4))
    for message in body["messages"][3::4]:
        message["content"] = [{"type": "text", "text": message["content"]}]
    found = detector().find(ADAPTERS[kind].tool_uses(endpoint, body, ALL))
    assert found is not None and found.count == 4


def test_anthropic_is_error_is_part_of_the_result() -> None:
    failed = Call("run_command", {"cmd": "make"}, "exit 2", error=True)
    assert trips_at("anthropic", [failed] * 4) == [4]
    # The same text without is_error is another result: after three failures, a success is
    # an answer that changed (progress), not the 4th repeat.
    assert trips_at("anthropic", [failed] * 3 + [failed._replace(error=False)]) == []
    body = BUILDERS["anthropic"]([[failed, failed._replace(error=False)]])
    [(_, _, error), (_, _, plain)] = ADAPTERS["anthropic"].tool_uses("/messages", body, ALL)
    assert (error, plain) == ({"is_error": True, "content": "exit 2"}, "exit 2")


def test_results_that_are_not_text_compare_as_canonical_json() -> None:
    first = Call("get_job", {"id": 7}, {"state": "failed", "error": {"code": 3, "at": "step 2"}})
    turns = one_call_turns([first] * 4)
    body = BUILDERS["gemini"](turns)
    for i, content in enumerate(body["contents"][2::2]):  # the functionResponse turns
        response = content["parts"][0]["functionResponse"]["response"]
        if i % 2:
            content["parts"][0]["functionResponse"]["response"] = dict(reversed(response.items()))
    found = detector().find(ADAPTERS["gemini"].tool_uses("/models:generateContent", body, ALL))
    assert found is not None and (found.tool, found.count) == ("get_job", 4)


def test_gemini_pairs_by_id_when_there_is_one() -> None:
    # Two parallel calls of one name whose responses come back in the other order, with ids.
    def turn(n: int) -> list[dict[str, Any]]:
        return [
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"id": f"a{n}", "name": "fetch", "args": {"u": "a"}}},
                    {"functionCall": {"id": f"b{n}", "name": "fetch", "args": {"u": "b"}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"id": f"b{n}", "name": "fetch", "response": {"r": "B"}}},
                    {"functionResponse": {"id": f"a{n}", "name": "fetch", "response": {"r": "A"}}},
                ],
            },
        ]

    contents = [c for n in range(2) for c in turn(n)]
    uses = ADAPTERS["gemini"].tool_uses("/models:generateContent", {"contents": contents}, ALL)
    assert (
        uses
        == [
            ("fetch", {"u": "a"}, {"r": "A"}),
            ("fetch", {"u": "b"}, {"r": "B"}),
        ]
        * 2
    )


def test_gemini_without_ids_pairs_calls_of_one_name_in_order() -> None:
    # Two parallel calls of one name in each turn, answered in the same order, no ids.
    def turn(n: int) -> list[dict[str, Any]]:
        return [
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"name": "fetch", "args": {"u": "a"}}},
                    {"functionCall": {"name": "fetch", "args": {"u": "b"}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "fetch", "response": {"r": f"A{n}"}}},
                    {"functionResponse": {"name": "fetch", "response": {"r": f"B{n}"}}},
                ],
            },
        ]

    contents = [c for n in range(3) for c in turn(n)]
    uses = ADAPTERS["gemini"].tool_uses("/models:generateContent", {"contents": contents}, ALL)
    assert uses == [
        (name, {"u": u}, {"r": f"{u.upper()}{n}"})
        for n in range(3)
        for name, u in (("fetch", "a"), ("fetch", "b"))
    ]


@pytest.mark.parametrize("key", ["call_0", "", None])
def test_chat_ids_used_again_or_missing_pair_turn_by_turn(key: str | None) -> None:
    # Some OpenAI-compatible servers number calls call_0, call_1 in every turn, or give none.
    body = BUILDERS["chat"](
        [[READ_CONFIG, Call("list_dir", {"path": "."}, f"{i} files")] for i in range(4)]
    )

    def id_of(n: int) -> str | None:
        return None if key is None else key and f"{key}{n}"

    for message in body["messages"]:
        for n, call in enumerate(message.get("tool_calls") or []):
            call["id"] = id_of(n)
    for n, message in enumerate(m for m in body["messages"] if m["role"] == "tool"):
        message["tool_call_id"] = id_of(n % 2)  # each turn: two calls, two results
    uses = ADAPTERS["openai"].tool_uses("/chat/completions", body, ALL)
    assert [(u[0], u[2]) for u in uses] == [
        (name, result)
        for i in range(4)
        for name, result in (("read_file", READ_CONFIG.result), ("list_dir", f"{i} files"))
    ]
    assert loops("chat", [[READ_CONFIG, Call("list_dir", {"path": "."}, "x")]] * 4) == (
        "read_file",
        4,
    )


def test_responses_local_shell_calls_pair_with_their_outputs() -> None:
    # local_shell_call_output names its call in "id" (the other outputs: "call_id").
    items: list[dict[str, Any]] = []
    for t in range(4):
        action = {"type": "exec", "command": ["make", "test"], "env": {}}
        items.append(
            {"type": "local_shell_call", "id": f"lsh_{t}", "call_id": f"call_{t}", "action": action}
        )
        items.append({"type": "local_shell_call_output", "id": f"call_{t}", "output": "FAIL"})
    found = detector().scan(ADAPTERS["openai"], "/responses", {"input": items})
    assert found is not None and (found.tool, found.count) == ("local_shell_call", 4)


def test_exempt_tools_take_shell_globs() -> None:
    handoffs = [Call(f"transfer_to_{a}_agent", {}, "ok") for a in ("billing", "triage")] * 5
    assert trips_at("chat", handoffs)  # constant hand-offs in a cycle: a loop, unless exempt
    assert trips_at("chat", handoffs, exempt_tools=frozenset({"transfer_to_*"})) == []
    assert trips_at("chat", handoffs, exempt_tools=frozenset({"transfer_to_billing_*"}))
    assert trips_at("chat", handoffs, exempt_tools=frozenset({"transfer_to_?illing_agent"}))


def test_arguments_too_deep_or_too_long_for_orjson() -> None:
    # Integers past 64 bits are kept exactly: four different ids are four different calls.
    ids = [Call("get_order", {"id": 10**29 + i}, "not found") for i in range(4)]
    assert trips_at("chat", ids) == []
    assert trips_at("chat", [ids[0]] * 4) == [4]
    # Arguments nested deeper than canonical JSON can be written compare equal to nothing:
    # no loop, and no error.
    deep: Any = "x"
    for _ in range(1000):
        deep = [deep]
    assert trips_at("anthropic", [Call("walk", {"tree": deep}, "same")] * 4) == []


@pytest.mark.parametrize(
    ("kind", "endpoint", "body"),
    [
        ("openai", "/chat/completions", {"messages": "not a list"}),
        ("openai", "/chat/completions", {"messages": [1, None, {"role": "tool"}]}),
        ("openai", "/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [7]}]}),
        ("openai", "/responses", {"input": "just a prompt"}),
        ("openai", "/responses", {"input": [{"type": 3}, {"type": "function_call_output"}]}),
        ("openai", "/embeddings", {"input": "x"}),
        ("anthropic", "/messages", {"messages": [{"role": "user", "content": [None, 5]}]}),
        ("anthropic", "/messages", [1, 2]),
        ("gemini", "/models:generateContent", {"contents": [{"parts": [{"functionCall": 1}]}]}),
        ("gemini", "/models:countTokens", {"contents": []}),
    ],
)
def test_malformed_conversations_hold_no_calls(kind: str, endpoint: str, body: Any) -> None:
    assert ADAPTERS[kind].tool_uses(endpoint, body, ALL) == []


# --------------------------------------------------------------------------- recorded shapes


def prefixes(shape: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The requests an agent sent on its way to ``body``: one after each turn's last tool
    result (the conversation so far), ``body`` being the last."""
    key = {"chat": "messages", "responses": "input", "anthropic": "messages"}.get(shape, "contents")
    items = body[key]

    def is_result(item: Any) -> bool:
        if shape == "chat":
            return bool(item.get("role") == "tool")
        if shape == "responses":
            return bool(item.get("type") == "function_call_output")
        blocks = item.get("content") if shape == "anthropic" else item.get("parts")
        field = "type" if shape == "anthropic" else "functionResponse"
        return isinstance(blocks, list) and any(
            isinstance(b, dict)
            and (b.get(field) == "tool_result" if shape == "anthropic" else field in b)
            for b in blocks
        )

    cuts = [
        i + 1
        for i, item in enumerate(items)
        if is_result(item) and (i + 1 == len(items) or not is_result(items[i + 1]))
    ]
    return [{**body, key: items[:cut]} for cut in cuts]


RECORDED = {
    "chat": ("openai", "agent_chat"),
    "responses": ("openai", "agent_responses"),
    "anthropic": ("anthropic", "agent"),
    "gemini": ("gemini", "agent"),
}


def recorded(shape: str, story: str) -> dict[str, Any]:
    folder, stem = RECORDED[shape]
    body: dict[str, Any] = json.loads((FIXTURES / folder / f"{stem}_{story}.json").read_text())
    return body


def refused(shape: str, bodies: list[dict[str, Any]]) -> list[int]:
    kind, endpoint = ENDPOINTS[shape]
    d = detector()
    return [
        k
        for k, body in enumerate(bodies, 1)
        if d.find(ADAPTERS[kind].tool_uses(endpoint, body, ALL)) is not None
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_recorded_loop_trips_on_the_fourth_same_error(shape: str) -> None:
    # Turn 1: two parallel calls; turn 2: a command; turns 3-7: read_file of a missing config,
    # the same error each time (written differently: key order, whitespace, text blocks).
    bodies = prefixes(shape, recorded(shape, "loop"))
    assert len(bodies) == 7
    assert refused(shape, bodies) == [6, 7]
    kind, endpoint = ENDPOINTS[shape]
    found = detector().scan(ADAPTERS[kind], endpoint, bodies[5])
    assert found is not None and (found.tool, found.count) == ("read_file", 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_recorded_varied_agent_never_trips(shape: str) -> None:
    bodies = prefixes(shape, recorded(shape, "varied"))
    assert len(bodies) == 30
    assert refused(shape, bodies) == []
    # ... although the detector does read all of its 36 calls (6 test runs among them).
    kind, endpoint = ENDPOINTS[shape]
    uses = ADAPTERS[kind].tool_uses(endpoint, bodies[-1], ALL)
    assert len(uses) == 36 and [u[0] for u in uses].count("run_tests") == 6


# --------------------------------------------------------------------------- property


@st.composite
def loop_free(draw: st.DrawFn, threshold: int) -> list[list[Call]]:
    """Turns of calls in which no (name, arguments, result) appears ``threshold`` times."""
    names = st.sampled_from(["read_file", "run_tests", "grep", "edit_file", "job_status"])
    values = st.one_of(
        st.integers(-5, 5),
        st.text(max_size=6),
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 3), max_size=3),
    )
    args = st.dictionaries(st.sampled_from(["path", "q", "n", "flags", "cmd"]), values, max_size=4)
    results = st.one_of(st.text(max_size=12), st.sampled_from(["ok", "Error: ENOENT", ""]))
    distinct = draw(
        st.lists(
            st.tuples(names, args, results),
            min_size=1,
            max_size=25,
            unique_by=lambda t: (t[0], json.dumps(t[1], sort_keys=True), t[2]),
        )
    )
    calls = [
        Call(n, a, r) for n, a, r in distinct for _ in range(draw(st.integers(1, threshold - 1)))
    ]
    random.Random(draw(st.integers(0, 2**32))).shuffle(calls)
    turns: list[list[Call]] = []
    while calls:
        size = draw(st.integers(1, 3))
        turns.append(calls[:size])
        calls = calls[size:]
    return turns


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(SHAPES), st.integers(2, 6))
def test_loop_free_conversations_never_trip(
    data: st.DataObject, shape: str, threshold: int
) -> None:
    turns = data.draw(loop_free(threshold))
    assert loops(shape, turns, threshold=threshold, lookback=50) is None
    # The same conversation with one of its calls made `threshold` times in a row trips.
    repeated = turns[-1][0]
    looping = [*turns, *([[repeated]] * threshold)]
    found = loops(shape, looping, threshold=threshold, lookback=50)
    assert found is not None and found[0] == repeated.name and found[1] >= threshold


# --------------------------------------------------------------------------- through the daemon

MODEL = {"chat": "gpt-4.1-mini", "responses": "gpt-4.1-mini", "anthropic": "claude-sonnet-4-6"}


async def send(
    shape: str, d: RunningDaemon, body: dict[str, Any]
) -> tuple[int, dict[str, str], Any]:
    """Send ``body`` the way an agent would (the SDK with its default 2 retries; raw HTTP for
    Gemini): (status, headers with lowercase names, error body or None)."""
    try:
        if shape == "chat":
            async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="sk-test") as c:
                await c.chat.completions.create(**body)
        elif shape == "responses":
            async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="sk-test") as c:
                await c.responses.create(**body)
        elif shape == "anthropic":
            async with anthropic_sdk.AsyncAnthropic(
                base_url=d.url + "/anthropic", api_key="sk-ant-test"
            ) as a:
                await a.messages.create(**body)
        else:
            url = d.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
            async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
                answer = await r.json()
                if r.status != 200:
                    return r.status, {k.lower(): v for k, v in r.headers.items()}, answer
        return 200, {}, None
    except (openai.APIStatusError, anthropic_sdk.APIStatusError) as exc:
        return exc.status_code, {k.lower(): v for k, v in exc.response.headers.items()}, exc.body


def message_of(shape: str, error: Any) -> str:
    if shape == "anthropic":
        return str(error["error"]["message"])
    return str(error["error"]["message"] if "error" in error else error["message"])


@pytest.mark.parametrize("shape", SHAPES)
async def test_sdk_growing_conversation_is_refused_on_the_threshold(
    shape: str, fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon()
    bodies = prefixes(shape, recorded(shape, "loop"))
    statuses = []
    answers = []
    for body in bodies:
        status, headers, error = await send(shape, d, body)
        statuses.append(status)
        answers.append((headers, error))
    assert statuses == [200] * 5 + [429, 429]
    assert len(fake.requests) == 5  # the refused ones never left, and no SDK retried them
    headers, error = answers[5]
    assert headers["x-should-retry"] == "false"
    assert headers["atlasburn-guardrail"] == "agent_loop_detector"
    assert int(headers["retry-after"]) >= 1
    message = message_of(shape, error)
    assert message == (
        "AtlasBurn guardrail agent_loop_detector: tool 'read_file' called 4 times with the same"
        " arguments and the same result, no progress in between, among the conversation's last"
        " 20 tool calls: the agent is looping. This request is refused, and so is every later"
        " one that carries these calls: start a new conversation (or take the repeated calls out"
        " of its history); if repeating that tool call is expected (a status poll), add the"
        " tool to guardrails.agent_loop_detector.exempt_tools"
    )
    if shape == "anthropic":
        assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    elif shape == "gemini":
        assert error["error"]["status"] == "RESOURCE_EXHAUSTED"
    else:
        assert error["code"] == "atlasburn_guardrail"
    events = [(e.status, e.refused_by, e.tokens_in, e.cost_usd) for e in d.events]
    assert events[5:] == [(429, "agent_loop_detector", 0, 0.0)] * 2
    assert [e[0] for e in events[:5]] == [200] * 5
    # Scope conversation: the org is not suspended; another conversation goes through.
    assert d.daemon.kill.check() is None
    assert (await send(shape, d, prefixes(shape, recorded(shape, "varied"))[-1]))[0] == 200


@pytest.mark.parametrize("shape", ["chat", "anthropic"])
async def test_exempt_tool_passes_through_the_daemon(
    shape: str, fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(guardrails={"agent_loop_detector": {"exempt_tools": ["read_file"]}})
    for body in prefixes(shape, recorded(shape, "loop")):
        assert (await send(shape, d, body))[0] == 200
    assert [e.status for e in d.events] == [200] * 7


async def test_a_body_nested_too_deep_is_relayed_not_a_500(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon()
    deep = "[" * 980 + "]" * 980
    arguments = '{"tree":' + deep + "}"
    turns = one_call_turns([Call("walk", {}, "same")] * 4)
    body = BUILDERS["chat"](turns)
    for message in body["messages"]:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = arguments
    raw = json.dumps(body)[:-1] + ', "x": ' + deep + "}"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            d.url + "/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 200
    assert [e.status for e in d.events] == [200]


async def test_disabled_layer_lets_the_loop_through(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(guardrails={"agent_loop_detector": {"enabled": False}})
    for body in prefixes("chat", recorded("chat", "loop")):
        assert (await send("chat", d, body))[0] == 200


@pytest.mark.parametrize("shape", ["chat", "gemini"])
async def test_scope_org_suspends_the_org(
    shape: str, fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(guardrails={"agent_loop_detector": {"scope": "org", "ttl_seconds": 600}})
    bodies = prefixes(shape, recorded(shape, "loop"))
    for body in bodies[:5]:
        assert (await send(shape, d, body))[0] == 200
    status, headers, error = await send(shape, d, bodies[5])
    assert status == 429 and headers["atlasburn-guardrail"] == "agent_loop_detector"
    assert 599 <= int(headers["retry-after"]) <= 600
    reason = (
        "tool 'read_file' called 4 times with the same arguments and the same result, no"
        " progress in between, among the conversation's last 20 tool calls"
    )
    assert message_of(shape, error) == (
        f"AtlasBurn guardrail: org org_local is suspended by agent_loop_detector ({reason});"
        " retry after 600s. An operator resumes it with `atlasburn-proxy resume` (or DELETE"
        " /api/guardrails/enforce); if repeating that tool call is expected (a status poll),"
        " add the tool to guardrails.agent_loop_detector.exempt_tools"
    )
    state = d.daemon.kill.check()
    assert state is not None and (state.layer, state.reason) == ("agent_loop_detector", reason)
    # The whole org is refused now: a conversation without any tool call too.
    status, headers, _ = await send(shape, d, BUILDERS[shape]([]))
    assert status == 429 and headers["atlasburn-guardrail"] == "agent_loop_detector"
    assert len(fake.requests) == 5
    # Resumed, the org goes on (a new conversation).
    await d.daemon.kill.clear("resumed by an operator", "api")
    assert (await send(shape, d, BUILDERS[shape]([])))[0] == 200
