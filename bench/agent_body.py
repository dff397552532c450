"""The request body of the ``agent-c16`` scenario: a 100-message OpenAI chat agent conversation.

A coding agent fixing a bug in a small Python service: a system prompt, the user's task, then 39
assistant turns that call tools (6 of them two calls at once), each call answered by a
``role: "tool"`` message (a file's lines, test output, grep hits, a directory listing, a patch
applied, a command's output: 200 to 2,000 bytes each), and 7 exchanges where the assistant
reports and the user answers: 100 messages, 45 tool calls, and a ``tools`` array of 6 function
definitions. Call ids are ``call_`` + 24 letters and digits; ``arguments`` is JSON text.

It is built the same every time (seeded), and it is loop-free with work to do for the
agent-loop detector (``check``): no (name, arguments, result) is seen ``THRESHOLD`` times among
any ``LOOKBACK`` consecutive calls, yet among the last ``LOOKBACK`` calls three tool names
(``read_file``, ``run_tests``, ``apply_patch``) are called ``THRESHOLD`` times or more, so the
detector canonicalises and hashes their calls on every request.

``AgentBody`` holds the body serialised once around a hole in the user's message, where each
request's nonce goes (every request a distinct fingerprint: the dumb loop detector never fires).

    python -m bench.agent_body      # what the body holds, checked
    python -m bench.agent_body 1000000   # the same with earlier work until about 1 MB

``size`` (``conversation``, ``AgentBody``; the ``agent200k-*`` and ``agent1m-*`` scenarios)
inserts earlier tool-calling work of the same session after the task, items of fresh seeded
plans, until the body holds about that many bytes; the last 98 messages stay as above, so the
detector's lookback sees the same calls.
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections import Counter
from typing import Any

THRESHOLD = 4  # the agent-loop detector's defaults (proxy/config.py AgentLoopConfig)
LOOKBACK = 20
MODEL = "gpt-4o-mini"
HOLE = "\x00NONCE\x00"

SYSTEM = """\
You are a careful software engineering agent working inside a checked-out Git repository. \
You can read files, search the code, run the test suite, run shell commands and apply patches \
through the tools you are given; you cannot see anything else. Work in small steps:

1. Understand the task and find the code involved before changing anything. Prefer search_code \
and read_file with a line range over reading whole large files.
2. Reproduce the problem with the tests (run_tests) before fixing it, and after each change run \
the tests that cover it; run the whole suite before you finish.
3. Change as little as possible. Keep the public API, the code style and the existing \
behaviour that the task does not mention. Patches are unified diffs against the current file.
4. Never commit, push, or touch files outside the repository. Do not install packages.
5. When you report, say what was wrong, what you changed and how you checked it, briefly.

