"""Requests that are forms (audio transcriptions, image edits, uploads) through the daemon: the
model and fingerprint come from the form's fields, the body reaches the provider unchanged, and
a body too large to hold still gets both while it streams upstream."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import aiohttp
import openai
import pytest

from proxy.adapters.base import UsageSource
from proxy.fingerprint import fingerprint

from .conftest import RunningDaemon, StartDaemon
from .fakes.provider import FakeProvider

AUDIO = b"RIFF" + bytes(range(256)) * 64  # 16 KiB of "audio"
PNG1 = b"\x89PNG\r\n\x1a\n" + b"first image" * 10
PNG2 = b"\x89PNG\r\n\x1a\n" + b"second image" * 10


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base + "/v1", api_key="sk-test-not-a-real-key", max_retries=0
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def form_fp(endpoint: str, fields: dict[str, Any], files: dict[str, list[bytes]]) -> str:
    """The fingerprint DESIGN and proxy/fingerprint.py describe for a form, written out here:
    SHA-256 of the canonical JSON of kind, endpoint and the form (its non-file fields, and the
    SHA-256 of each file part)."""
    form = {"fields": fields, "files": {k: [sha(v) for v in vs] for k, vs in files.items()}}
    data = json.dumps(
        {"endpoint": endpoint, "form": form, "kind": "openai"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def transcribe(c: openai.AsyncOpenAI, **extra: Any) -> Any:
    args: dict[str, Any] = {
        "model": "gpt-4o-transcribe",
        "file": ("hello.wav", AUDIO),
        "prompt": "Names: Ada, Zoë",
        "language": "en",
        "temperature": 0.2,
        **extra,
    }
    return c.audio.transcriptions.create(**args)


TRANSCRIBE_FIELDS = {
    "model": "gpt-4o-transcribe",
    "prompt": "Names: Ada, Zoë",
    "language": "en",
    "temperature": "0.2",
}


# gpt-4o-transcribe (genai-prices, OpenAI's price page): $2.50 per million text input tokens,
# $6.00 per million audio input tokens, $10.00 per million output tokens.
TRANSCRIBE_IN = (9 * 2.50 + 122 * 6.00) / 1e6  # 9 text and 122 audio input tokens


async def test_transcription_with_the_sdk(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async with client(fake.url) as direct_client, client(daemon.url) as via_client:
        direct = await transcribe(direct_client)
        via = await transcribe(via_client)
    assert via.model_dump() == direct.model_dump()
    assert via.text == "Hello there, this is a test of the transcription endpoint."
    [event] = daemon.events
    assert (event.provider, event.model, event.endpoint, event.status, event.stream) == (
        "openai",
        "gpt-4o-transcribe",
        "/audio/transcriptions",
        200,
        False,
    )
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        131,
        15,
        UsageSource.REPORTED,
    )
    assert event.priced is True
    assert abs(event.cost_usd - (TRANSCRIBE_IN + 15 * 10.00 / 1e6)) <= 1e-12  # 0.0009045
    assert event.fingerprint == form_fp(
        "/audio/transcriptions", TRANSCRIBE_FIELDS, {"file": [AUDIO]}
    )


async def test_streamed_transcription_with_the_sdk(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """``stream=true`` is a form field: the event says stream, and the usage comes from the
    ``transcript.text.done`` event. ``stream`` is transport-only: not in the fingerprint."""
    async with client(daemon.url) as c:
        events = [e.type async for e in await transcribe(c, stream=True)]
    assert events == ["transcript.text.delta", "transcript.text.delta", "transcript.text.done"]
    [event] = daemon.events
    assert (event.model, event.stream, event.tokens_in, event.tokens_out) == (
        "gpt-4o-transcribe",
        True,
        131,
        4,
    )
    assert event.priced is True
    assert abs(event.cost_usd - (TRANSCRIBE_IN + 4 * 10.00 / 1e6)) <= 1e-12  # 0.0007945
    assert event.fingerprint == form_fp(
        "/audio/transcriptions", TRANSCRIBE_FIELDS, {"file": [AUDIO]}
    )


async def test_image_edit_with_the_sdk(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async with client(daemon.url) as c:
        answer = await c.images.edit(
            model="gpt-image-1",
            image=[("a.png", PNG1), ("b.png", PNG2)],
            prompt="Add a red hat",
            size="1024x1024",
        )
    assert answer.usage is not None and answer.usage.total_tokens == 645
    [event] = daemon.events
    assert (event.model, event.endpoint, event.tokens_in, event.tokens_out) == (
        "gpt-image-1",
        "/images/edits",
        373,
        272,
    )
    assert event.priced is True
    # gpt-image-1: $5.00 per million text input tokens, $10.00 per million image input tokens,
    # $40.00 per million output tokens: 50 text, 323 image in, 272 out.
    assert abs(event.cost_usd - (50 * 5.00 + 323 * 10.00 + 272 * 40.00) / 1e6) <= 1e-12
    assert event.fingerprint == form_fp(
        "/images/edits",
        {"model": "gpt-image-1", "prompt": "Add a red hat", "size": "1024x1024"},
        {"image[]": [PNG1, PNG2]},
    )


async def test_a_retry_is_the_same_request(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """Every SDK call draws a new boundary, and a file may come from another temporary path:
    the same audio, model and prompt is still the same fingerprint. Another file, prompt,
    model or temperature is another request."""
    async with client(daemon.url) as c:
        await transcribe(c)
        await transcribe(c, file=("/tmp/tmpk3j9x.wav", AUDIO))
        await transcribe(c, file=("hello.wav", AUDIO + b"\0"))
        await transcribe(c, prompt="Names: Ada")
        await transcribe(c, model="gpt-4o-mini-transcribe")
        await transcribe(c, temperature=0.3)
    boundaries = {r.header("content-type") for r in fake.requests}
    assert len(boundaries) == 6  # six bodies, six boundaries
    fps = [e.fingerprint for e in daemon.events]
    assert fps[0] == fps[1]
    assert len(set(fps)) == 5


async def test_the_loop_detector_counts_identical_uploads(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """An agent that transcribes the same audio over and over is refused on the fourth time
    (the default threshold), as it would be for the same chat request."""
    async with client(daemon.url) as c:
        for _ in range(3):
            await transcribe(c)
        with pytest.raises(openai.RateLimitError) as refused:
            await transcribe(c)
    assert refused.value.response.headers["AtlasBurn-Guardrail"] == "dumb_loop_detector"
    assert len(fake.requests) == 3
    assert [e.status for e in daemon.events] == [200, 200, 200, 429]
    assert daemon.events[-1].model == "gpt-4o-transcribe"


def fixed_body(audio: bytes, boundary: str = "atlasburnTEST") -> bytes:
    return (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + (
            f"\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="model"\r\n\r\n'
            f"gpt-4o-transcribe\r\n--{boundary}--\r\n"
        ).encode()
    )


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_upload_too_large_to_hold_streams_and_is_still_read(
    fake: FakeProvider, start_daemon: StartDaemon, chunked: bool
) -> None:
    """A 3 MiB upload to a daemon that holds at most 64 KiB of a body: it goes upstream byte
    for byte as it arrives (the model field after the file, as the SDKs send it), and the
    event still has its model and the form's fingerprint, not the raw bytes'."""
    daemon = await start_daemon(server={"max_buffered_body_bytes": 65536})
    audio = bytes(range(256)) * (3 * 4096)
    body = fixed_body(audio)
    headers = {"Content-Type": "multipart/form-data; boundary=atlasburnTEST"}

    async def pieces() -> Any:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            daemon.url + "/v1/audio/transcriptions",
            data=pieces() if chunked else io.BytesIO(body),
            headers=headers,
        ) as answer:
            assert answer.status == 200
            await answer.read()
    seen = fake.requests[-1]
    assert (seen.size, seen.digest) == (len(body), sha(body))
    [event] = daemon.events
    assert (event.model, event.tokens_in, event.tokens_out, event.priced) == (
        "gpt-4o-transcribe",
        131,
        15,
        True,
    )
    assert event.fingerprint == form_fp(
        "/audio/transcriptions", {"model": "gpt-4o-transcribe"}, {"file": [audio]}
    )


async def test_a_form_reaches_the_provider_byte_for_byte(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    body = fixed_body(AUDIO)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            daemon.url + "/v1/audio/translations",
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=atlasburnTEST"},
        ) as answer:
            assert answer.status == 200
    assert fake.requests[-1].body == body
    [event] = daemon.events
    assert (event.model, event.endpoint) == ("gpt-4o-transcribe", "/audio/translations")
    assert event.fingerprint == form_fp(
        "/audio/translations", {"model": "gpt-4o-transcribe"}, {"file": [AUDIO]}
    )


async def test_an_urlencoded_form(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            daemon.url + "/v1/audio/transcriptions",
            data={"model": "gpt-4o-transcribe", "prompt": "café", "user": "u-1"},
        ) as answer:
            assert answer.status == 200
    assert fake.requests[-1].body == b"model=gpt-4o-transcribe&prompt=caf%C3%A9&user=u-1"
    [event] = daemon.events
    assert event.model == "gpt-4o-transcribe"
    # (``user`` is transport-only, as in a JSON body)
    assert event.fingerprint == form_fp(
        "/audio/transcriptions", {"model": "gpt-4o-transcribe", "prompt": "café"}, {}
    )


async def test_a_malformed_form_is_fingerprinted_from_its_bytes(
    fake: FakeProvider, daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """It goes through as sent, recorded like any body that is not JSON; the parser's
    complaint is not a warning in the daemon's log (a client's malformed body, maybe a flood of
    them, is not the operator's problem)."""
    body = fixed_body(AUDIO).replace(b"TEST\r\n", b"TESTX\r\n", 1)  # a malformed boundary
    async with aiohttp.ClientSession() as session:
        async with session.post(
            daemon.url + "/v1/audio/transcriptions",
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=atlasburnTEST"},
        ) as answer:
            await answer.read()
    assert fake.requests[-1].body == body
    [event] = daemon.events
    assert event.model == ""
    assert event.fingerprint == fingerprint("openai", "/audio/transcriptions", None, body)
    parser_lines = [r for r in caplog.records if r.name.startswith("python_multipart")]
    assert [r.getMessage() for r in parser_lines if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "path", ["/v1/files", "/v1/uploads/upload_6a1b2c3d/parts", "/anthropic/v1/files"]
)
async def test_identical_file_uploads_are_not_a_loop(
    fake: FakeProvider, daemon: RunningDaemon, path: str
) -> None:
    """A file of identical 64 MB parts (a zero-filled image), or one batch file uploaded by
    four CI jobs at once, is one fingerprint four times now that forms are fingerprinted by
    content: uploads cost no tokens, so the loop detector does not look at them (it would
    otherwise suspend the org on the fourth)."""
    body = fixed_body(AUDIO)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(
                daemon.url + path,
                data=body,
                headers={"Content-Type": "multipart/form-data; boundary=atlasburnTEST"},
            ) as answer:
                await answer.read()
    assert len(fake.requests) == 5
    assert [e.status for e in daemon.events] == [200] * 5
    assert len({e.fingerprint for e in daemon.events}) == 1
