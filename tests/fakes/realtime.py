"""A fake Realtime API upstream (OpenAI's ``GET /v1/realtime`` WebSocket), on loopback.

It keeps every handshake's headers and every message it receives (type, data, extra), answers
what the daemon must relay without reading into it, and plays a script:

- on connect it sends ``session.created`` (``session.model`` = ``model``);
- each ``response.create`` is answered by a text delta and a ``response.done`` whose usage is
  the next of ``usages``;
- ``"ping-me"`` makes it send a ping (``b"up-ping"``), ``"binary-me"`` a binary message,
  ``"close-me"`` a close frame (4000, ``"upstream says bye"``), ``"drop-me"`` drop the connection
  without a close frame; a ping it gets is answered with a pong of the same data, and a close
  frame with a close of the same code and reason.

A handshake whose ``model`` query is ``refuse`` gets 403 with ``REFUSAL`` and ``x-request-id``;
``plain`` gets a plain 200 JSON answer (an upstream that does not speak WebSocket); ``redirect``
gets a 302 to ``redirect_to``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

REFUSAL = b'{"error":{"message":"model not allowed","type":"invalid_request_error"}}'


@dataclass
class FakeRealtime:
    model: str = "gpt-realtime"
    usages: list[dict[str, Any]] = field(default_factory=list)
    handshakes: list[dict[str, str]] = field(default_factory=list)
    header_lines: list[list[tuple[str, str]]] = field(default_factory=list)  # each, repeats kept
    received: list[tuple[WSMsgType, Any, Any]] = field(default_factory=list)
    sent: list[tuple[WSMsgType, Any]] = field(default_factory=list)
    protocols: tuple[str, ...] = ()
    url: str = ""
    redirect_to: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/realtime", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        self.header_lines.append(list(request.headers.items()))
        if request.query.get("model") == "refuse":
            return web.Response(
                status=403,
                body=REFUSAL,
                content_type="application/json",
                headers={"x-request-id": "req_refused"},
            )
        if request.query.get("model") == "plain":
            return web.json_response({"object": "list", "data": []})
        if request.query.get("model") == "redirect":
            raise web.HTTPFound(self.redirect_to)
        ws = web.WebSocketResponse(autoclose=False, autoping=False, protocols=self.protocols)
        ws.headers["x-request-id"] = "req_ok"
        await ws.prepare(request)
        await self.text(ws, {"type": "session.created", "session": {"model": self.model}})
        responses = 0
        while True:
            msg = await ws.receive()
            self.received.append((msg.type, msg.data, msg.extra))
            if msg.type is WSMsgType.TEXT:
                if msg.data == "ping-me":
                    await ws.ping(b"up-ping")
                elif msg.data == "binary-me":
                    await ws.send_bytes(b"\x00\xffaudio")
                    self.sent.append((WSMsgType.BINARY, b"\x00\xffaudio"))
                elif msg.data == "close-me":
                    await ws.close(code=4000, message=b"upstream says bye")
                    return ws
                elif msg.data == "drop-me":
                    assert request.transport is not None
                    request.transport.abort()
                    return ws
                elif '"response.create"' in msg.data:
                    usage = self.usages[responses]
                    responses += 1
                    rid = f"resp_{responses}"
                    await self.text(ws, {"type": "response.output_text.delta", "delta": "héllo"})
                    done = {"id": rid, "status": "completed", "usage": usage}
                    await self.text(ws, {"type": "response.done", "response": done})
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type in (WSMsgType.BINARY, WSMsgType.PONG):
                pass  # kept in ``received``
            elif msg.type is WSMsgType.CLOSE:
                await ws.close(code=msg.data, message=msg.extra.encode())
                return ws
            else:
                return ws

    async def text(self, ws: web.WebSocketResponse, event: dict[str, Any]) -> None:
        data = json.dumps(event, ensure_ascii=False)
        self.sent.append((WSMsgType.TEXT, data))
        await ws.send_str(data)
