"""A fake AtlasBurn API: ``POST /api/ingest``, recording every call, with programmable faults.

``plan`` is a list of answers to give, one per call, before answering normally: an int status
(with an error body), or ``("retry-after", status, seconds)``. ``poison`` is a set of fingerprints
the API refuses with 422 whenever a batch carries one. ``guardrail_status`` is what a 2xx says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def ingest_event(i: int = 0, **changes: Any) -> dict[str, Any]:
    """A valid event in the ingest schema, its fingerprint made of ``i``."""
    return {
        "ts": "2026-11-29T01:55:24.123Z",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "endpoint": "/chat/completions",
        "status": 200,
        "tokens_in": 100 + i,
        "tokens_out": 20,
        "cost_usd": 0.0000270,
        "latency_ms": 812,
        "fingerprint": "sha256:" + f"{i:064x}",
        "stream": False,
        **changes,
    }


@dataclass
class Call:
    at: float
    key: str | None
    idempotency_key: str | None
    events: list[dict[str, Any]]
    status: int


@dataclass
class FakeIngest:
    api_key: str = "abn_test_fake_ingest_key"
    plan: list[Any] = field(default_factory=list)
    poison: set[str] = field(default_factory=set)
    guardrail_status: str = "ok"
    down: bool = False  # answer 503 (no Retry-After) while set
    refuse: Callable[[dict[str, Any]], bool] | None = None  # also refused with 422, like poison
    calls: list[Call] = field(default_factory=list)
    enforce_calls: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/ingest", self.handle)
        app.router.add_post("/api/guardrails/enforce", self.enforce)
        return app

    async def enforce(self, request: web.Request) -> web.Response:
        if request.headers.get("AtlasBurn-API-Key") != self.api_key:
            return web.json_response({"error": "invalid key"}, status=401)
        body = await request.json()
        self.enforce_calls.append(body)
        return web.json_response(
            {
                "ok": True,
                "kv_key": f"guardrail:{body['org_id']}",
                "state": "suspended",
                "expires_at": None,
            }
        )

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        events = body["events"]
        key = request.headers.get("AtlasBurn-API-Key")
        call = Call(time.monotonic(), key, request.headers.get("Idempotency-Key"), events, 0)
        self.calls.append(call)
        response = self.answer(key, events)
        call.status = response.status
        return response

    def answer(self, key: str | None, events: list[dict[str, Any]]) -> web.Response:
        if key != self.api_key:
            return web.json_response({"error": "invalid key"}, status=401)
        if self.plan:
            step = self.plan.pop(0)
            if isinstance(step, tuple):
                _, status, seconds = step
                return web.json_response(
                    {"error": "slow down"}, status=status, headers={"Retry-After": str(seconds)}
                )
            return web.json_response({"error": "planned failure"}, status=step)
        if self.down:
            return web.json_response({"error": "unavailable"}, status=503)
        if any(
            e.get("fingerprint") in self.poison or (self.refuse is not None and self.refuse(e))
            for e in events
        ):
            return web.json_response({"error": "invalid event"}, status=422)
        return web.json_response(
            {"accepted": len(events), "rejected": 0, "guardrail_status": self.guardrail_status}
        )

    # What was delivered (2xx answers only).
    def delivered(self) -> list[dict[str, Any]]:
        return [e for c in self.calls if 200 <= c.status < 300 for e in c.events]

    def delivered_fingerprints(self) -> set[str]:
        return {e["fingerprint"] for e in self.delivered()}