The repository is a Python 3.11 project using pytest and ruff. Tool output longer than 2,000 \
bytes is cut; ask for a narrower range if you need more."""

TASK = (
    "Orders with a line of quantity 0 make POST /orders return 500 instead of 422 (ticket "
    "INV-2291; request {nonce}). Find the cause, fix it so that such a line is rejected with a "
    "clear validation error, and make sure the reports do not count empty lines either. The "
    "test suite must pass at the end."
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }
    for name, description, properties, required in (
        (
            "read_file",
            "Read a text file of the repository, with line numbers. Optionally a range of lines "
            "(1-based, inclusive); output longer than 2,000 bytes is cut.",
            {
                "path": {"type": "string", "description": "Path relative to the repository root"},
                "start_line": {"type": "integer", "minimum": 1},
                "end_line": {"type": "integer", "minimum": 1},
            },
            ["path"],
        ),
        (
            "search_code",
            "Search the repository's files for a regular expression (ripgrep syntax); returns "
            "path:line: text for each match, at most 50 matches.",
            {
                "pattern": {"type": "string"},
                "path": {"type": "string", "description": "Directory or file to search in"},
                "case_sensitive": {"type": "boolean", "default": True},
            },
            ["pattern"],
        ),
        (
            "list_directory",
            "List a directory of the repository: names, kinds and sizes.",
            {"path": {"type": "string"}, "depth": {"type": "integer", "minimum": 1, "maximum": 3}},
            ["path"],
        ),
        (
            "run_tests",
            "Run pytest on a file, a directory or a test id, and return its output (failures "
            "first).",
            {
                "target": {"type": "string", "description": "tests/, a file, or file::test"},
                "extra_args": {"type": "array", "items": {"type": "string"}},
            },
            ["target"],
        ),
        (
            "apply_patch",
            "Apply a unified diff to one file. Returns the lines around the change as they are "
            "after it.",
            {"path": {"type": "string"}, "patch": {"type": "string"}},
            ["path", "patch"],
        ),
        (
            "run_command",
            "Run a shell command in the repository root (no network); returns its exit code, "
            "stdout and stderr.",
            {"command": {"type": "string"}, "timeout_seconds": {"type": "integer", "maximum": 300}},
            ["command"],
        ),
    )
]

# ----------------------------------------------------------------------------- tool results

_WORDS = (
    "order line quantity price total discount sku stock item customer invoice report "
    "warehouse reserve amount currency tax status batch"
).split()


def _source(rng: random.Random, path: str, first: int, size: int) -> str:
    """Plausible Python source, numbered from ``first``, about ``size`` bytes."""
    module = path.rsplit("/", 1)[-1].removesuffix(".py")
    lines = [
        "from __future__ import annotations",
        "",
        "from dataclasses import dataclass",
        "from decimal import Decimal",
        "",
        f"from .errors import {module.title()}Error",
        "",
    ]
    while sum(len(x) + 8 for x in lines) < size:
        a, b, c = rng.sample(_WORDS, 3)
        kind = rng.randrange(4)
        if kind == 0:
            lines += [
                "",
                "@dataclass(frozen=True, slots=True)",
                f"class {a.title()}{b.title()}:",
                f"    {a}_id: str",
                f"    {c}: Decimal",
                f"    {b}: int = 0",
            ]
        elif kind == 1:
            lines += [
                "",
                f"def {a}_{b}({c}: {a.title()}, {b}: int) -> Decimal:",
                f'    """The {a} {b} of one {c}, rounded to cents."""',
                f"    if {b} < 0:",
                f'        raise {module.title()}Error(f"negative {b}: {{{b}}}")',
                f'    return ({c}.{a} * {b}).quantize(Decimal("0.01"))',
            ]
        elif kind == 2:
            lines += [
                "",
                f"def validate_{a}(payload: dict[str, object]) -> list[str]:",
                "    problems = []",
                f'    for field in ("{a}", "{b}", "{c}"):',
                "        if field not in payload:",
                '            problems.append(f"{field}: missing")',
                "    return problems",
            ]
        else:
            lines += [
                "",
                f"def total_{a}(lines: list[{b.title()}Line]) -> Decimal:",
                f"    return sum((x.{c} * x.quantity for x in lines), Decimal(0))",
            ]
    out: list[str] = []
    for i, line in enumerate(lines):
        row = f"{first + i:>5}  {line}"
        if sum(len(x) + 1 for x in out) + len(row) > size:
            break
        out.append(row)
    return "\n".join(out)


def read_file(rng: random.Random, path: str, start: int = 1, size: int = 1200) -> str:
    if path.endswith(".md"):
        head = f"# {path}\n\n"
        body = " ".join(rng.choice(_WORDS) for _ in range(size // 6))
        text = head + "\n".join(body[i : i + 90] for i in range(0, len(body), 90))
        return text[:size]
    return _source(rng, path, start, size)


def search_code(rng: random.Random, pattern: str, files: list[str], hits: int) -> str:
    rows = []
    needle = pattern.replace("\\", "")
    for _ in range(hits):
        path = rng.choice(files)
        a, b = rng.sample(_WORDS, 2)
        line = rng.randint(8, 240)
        indent = " " * rng.choice((0, 4, 8, 12))
        before = rng.choice(("", "return ", f"{a} = ", "if ", "assert "))
        after = rng.choice(("", f"{b}, line)", f"{b}.quantity)", ":", f"  # INV-{line * 7}"))
        if needle.startswith("def "):
            indent, before, after = indent[:4], "", f"(self, {b}: {a.title()}) -> Decimal:"
        rows.append(f"{path}:{line}:{indent}{before}{needle}{after}")
    rows.sort()
    return "\n".join(rows) + f"\n\n{hits} matches in {len({r.split(':')[0] for r in rows})} files"


def run_tests(target: str, collected: int, failures: list[str], seconds: float) -> str:
    head = (
        "============================= test session starts ==============================\n"
        "platform linux -- Python 3.11.7, pytest-8.3.3, pluggy-1.5.0\n"
        "rootdir: /workspace/inventory-service\nconfigfile: pyproject.toml\n"
        f"collected {collected} items\n\n"
    )
    dots = "".join("F" if i % 7 == 3 and i // 7 < len(failures) else "." for i in range(collected))
    progress = "\n".join(
        f"{target if target.endswith('.py') else 'tests/test_suite.py'} {dots[i : i + 60]}"
        for i in range(0, len(dots), 60)
    )
    body = head + progress + "\n"
    for test in failures:
        body += (
            f"\n___________________________ {test.split('::')[-1]} ___________________________\n"
            f"    def {test.split('::')[-1]}(client):\n"
            f'        resp = client.post("/orders", json=order_with(quantity=0))\n'
            f">       assert resp.status_code == 422\nE       assert 500 == 422\n"
            f"E        +  where 500 = <Response [500]>.status_code\n{test.split('::')[0]}:"
            f"{40 + 17 * len(test) % 200}: AssertionError\n"
        )
    failed = len(failures)
    summary = f"{failed} failed, {collected - failed} passed" if failed else f"{collected} passed"
    if failures:
        body += "=========================== short test summary info ============================\n"
        body += "".join(f"FAILED {t} - assert 500 == 422\n" for t in failures)
    return (
        body + f"========================= {summary} in {seconds:.2f}s =========================\n"
    )


_DIRS = {"src", "tests", "docs", ".github", "scripts", "alembic", "db", "routes"}


def list_directory(rng: random.Random, path: str, names: list[str]) -> str:
    rows = [f"{path.rstrip('/')}/"]
    for name in names:
        kind = "dir " if name in _DIRS else "file"
        rows.append(f"  {kind}  {rng.randint(120, 24000) if kind == 'file' else '-':>6}  {name}")
    return "\n".join(rows)


def apply_patch(rng: random.Random, path: str, line: int, size: int) -> str:
    head = f"Patch applied to {path}: 1 hunk, +{rng.randint(2, 9)} -{rng.randint(1, 4)}.\n"
    return head + f"Lines {line}-{line + 24} now read:\n" + read_file(rng, path, line, size)


def run_command(command: str, code: int, output: str) -> str:
    return f"$ {command}\nexit code: {code}\n--- stdout ---\n{output}\n--- stderr ---\n"


def _diff(rng: random.Random, path: str, line: int) -> str:
    a, b = rng.sample(_WORDS, 2)
    if path.endswith(".md"):
        return (
            f"--- a/{path}\n+++ b/{path}\n@@ -{line},4 +{line},5 @@\n ## Unreleased\n \n"
            "+- POST /orders rejects a line of quantity 0 with 422 (was 500); reports skip "
            "empty lines (INV-2291).\n - Stock reservations expire after 15 minutes.\n"
        )
    return (
        f"--- a/{path}\n+++ b/{path}\n@@ -{line},6 +{line},8 @@\n"
        f" def validate_{a}(payload: dict[str, object]) -> list[str]:\n"
        "     problems = []\n"
        f'-    if payload.get("{b}", 0) < 0:\n'
        f'+    quantity = payload.get("{b}")\n'
        "+    if not isinstance(quantity, int) or quantity <= 0:\n"
        f'+        problems.append("{b}: must be a positive integer")\n'
        "     return problems\n"
    )


def _diffstat(rng: random.Random, files: list[str]) -> str:
    rows = [f" {f} | {rng.randint(2, 30)} {'+' * rng.randint(1, 12)}{'-' * rng.randint(0, 5)}"
            for f in files]  # fmt: skip
    return "\n".join(rows) + f"\n {len(files)} files changed, 41 insertions(+), 9 deletions(-)"


# ----------------------------------------------------------------------------- the conversation

SRC = "src/inventory"
FILES = [f"{SRC}/{m}.py" for m in ("orders", "pricing", "models", "validation", "api",
                                   "serializers", "reports", "errors", "stock")]  # fmt: skip


def _plan(rng: random.Random) -> list[Any]:
    """The conversation after the task: each item a turn (a list of (tool, arguments, result)
    called together) or an exchange (the assistant's report, the user's answer)."""
    src = FILES
    tests = ["tests/test_orders.py", "tests/test_inventory_api.py", "tests/test_reports.py"]

    def call(name: str, args: dict[str, Any], result: str) -> tuple[str, dict[str, Any], str]:
        return (name, args, result)

    def read(path: str, start: int = 1, end: int | None = None) -> tuple[str, dict[str, Any], str]:
        args: dict[str, Any] = {"path": path}
        if end is not None:
            args |= {"start_line": start, "end_line": end}
        return call("read_file", args, read_file(rng, path, start, rng.randint(700, 1950)))

    def grep(pattern: str, path: str = "src", hits: int = 9) -> tuple[str, dict[str, Any], str]:
        return call("search_code", {"pattern": pattern, "path": path}, search_code(
            rng, pattern, src + tests, hits))  # fmt: skip

    def test(target: str, n: int, failures: list[str]) -> tuple[str, dict[str, Any], str]:
        args = {"target": target, "extra_args": ["-q", "-x"] if failures else ["-q"]}
        return call("run_tests", args, run_tests(target, n, failures, rng.uniform(0.8, 9.0)))

    def patch(path: str, line: int) -> tuple[str, dict[str, Any], str]:
        return call("apply_patch", {"path": path, "patch": _diff(rng, path, line)},
                    apply_patch(rng, path, line, rng.randint(400, 1200)))  # fmt: skip

    def sh(command: str, code: int, output: str) -> tuple[str, dict[str, Any], str]:
        return call("run_command", {"command": command}, run_command(command, code, output))

    def ls(path: str, names: list[str]) -> tuple[str, dict[str, Any], str]:
        return call("list_directory", {"path": path}, list_directory(rng, path, names))

    o, api, rep = tests
    zero = [f"{o}::test_zero_quantity_rejected", f"{o}::test_zero_quantity_message",
            f"{o}::test_mixed_lines_rejected"]  # fmt: skip

    def report(text: str, reply: str) -> tuple[str, str]:
        return (text, reply)

    return [
        [ls(".", ["src", "tests", "docs", "pyproject.toml", "README.md", "CHANGELOG.md",
                  "Makefile", ".github", "uv.lock", "noxfile.py", "setup.cfg", "LICENSE",
                  "conftest.py", "scripts", "alembic", "alembic.ini", "Dockerfile",
                  ".pre-commit-config.yaml", "docker-compose.yml", "mypy.ini"])],
        [read("README.md"), ls(SRC, [p.rsplit("/", 1)[1] for p in src] + ["__init__.py",
                                     "py.typed", "db", "routes", "settings.py", "cli.py"])],
        [grep("def create_order")],
        [read(src[0])],
        [read(src[1]), read(src[2])],
        [test(o, 24, zero)],
        report(
            "The three failing tests post an order with a line of quantity 0: `create_order` "
            "passes it on to `pricing.line_total`, which divides by the quantity for the unit "
            "discount and raises ZeroDivisionError, hence the 500. Validation lets 0 through "
            "because it only rejects negative quantities. I'll tighten the validation.",
            "Go ahead, but keep the public API of the validation module unchanged.",
        ),
        [grep("quantity", SRC, 14)],
        [read(src[3])],
        [read(o, 1, 80)],
        [patch(src[3], 31)],
        [test(o, 24, zero[2:])],
        report(
            "Zero is now rejected with a 422 for a single line; one test still fails: an order "
            "mixing valid lines and a zero line reaches pricing before the line is validated.",
            "OK. Check whether pricing should guard against it too.",
        ),
        [read(o, 80, 160)],
        [grep("apply_discount", "src", 6)],
        [read(src[1], 40, 120)],
        [patch(src[1], 57)],
        [test(o, 24, []), sh("git diff --stat", 0, _diffstat(rng, src[1:4:2]))],
        report(
            "tests/test_orders.py passes now: every line is validated before pricing, and "
            "line_total no longer divides by the quantity. Running the whole suite next.",
            "Good, go on.",
        ),
        [test("tests", 212, [f"{api}::test_post_order_zero_line", f"{api}::test_error_body"])],
        [read(api)],
        [grep("OrderLine\\(", "src", 11)],
        [read(src[4]), read(src[5])],
        [patch(src[5], 88)],
        [test(api, 31, [f"{api}::test_error_body"])],
        report(
            "The API tests expect the error body to name the line (`lines[2].quantity`); the "
            "serializer now reports the index, but the API still formats a Decimal badly in "
            "the message. Fixing that.",
            "Make sure the message format matches the docs.",
        ),
        [read(src[4], 100, 180)],
        [grep("Decimal\\(", "src", 16)],
        [patch(src[4], 131)],
        [test(api, 31, []), test("tests", 212, [f"{rep}::test_total_value_skips_empty"])],
        report(
            "The API tests pass. One report test fails: `total_value` counts lines of quantity 0 "
            "in the number of lines of an order. That is the second part of the ticket.",
            "Yes, fix the report as well.",
        ),
        [read(src[6])],
        [grep("def total_value", "src", 3)],
        [read(rep)],
        [grep("quantity == 0", ".", 5)],
        [patch(src[6], 44)],
        [test(rep, 18, [])],
        report(
            "Reports skip empty lines now and their tests pass. Before the full run I'll check "
            "the lint, since the validation change added a branch.",
            "Fine.",
        ),
        [sh("ruff check src", 1, f"{src[3]}:36:5: SIM102 Use a single `if` statement instead "
            f"of nested `if` statements\n{src[3]}:41:9: RET505 Unnecessary `else` after "
            "`return` statement\nFound 2 errors.\nNo fixes available (2 hidden fixes can be "
            "enabled with the `--unsafe-fixes` option).")],  # fmt: skip
        [read(src[3], 25, 60)],
        [patch(src[3], 34)],
        [test("tests", 212, []), sh("git status --short", 0, "\n".join(
            f" M {p}" for p in (src[1], src[3], src[4], src[5], src[6])) + "\n?? " + rep.replace(
            ".py", "_empty_lines.py") + "\n M tests/test_orders.py\n M tests/conftest.py\n"
            " M docs/errors.md\n M CHANGELOG.md.orig\n?? .pytest_cache/\n?? .ruff_cache/")],
        report(
            "All 212 tests pass and ruff is clean. Remaining: a CHANGELOG entry.",
            "Add it under Unreleased, one line.",
        ),
        [read("CHANGELOG.md")],
        [patch("CHANGELOG.md", 3)],
        [sh("git diff", 0, "".join(_diff(rng, p, 20 + 13 * i) for i, p in enumerate(src[1:5])))],
    ]  # fmt: skip


def _call_id(rng: random.Random) -> str:
    return "call_" + "".join(rng.choices(string.ascii_letters + string.digits, k=24))


def _turns(rng: random.Random, plan: list[Any], first: int = 0) -> list[dict[str, Any]]:
    """The messages of ``plan``'s items (``first``: the index of its first item, which decides
    whether an assistant turn says something before calling)."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(plan, first):
        if isinstance(item, tuple):
            messages += [
                {"role": "assistant", "content": item[0], "refusal": None},
                {"role": "user", "content": item[1]},
            ]
            continue
        ids = [_call_id(rng) for _ in item]
        messages.append(
            {
                "role": "assistant",
                "content": None if i % 3 else "Let me look at that.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)},
                    }
                    for cid, (name, args, _) in zip(ids, item, strict=True)
                ],
            }
        )
        messages += [
            {"role": "tool", "tool_call_id": cid, "content": result}
            for cid, (_, _, result) in zip(ids, item, strict=True)
        ]
    return messages


