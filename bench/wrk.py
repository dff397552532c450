"""The non-streaming scenarios with wrk as the load generator (``python -m bench --wrk``).

wrk (Debian package ``wrk``) is a C load generator: it takes the client's own cost almost out of
the measurement. A Lua script gives every request a unique nonce (so the loop detector never
fires) and checks every answer byte for byte against what the provider sends; the run fails if
one differs. Each target (direct, pass-through, daemon) runs for ``--wrk-seconds`` per round, in
interleaved rounds; req/s, percentiles and CPU per request are the medians of the rounds.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import TIMING_HEAD, markdown, timing_cells
from .servers import chat_answer

_SCRIPT = r"""
-- Unique nonces per thread; every answer compared with the expected body.
local threads = {}
function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  local f = assert(io.open(args[1], "rb"))
  expected = f:read("*a")
  f:close()
  pad = string.rep("x", tonumber(args[2]))
  base = args[3]
  counter, checked, wrong = 0, 0, 0
  headers = {["Content-Type"] = "application/json"}
end
function request()
  counter = counter + 1
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"nonce '
    .. base .. "-" .. id .. "-" .. counter .. " " .. pad .. '"}]}'
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end
function response(status, hdrs, body)
  checked = checked + 1
  if status ~= 200 or body ~= expected then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local checked_all, wrong_all = 0, 0
  for _, t in ipairs(threads) do
    checked_all = checked_all + t:get("checked")
    wrong_all = wrong_all + t:get("wrong")
  end
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    checked_all, wrong_all, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class WrkRound:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us: float | None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def available() -> bool:
    return shutil.which("wrk") is not None


async def run(
    url: str,
    concurrency: int,
    body_bytes: int,
    answer_bytes: int,
    seconds: float,
    nonce: int,
    tmp: Path,
    cpu: str,
) -> tuple[int, float, float, float, float]:
    """One wrk run: (requests, seconds, p50, p90, p99 in ms); raises if any answer was wrong."""
    script, expected = tmp / "bench.lua", tmp / "expected.json"
    script.write_text(_SCRIPT)
    expected.write_bytes(chat_answer(answer_bytes))
    pad = max(0, body_bytes - 200)
    proc = await asyncio.create_subprocess_exec(
        "taskset", "-c", cpu, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s",
        "--timeout", "10s", "-s", str(script), url, "--", str(expected), str(pad), str(nonce),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    match = re.search(rb"^WRK" + rb" (\d+)" * 9 + rb"$", out, re.M)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    requests, micros, checked, wrong, p50, p90, p99, socket_errors, status_errors = map(
        int, match.groups()
    )
    if wrong or status_errors or socket_errors:
        raise RuntimeError(
            f"{url}: {wrong} wrong answers of {checked}, {status_errors} non-2xx, "
            f"{socket_errors} socket errors"
        )
    return requests, micros / 1e6, p50 / 1000, p90 / 1000, p99 / 1000


def median_round(rounds: list[WrkRound]) -> WrkRound:
    cpus = [r.cpu_us for r in rounds if r.cpu_us is not None]
    return WrkRound(
        requests=sum(r.requests for r in rounds),
        seconds=sum(r.requests for r in rounds) / statistics.median(r.rps for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p90_ms=statistics.median(r.p90_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds),
        cpu_us=statistics.median(cpus) if cpus else None,
    )


async def committed_events(url: str) -> int:
    """The events the daemon has recorded, from its /metrics."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    match = re.search(r"^atlasburn_events_committed(?:_total)? (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


def table(rows: list[tuple[str, str, WrkRound, str]]) -> str:
    """rows: (scenario, target, median round, events)."""
    by: dict[str, dict[str, WrkRound]] = {}
    for scenario, target, r, _ in rows:
        by.setdefault(scenario, {})[target] = r
    out = [list(TIMING_HEAD)]
    for scenario, target, r, _ in rows:
        group = by[scenario]
        out.append(timing_cells(scenario, target, r, group["direct"], group["pass-through"]))
    notes = [f"{s}: {events}" for s, _, _, events in rows if events]
    return markdown(out) + "\n\nevents: " + "; ".join(notes)
