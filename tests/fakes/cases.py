"""The failing inputs of tests/fixtures/cases/ (copied from the project's shared cases): a
provider that answers each step with the case's exact bytes, and the steps to send.

A case folder holds ``case.json`` (its format: tests/fixtures/cases/README.md) and the files it
names. ``CaseProvider`` answers the n-th request it gets with step n's ``upstream`` (or
``upstream_when_stream_options`` when the relayed body asks for ``stream_options``), headers
and body exactly as written, with a Content-Length or, for ``chunked``, in chunks of at most
64 KiB; it keeps what it was sent. A ``websocket`` step's upstream speaks WebSocket on the
step's path (as the provider does): a WebSocket handshake there is accepted (its headers kept
in ``handshakes``) and the socket held open until the client closes it; any other request gets
the step's ``upstream`` answer (the provider's answer to a request that is not an upgrade).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

CASES = Path(__file__).parent.parent / "fixtures" / "cases"


@dataclass
class Case:
    name: str
    folder: Path
    steps: list[dict[str, Any]]
    expected: dict[str, Any]

    @classmethod
    def load(cls, name: str) -> Case:
        folder = CASES / name
        data = json.loads((folder / "case.json").read_text())
        return cls(name, folder, data["steps"], data["expected"])

    def file(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()


@dataclass
class CaseProvider:
    case: Case
    # Files the case names but does not ship (a large body made by a script): name -> path.
    made: dict[str, Path] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)
    handshakes: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)
        return app

    def body(self, name: str) -> bytes:
        if name in self.made:
            return self.made[name].read_bytes()
        return self.case.file(name)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sent = await request.read()
        self.received.append(sent)
        step = self.case.steps[min(len(self.received), len(self.case.steps)) - 1]
        if "websocket" in step and request.path_qs == step["websocket"]["path"]:
            ws = web.WebSocketResponse()
            if ws.can_prepare(request).ok:
                self.handshakes.append(dict(request.headers))
                await ws.prepare(request)
                async for _ in ws:  # until the client closes
                    pass
                return ws
        answer = step["upstream"]
        if "upstream_when_stream_options" in step and b'"stream_options"' in sent:
            answer = step["upstream_when_stream_options"]
        body = self.body(answer["body_file"])
        headers = [(k, v) for k, v in answer["headers"]]
        if not answer.get("chunked"):
            response = web.Response(status=answer["status"], body=body)
            for k, v in headers:
                response.headers.add(k, v)
            return response
        stream = web.StreamResponse(status=answer["status"])
        for k, v in headers:
            stream.headers.add(k, v)
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        for i in range(0, len(body), 65536):
            await stream.write(body[i : i + 65536])
        await stream.write_eof()
        return stream
