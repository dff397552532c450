"""The local mirror of the AtlasBurn API: ``POST /api/ingest``.

Every call needs ``AtlasBurn-API-Key`` (401 without the right one). The body is one event or
``{"events": [...]}``; each event is validated on its own: good ones are spooled (and shipped
like the daemon's own), bad ones are counted in ``rejected`` with the reason, never stored. A body
that is not JSON, or not an event or batch, is 400; a body over the limit is 413; another org is
403. Nothing a client sends makes this answer 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from .auth import HEADER, KeyChecker
from .events import InvalidEvent, parse_event
from .guardrails import KillSwitch
from .store import Store

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 10_000


def error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"code": code, "message": message}}),
        content_type="application/json",
    )


class LocalAPI:
    def __init__(
        self, keys: KeyChecker, store: Store, kill: KillSwitch, org_id: str, max_body: int
    ) -> None:
        self._keys = keys
        self._store = store
        self._kill = kill
        self._org_id = org_id
        self._max_body = max_body

    def authorize(self, request: web.Request) -> web.Response | None:
        """None when the key is right, else the 401 to answer."""
        if self._keys.check(request.headers.get(HEADER)):
            return None
        if HEADER not in request.headers:
            return error(401, "unauthorized", f"missing {HEADER} header")
        return error(401, "unauthorized", f"wrong {HEADER}")

    async def read_json(self, request: web.Request) -> Any:
        """The parsed body, or an error response (413, 400) to answer instead."""
        length = request.content_length
        if length is not None and length > self._max_body:
            raise _Refusal(error(413, "body_too_large", f"body over {self._max_body} bytes"))
        chunks = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                raise _Refusal(error(413, "body_too_large", f"body over {self._max_body} bytes"))
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise _Refusal(error(400, "invalid_json", f"body is not JSON: {exc}")) from None

    async def ingest(self, request: web.Request) -> web.StreamResponse:
        refused = self.authorize(request)
        if refused is not None:
            return refused
        try:
            body = await self.read_json(request)
        except _Refusal as refusal:
            refusal.response.force_close()
            return refusal.response
        if isinstance(body, dict) and "events" in body:
            events = body["events"]
            if not isinstance(events, list):
                return error(400, "invalid_body", "'events' must be an array of events")
            org = body.get("org_id", self._org_id)
            if org != self._org_id:
                return error(403, "forbidden", f"this daemon serves org {self._org_id!r}")
            extra = sorted(set(body) - {"events", "org_id"})
            if extra:
                return error(400, "invalid_body", f"unknown field(s): {', '.join(extra)}")
        elif isinstance(body, dict):
            events = [body]
        else:
            return error(400, "invalid_body", 'expected an event object or {"events": [...]}')
        if len(events) > MAX_BATCH_EVENTS:
            return error(413, "too_many_events", f"at most {MAX_BATCH_EVENTS} events per call")
        accepted = 0
        errors = []
        for index, obj in enumerate(events):
            try:
                event = parse_event(obj)
            except InvalidEvent as exc:
                errors.append({"index": index, "error": str(exc)})
                continue
            self._store.enqueue(event)
            accepted += 1
        return web.Response(
            body=orjson.dumps(
                {
                    "accepted": accepted,
                    "rejected": len(errors),
                    "guardrail_status": self._kill.status,
                    "errors": errors,
                }
            ),
            content_type="application/json",
        )


class _Refusal(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response