def _history(size: int) -> list[dict[str, Any]]:
    """Earlier work of the same session, before the task's last 98 messages: items of fresh
    plans (each its own seed, so every result and call id differs) until their JSON holds
    about ``size`` bytes."""
    messages: list[dict[str, Any]] = []
    total, seed = 0, 1000
    while total < size:
        rng = random.Random(seed)
        for i, item in enumerate(_plan(rng)):
            turn = _turns(rng, [item], i)
            messages += turn
            total += sum(len(json.dumps(m, separators=(",", ":"))) + 1 for m in turn)
            if total >= size:
                break
        seed += 1
    return messages


def conversation(nonce: str = HOLE, size: int = 0) -> dict[str, Any]:
    """The request body, the user's task carrying ``nonce``. ``size`` (bytes; 0: the 100-message
    body of about 65 KB): earlier tool-calling work of the session inserted after the task,
    until the body's JSON holds about that many bytes (the last 98 messages stay the same)."""
    rng = random.Random(15)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK.format(nonce=nonce)},
    ]
    tail = _turns(rng, _plan(rng))
    if size:
        base = len(json.dumps(_body(messages + tail), separators=(",", ":")))
        messages += _history(size - base)
    return _body(messages + tail)


def _body(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "temperature": 0.2,
    }


