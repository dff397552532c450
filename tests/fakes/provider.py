"""A fake LLM provider: replays recorded wire fixtures (JSON and SSE) and injects faults.

It speaks OpenAI (``/v1/...``), Azure OpenAI (``/openai/deployments/...``), Anthropic
(``/v1/messages``) and Gemini (``/v1beta/models/...:generateContent``). Requests choose a fixture
by path and body (``"stream": true`` picks the SSE recording; for chat and
completions ``stream_options.include_usage`` picks the recording with the usage chunk). Test-only
request headers inject faults:

- ``x-fake-status: N`` answer N with the recorded error body;
- ``x-fake-fault``: ``hang`` (never answer), ``stall`` (send the first event, then go silent),
  ``gate`` (send the first event, then the rest once the test sets ``gate``),
  ``cut`` (send half the events, then drop the connection), ``gzip`` / ``gzip-chunked`` /
  ``deflate`` (compress the body, with Content-Length / chunked), ``bomb`` / ``bomb-sse`` (a
  JSON / SSE answer of about 1 MiB of gzip that inflates to 1 GiB of zeros: ``gzip_bomb``),
  ``redirect`` (302 elsewhere), ``corrupt`` (with ``x-fake-encoding``: a stream's first event,
  then bytes that do not decode, then silence),
  ``reject-stream-options`` (400 for a body with ``stream_options``; compressed in
  ``x-fake-encoding`` if named),
  ``echo-headers`` (answer the request headers as JSON), ``hop-response`` (answer with hop-by-hop
  headers);
- ``x-fake-fixture: <folder>/<name>``: answer that recording (SSE for ``.sse``, else JSON)
  instead of the one the path and body pick;
- ``x-fake-delay-ms: N`` wait N ms between SSE events;
- ``x-fake-encoding: gzip | br | deflate | zstd | identity``, or several stacked (``gzip, br``:
  gzip, then brotli), and ``x-fake-framing: length | chunked``: a JSON answer compressed so, sent
  with Content-Length or chunked (in three pieces); a stream compressed so, event by event
  (each flushed), whatever the request's Accept-Encoding says; ``x-fake-encoding-lines: split``
  sends stacked codings as one ``Content-Encoding`` line each;
- ``x-fake-location: URL``: with ``redirect``, where the 302 points;
- ``x-fake-chunks: N`` (with ``x-fake-delay-ms``): a chat stream of N content chunks, then the
  finish chunk and ``[DONE]``; ``x-fake-bytes: N``: a stream of N bytes of SSE comments (``:``
  lines) before them, as fast as the reader takes them.

Every request is kept in ``requests``; ``stream_ends`` records, per stream, when it ended and
whether the peer went away (``"disconnected"``) or it was sent in full (``"done"``).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli
from aiohttp import web
from backports import zstd

FIXTURES = Path(__file__).parent.parent / "fixtures"


def fixture(provider: str, name: str) -> bytes:
    return (FIXTURES / provider / name).read_bytes()


def sse_events(raw: bytes) -> list[bytes]:
    """The events of an SSE recording, each with its terminating blank line (LF or CRLF)."""
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    return [part + sep for part in raw.split(sep) if part.strip()]


BIG = 1 << 20  # request bodies over this are kept as size and digest only
# The field a multipart form (an audio transcription) asks for a stream with, as the SDKs send it.
_FORM_STREAM = b'Content-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'

def _coding_lines(resp: web.StreamResponse, request: web.Request, encoding: str) -> None:
    """``Content-Encoding: encoding``; with ``x-fake-encoding-lines: split``, one header line per
    coding (as a CDN that adds its own coding sends them: one list, RFC 9110 section 5.3)."""
    if not encoding:
        return
    if request.headers.get("x-fake-encoding-lines") == "split":
        for coding in encoding.split(","):
            resp.headers.add("Content-Encoding", coding.strip())
    else:
        resp.headers["Content-Encoding"] = encoding


class Packer:
    """Compresses a body piece by piece in one Content-Encoding value (codings stacked in the
    order named), each piece flushed so that it can be decoded as it arrives."""

    def __init__(self, encoding: str) -> None:
        self.layers = [self._layer(c.strip()) for c in encoding.split(",")]

    @staticmethod
    def _layer(coding: str) -> Any:
        if coding in ("gzip", "x-gzip", "deflate"):
            c = zlib.compressobj(6, zlib.DEFLATED, 15 if coding == "deflate" else 31)
            return (
                lambda d: c.compress(d) + c.flush(zlib.Z_SYNC_FLUSH),
                lambda: c.flush(),
            )
        if coding == "br":
            b = brotli.Compressor()
            return (lambda d: b.process(d) + b.flush(), lambda: b.finish())
        if coding == "zstd":
            z = zstd.ZstdCompressor()
            return (
                lambda d: z.compress(d, zstd.ZstdCompressor.FLUSH_BLOCK),
                lambda: z.flush(zstd.ZstdCompressor.FLUSH_FRAME),
            )
        assert coding == "identity", coding
        return (lambda d: d, lambda: b"")

    def pack(self, data: bytes) -> bytes:
        for piece, _ in self.layers:
            data = piece(data)
        return data

    def end(self) -> bytes:
        data = b""
        for piece, end in self.layers:
            data = piece(data) + end() if data else end()
        return data


def compress(encoding: str, data: bytes) -> bytes:
    packer = Packer(encoding)
    return packer.pack(data) + packer.end()


COMPRESS = {
    "gzip": functools.partial(gzip.compress, mtime=0),  # (the same bytes every second)
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
    "identity": lambda data: data,
}


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MiB of gzip that inflates to 1 GiB of zeros (made in milliseconds: one block
    compressed once and repeated; the trailer's checksum is not that of the whole, which no
    bounded reader ever reaches)."""
    zeros = bytes(4 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes every time now
    return first + block * 255 + c.flush()


def long_stream_events(n: int) -> list[bytes]:
    """A chat completion stream of ``n`` one-word content chunks, a finish chunk and [DONE]."""
    base = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    out = []
    for i in range(n):
        delta = {"content": f"w{i} "}
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out.append(b"data: " + json.dumps(done).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes  # b"" for a body over BIG: see size and digest
    size: int = 0
    digest: str = ""  # SHA-256 of the body, hex

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StreamEnd:
    at: float
    how: str


@dataclass
class FakeProvider:
    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    stream_ends: list[StreamEnd] = field(default_factory=list)
    connections: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # for x-fake-fault: gate
    sent: int = 0  # SSE events written (for gate: what the provider has let go of so far)

    def connected(self) -> None:
        self.connections += 1

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)  # "." misses a newline
        return app

    def pick(self, path: str, query: str, body: Any, fault: str) -> tuple[str, str, str]:
        """(provider folder, fixture name, how to send it: json | sse | json-stream)."""
        stream = isinstance(body, dict) and body.get("stream") is True
        usage = (
            isinstance(body, dict)
            and isinstance(body.get("stream_options"), dict)
            and body["stream_options"].get("include_usage") is True
        )
        if path.endswith("/messages/count_tokens"):
            return "anthropic", "count_tokens.json", "json"
        if path.endswith("/messages"):
            if not stream:
                return "anthropic", "message.json", "json"
            if fault == "stream-error":
                return "anthropic", "message_stream_error.sse", "sse"
            tools = isinstance(body, dict) and bool(body.get("tools"))
            return "anthropic", "message_stream_tool.sse" if tools else "message_stream.sse", "sse"
        if ":generateContent" in path:
            return "gemini", "generate_content.json", "json"
        if ":streamGenerateContent" in path:
            if "alt=sse" in query:
                return "gemini", "stream_generate_content.sse", "sse"
            return "gemini", "stream_generate_content.json", "json-stream"
        vendor = "azure" if path.startswith("/openai/") else "openai"
        if path.endswith("/chat/completions"):
            if stream:
                name = "chat_completion_stream_usage.sse" if usage else "chat_completion_stream.sse"
                return vendor, name, "sse"
            return vendor, "chat_completion.json", "json"
        if path.endswith("/completions"):
            if stream:
                name = "completion_stream_usage.sse" if usage else "completion_stream.sse"
                return "openai", name, "sse"
            return "openai", "completion.json", "json"
        if path.endswith("/embeddings"):
            return "openai", "embeddings.json", "json"
        if path.endswith("/responses"):
            return (
                ("openai", "response_stream.sse", "sse")
                if stream
                else ("openai", "response.json", "json")
            )
        if path.endswith(("/audio/transcriptions", "/audio/translations")):
            if stream:
                return "openai", "transcription_stream.sse", "sse"
            return "openai", "transcription.json", "json"
        if path.endswith(("/images/edits", "/images/variations")):
            return "openai", "image_edit.json", "json"
        if path.endswith("/models"):
            return "openai", "models.json", "json"
        return "openai", "error_401.json", "json"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        parts = []
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            if size <= BIG:
                parts.append(chunk)
        raw = b"".join(parts) if size <= BIG else b""
        self.requests.append(
            Seen(
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                list(request.headers.items()),
                raw,
                size,
                digest.hexdigest(),
            )
        )
        fault = request.headers.get("x-fake-fault", "")
        if fault == "hang":
            await asyncio.sleep(3600)
        if fault in ("bomb", "bomb-sse"):
            kind = "application/json" if fault == "bomb" else "text/event-stream"
            return web.Response(
                body=gzip_bomb(), headers={"Content-Type": kind, "Content-Encoding": "gzip"}
            )
        if fault == "redirect":
            raise web.HTTPFound(request.headers.get("x-fake-location", "http://127.0.0.2:9/stolen"))
        if "x-fake-chunks" in request.headers or "x-fake-bytes" in request.headers:
            return await self.long_stream(request)
        if fault == "hop-response":
            return web.json_response(
                {"ok": True},
                headers={
                    "Connection": "X-Bar",
                    "X-Bar": "per-hop",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Authenticate": "Basic",
                    "X-End": "end-to-end",
                },
            )
        if fault == "echo-headers":
            return web.json_response(
                {"headers": list(request.headers.items())}, headers={"X-Upstream": "yes"}
            )
        if "x-fake-status" in request.headers:
            error = {
                "anthropic": ("anthropic", "error_429.json"),
                "gemini": ("gemini", "error_429.json"),
            }.get(
                "anthropic"
                if "/messages" in request.path
                else "gemini"
                if ":" in request.path
                else "",
                ("openai", "error_401.json"),
            )
            return web.Response(
                status=int(request.headers["x-fake-status"]),
                body=fixture(*error),
                content_type="application/json",
            )
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # (a provider judges such a body; we answer it)
            body = None
        if fault == "reject-stream-options" and isinstance(body, dict) and "stream_options" in body:
            # What a host that does not know the option answers (e.g. older OpenAI-compatible
            # servers); compressed in ``x-fake-encoding`` if named, whatever was accepted.
            refusal = json.dumps(
                {
                    "error": {
                        "message": "Unrecognized request argument supplied: stream_options",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                }
            ).encode()
            coded = request.headers.get("x-fake-encoding", "")
            return web.Response(
                status=400,
                body=compress(coded, refusal) if coded else refusal,
                content_type="application/json",
                headers={"Content-Encoding": coded} if coded else None,
            )
        if body is None and _FORM_STREAM in raw:  # a form (an upload) asking for a stream
            body = {"stream": True}
        if "x-fake-fixture" in request.headers:  # a recording named by the test
            vendor, name = request.headers["x-fake-fixture"].split("/", 1)
            how = "sse" if name.endswith(".sse") else "json"
        else:
            vendor, name, how = self.pick(request.path, request.query_string, body, fault)
        data = fixture(vendor, name)
        if how == "json":
            return await self.json_answer(request, data, fault)
        if how == "json-stream":  # Gemini without alt=sse: one JSON array, element by element
            return await self.stream(
                request,
                data.split(b"\n,\r\n"),
                fault,
                0,
                "application/json; charset=UTF-8",
                b"\n,\r\n",
            )
        return await self.stream(
            request,
            sse_events(data),
            fault,
            float(request.headers.get("x-fake-delay-ms", "0")) / 1000,
        )

    async def long_stream(self, request: web.Request) -> web.StreamResponse:
        chunks = int(request.headers.get("x-fake-chunks", "0"))
        nbytes = int(request.headers.get("x-fake-bytes", "0"))
        delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
        line = b": " + b"p" * 1021 + b"\n"  # 1 KiB per comment line
        filler = [line * (nbytes // len(line))] if nbytes else []
        return await self.stream(
            request, filler + long_stream_events(chunks), "", delay, "text/event-stream"
        )

    async def json_answer(
        self, request: web.Request, data: bytes, fault: str
    ) -> web.StreamResponse:
        headers = {
            "Content-Type": "application/json",
            "x-request-id": "req_fake_123",
            "openai-processing-ms": "42",
        }
        encoding = request.headers.get("x-fake-encoding", "")
        chunked = request.headers.get("x-fake-framing") == "chunked" or fault == "gzip-chunked"
        if fault in ("gzip", "gzip-chunked"):
            encoding = "gzip"
        elif fault == "deflate":
            encoding = "deflate"
        if encoding:
            data = COMPRESS[encoding](data) if encoding in COMPRESS else compress(encoding, data)
        if not chunked:
            whole = web.Response(body=data)
            whole.headers.update(headers)
            _coding_lines(whole, request, encoding)
            return whole
        resp = web.StreamResponse(headers=headers)
        _coding_lines(resp, request, encoding)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        third = len(data) // 3
        for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def stream(
        self,
        request: web.Request,
        events: list[bytes],
        fault: str,
        delay: float,
        content_type: str = "text/event-stream; charset=utf-8",
        separator: bytes = b"",
    ) -> web.StreamResponse:
        if separator:  # pieces of one document: put back what split() took out
            events = [e + separator for e in events[:-1]] + events[-1:]
        resp = web.StreamResponse(
            headers={"Content-Type": content_type, "x-request-id": "req_fake_stream"}
        )
        packer = None
        if (encoding := request.headers.get("x-fake-encoding", "identity")) != "identity":
            packer = Packer(encoding)
            _coding_lines(resp, request, encoding)
        await resp.prepare(request)
        how = "done"
        try:
            for i, event in enumerate(events):
                if fault == "cut" and i == len(events) // 2:
                    assert request.transport is not None
                    request.transport.close()
                    how = "cut"
                    return resp
                await resp.write(event if packer is None else packer.pack(event))
                if fault == "corrupt" and packer is not None:  # then bytes that decode to nothing
                    await resp.write(b"\xff" * 64)
                    await asyncio.sleep(3600)
                self.sent += 1
                if fault == "stall" and i == 0:
                    await asyncio.sleep(3600)
                if fault == "gate" and i == 0:
                    await self.gate.wait()
                if delay:
                    await asyncio.sleep(delay)
            await resp.write_eof(b"" if packer is None else packer.end())
        except (asyncio.CancelledError, ConnectionResetError):
            how = "disconnected"
            raise
        finally:
            self.stream_ends.append(StreamEnd(time.monotonic(), how))
        return resp
