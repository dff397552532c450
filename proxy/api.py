"""The local mirror of the AtlasBurn API: ``POST /api/ingest`` and ``/api/guardrails/enforce``.

Every call needs ``AtlasBurn-API-Key`` (401 without the right one). Ingest: The body is one event or
``{"events": [...]}``; each event is validated on its own: good ones are spooled (and shipped
like the daemon's own) and fed to the loop detector at their own ``ts`` (a repeat of the same
event once: ``LoopGuard.observe_ingested``), bad ones are counted in ``rejected`` with the
reason, never stored. A body that is not JSON, or not an event or batch, is 400; a body over the
limit is 413; another org is 403. Nothing a client sends makes this answer 500.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson
from aiohttp import web

from .auth import HEADER, KeyChecker
from .browsers import own_origin
from .encoding import decode_body
from .events import InvalidEvent, parse_event
from .guardrails import KillSwitch, LoopGuard
from .store import Store
from .text import inert
from .ui.sessions import Sessions

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
        self,
        keys: KeyChecker,
        store: Store,
        kill: KillSwitch,
        org_id: str,
        max_body: int,
        loop: LoopGuard | None = None,
    ) -> None:
        self._keys = keys
        self._store = store
        self._kill = kill
        self._loop = loop
        self._org_id = org_id
        self._max_body = max_body
        self.sessions: Sessions | None = None  # the status page's logins (``proxy.ui``)

    def authorize(self, request: web.Request, session: bool = True) -> web.Response | None:
        """None when the key is right, or (``session``) the request carries a session cookie of
        the status page (a state change only from the daemon's own page:
        ``browsers.own_origin``), else the 401 (403) to answer."""
        if self._keys.check(request.headers.get(HEADER)):
            return None
        if session and self.sessions is not None and self.sessions.carried_by(request):
            if request.method in ("GET", "HEAD") or own_origin(request.headers):
                return None
            return error(
                403,
                "cross_origin_request",
                "a change made with the status page's session must come from the page itself",
            )
        if HEADER not in request.headers:
            return error(401, "unauthorized", f"missing {HEADER} header")
        return error(401, "unauthorized", f"wrong {HEADER}")

    async def read_json(self, request: web.Request) -> Any:
        """The parsed body (decoded first when it has a Content-Encoding: gzip, deflate, br), or
        an error response (413, 400) to answer instead."""
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
        body = b"".join(chunks)
        encoding = request.headers.get("Content-Encoding")
        if encoding is not None and body:
            # (aiohttp no longer inflates request bodies: the same bound as a plain one)
            plain = decode_body(body, encoding, self._max_body)
            if plain is None:
                raise _Refusal(
                    error(
                        400,
                        "invalid_encoding",
                        f"body is not valid {inert(encoding, 32)} or decodes to over "
                        f"{self._max_body} bytes",
                    )
                )
            body = plain
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _Refusal(error(400, "invalid_json", f"body is not JSON: {exc}")) from None

    async def ingest(self, request: web.Request) -> web.StreamResponse:
        refused = self.authorize(request, session=False)  # the page never posts events
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
            if self._loop is not None and self._loop.enabled:
                self._loop.observe_ingested(event)  # at its own ts, a repeat once
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


_LAYER = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TTL = 30 * 86400
_POST_FIELDS = {"org_id", "action", "layer", "ttl_seconds", "reason"}
_DELETE_FIELDS = {"org_id", "reason"}


class _Bad(Exception):
    pass


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _Bad) -> Any:
    if name not in body:
        if default is _Bad:
            raise _Bad(f"{name}: required")
        return default
    value = body[name]
    if kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _Bad(f"{name}: expected {'a number' if kind is float else 'a string'}")
    return value


MAX_REASON = 1000


def _reason(body: dict[str, Any]) -> str:
    """The ``reason`` as it is kept: up to 1000 characters are accepted (400 beyond), and what is
    stored, logged, shown by ``status`` and put into 429 messages is ``inert`` (at most 256
    printable characters, a longer one cut with a trailing ``…``)."""
    reason = _field(body, "reason", str, "")
    if len(reason) > MAX_REASON:
        raise _Bad(f"reason: at most {MAX_REASON} characters")
    return inert(reason)


class GuardrailsAPI:
    """``/api/guardrails/enforce``: POST suspends, DELETE resumes, GET reads (docs/contract.md)."""

    def __init__(self, local: LocalAPI, store: Store, kill: KillSwitch, who: str) -> None:
        self._local = local
        self._store = store
        self._kill = kill
        self._who = who

    def _state(self, *, details: bool) -> dict[str, Any]:
        current = self._kill.check()
        answer: dict[str, Any] = {
            "ok": True,
            "kv_key": self._kill.key,
            "state": "suspended" if current else "ok",
            "expires_at": current.expires_iso() if current else None,
        }
        if details:
            answer["layer"] = current.layer if current else None
            answer["reason"] = current.reason if current else None
        return answer

    def _org(self, org: Any) -> web.Response | None:
        if not isinstance(org, str) or not org:
            return error(400, "invalid_body", "org_id: required")
        if org != self._kill.org_id:
            return error(403, "forbidden", f"this daemon serves org {self._kill.org_id!r}")
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        refused = self._local.authorize(request)
        if refused is not None:
            return refused
        if request.method == "GET":
            wrong = self._org(request.query.get("org_id"))
            return wrong or web.json_response(self._state(details=True))
        if request.method not in ("POST", "DELETE"):
            return error(405, "method_not_allowed", "use GET, POST or DELETE")
        try:
            body = await self._local.read_json(request)
        except _Refusal as refusal:
            refusal.response.force_close()
            return refusal.response
        if not isinstance(body, dict):
            return error(400, "invalid_body", "expected a JSON object")
        wrong = self._org(body.get("org_id"))
        if wrong is not None:
            return wrong
        try:
            if request.method == "POST":
                return await self._suspend(body)
            return await self._resume(body)
        except _Bad as exc:
            return error(400, "invalid_body", str(exc))

    async def _suspend(self, body: dict[str, Any]) -> web.Response:
        extra = sorted(set(body) - _POST_FIELDS)
        if extra:
            raise _Bad(f"unknown field(s): {', '.join(extra)}")
        if _field(body, "action", str) != "suspend":
            raise _Bad("action: expected 'suspend' (DELETE resumes)")
        layer = _field(body, "layer", str, "manual")
        if not _LAYER.fullmatch(layer):
            raise _Bad("layer: 1-64 characters of letters, digits and _ . : -")
        ttl = _field(body, "ttl_seconds", float)
        if not 0 < ttl <= MAX_TTL:
            raise _Bad(f"ttl_seconds: expected more than 0 and at most {MAX_TTL}")
        reason = _reason(body)
        await self._kill.suspend(layer, reason, float(ttl), "api")
        await self._audit("suspend", layer, float(ttl), reason)
        return web.json_response(self._state(details=False))

    async def _resume(self, body: dict[str, Any]) -> web.Response:
        extra = sorted(set(body) - _DELETE_FIELDS)
        if extra:
            raise _Bad(f"unknown field(s): {', '.join(extra)}")
        reason = _reason(body)
        await self._kill.clear(reason, "api")
        await self._audit("resume", None, None, reason)
        return web.json_response(self._state(details=False))

    async def _audit(self, action: str, layer: str | None, ttl: float | None, reason: str) -> None:
        log.warning(
            "audit: %s %s org=%s layer=%s ttl=%s reason=%r",
            self._who,
            action,
            self._kill.org_id,
            layer,
            ttl,
            reason,
        )
        try:
            await self._store.audit(self._who, action, self._kill.org_id, layer, ttl, reason)
        except Exception:
            log.exception("audit: could not store the audit record (logged above)")