def tool_calls(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, arguments, result) of every call, in order (read here, not by the proxy)."""
    results = {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}
    return [
        (c["function"]["name"], c["function"]["arguments"], results[c["id"]])
        for m in body["messages"]
        for c in m.get("tool_calls", ())
    ]


def check(body: dict[str, Any], sized: bool = False) -> dict[str, int]:
    """Raise unless the body is what the scenario promises; the tool names called
    ``THRESHOLD`` times or more among the last ``LOOKBACK`` calls, with their counts.
    ``sized``: a body built with a ``size`` (any number of messages and calls)."""
    messages = body["messages"]
    calls = tool_calls(body)
    problems = []
    if len(messages) != 100 and not sized:
        problems.append(f"{len(messages)} messages, not 100")
    if not 40 <= len(calls) <= 50 and not sized:
        problems.append(f"{len(calls)} tool calls")
    least = 150 if sized else 200  # earlier work holds a few shorter `git diff --stat`s
    for name, _, result in calls:
        if not least <= len(result.encode()) <= 2000:
            problems.append(f"a {name} result of {len(result.encode())} bytes")
    for m in messages:
        for c in m.get("tool_calls", ()):
            cid = c["id"]
            if not (cid.startswith("call_") and len(cid) == 29 and cid[5:].isalnum()):
                problems.append(f"call id {cid!r}")
    for i in range(max(1, len(calls) - LOOKBACK + 1)):
        worst = Counter(calls[i : i + LOOKBACK]).most_common(1)[0]
        if worst[1] >= THRESHOLD:
            problems.append(f"{worst[0][0]} repeats {worst[1]} times in calls {i}-{i + LOOKBACK}")
    names = Counter(name for name, _, _ in calls[-LOOKBACK:])
    busy = {name: n for name, n in names.items() if n >= THRESHOLD}
    if len(busy) < 2:
        problems.append(f"only {busy} called {THRESHOLD}+ times among the last {LOOKBACK}")
    if problems:
        raise ValueError("agent body: " + "; ".join(problems))
    return busy


class AgentBody:
    """The body serialised once; ``request(nonce)`` splices a request's nonce in. ``size``:
    bytes of the conversation (0: the 100-message body)."""

    def __init__(self, size: int = 0) -> None:
        body = conversation(size=size)
        check(body, sized=bool(size))
        raw = json.dumps(body, separators=(",", ":")).encode()
        hole = json.dumps(HOLE)[1:-1].encode()
        self.head, self.tail = raw.split(hole)

    def request(self, nonce: int) -> bytes:
        return self.head + str(nonce).encode() + self.tail


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    body = conversation("123", size)
    busy = check(body, sized=bool(size))
    calls = tool_calls(body)
    raw = json.dumps(body, separators=(",", ":")).encode()
    sizes = sorted(len(r.encode()) for _, _, r in calls)
    turns = [m for m in body["messages"] if m.get("tool_calls")]
    print(
        f"{len(body['messages'])} messages, {len(calls)} tool calls in {len(turns)} turns "
        f"({sum(len(m['tool_calls']) == 2 for m in turns)} with two), {len(body['tools'])} tools, "
        f"{len(raw):,} bytes; results {sizes[0]}-{sizes[-1]} bytes (median "
        f"{sizes[len(sizes) // 2]}); calls per tool {dict(Counter(n for n, _, _ in calls))}; "
        f"among the last {LOOKBACK}: {busy} called {THRESHOLD}+ times"
    )


if __name__ == "__main__":
    main()
