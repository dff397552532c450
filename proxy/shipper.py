"""The shipper: spooled events to ``POST {api_base}/api/ingest``, at least once.

Every ``telemetry.flush_interval_ms`` (at once while a backlog drains) it sends the next batch of
up to ``telemetry.batch_max_events`` events. A batch keeps its identity (``Idempotency-Key``)
across retries, so the API can drop a duplicate; events leave the spool only after a 2xx.

How each answer is handled:

- 2xx: delivered; its ``guardrail_status`` sets or clears the server-side suspension.
- 429 / 503 with ``Retry-After``: wait that long, then the same batch again.
- connection errors, timeouts, 5xx, other 4xx: exponential backoff with equal jitter, up to
  ``telemetry.max_backoff_seconds``, retried without a time limit.
- 401 / 403: a loud error, then at most one attempt a minute; events keep spooling.
- 400 / 413 / 422: the batch is split to find the event the API refuses (the answer does not say
  which): a batch of up to 64 events into single events, a larger one into about sqrt(n) parts of
  about sqrt(n) events each. So a bad event in a batch of up to 4,096 is alone after at most three
  refused calls (the batch, its part, the event), while the others are delivered on the way. The
  bad event is kept in the store as poisoned (counted).

While the API keeps the org suspended and nothing is waiting, an empty batch asks every
``telemetry.poll_interval_seconds`` whether it still does, so a resume from the dashboard lands.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from email.utils import parsedate_to_datetime

import aiohttp
import orjson

from .auth import HEADER
from .config import Config
from .guardrails import SERVER_LAYER, KillSwitch, Suspension
from .store import Batch, Store

log = logging.getLogger(__name__)

AUTH_RETRY_SECONDS = 60.0
SINGLES = 64  # a refused batch up to this size is split into single events
_MAX_RETRY_AFTER = 3600.0
_ANSWER_LIMIT = 1024 * 1024


class Shipper:
    def __init__(self, config: Config, store: Store, kill: KillSwitch) -> None:
        self._config = config
        self._telemetry = config.telemetry
        self._store = store
        self._kill = kill
        self._url = config.atlasburn.api_base.rstrip("/") + "/api/ingest"
        self._key = config.atlasburn.api_key.reveal()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._attempt = 0  # consecutive failed attempts, for the backoff
        self._auth_failing = False
        # Counters.
        self.batches_shipped = 0
        self.events_shipped = 0
        self.failures_total = 0
        self.last_error: str | None = None

    def start(self) -> None:
        from .tasks import spawn

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._telemetry.request_timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._task = spawn(self._run(), name="shipper")

    async def stop(self) -> None:
        """Stop the loop, then make one bounded last attempt to deliver what is spooled."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        budget = self._telemetry.shutdown_flush_seconds
        if budget > 0 and self._store.pending_events > 0:
            try:
                await asyncio.wait_for(self._final_flush(), budget)
            except TimeoutError:
                pass
            left = self._store.pending_events
            if left:
                log.warning("shipper: %d event(s) stay spooled for the next start", left)
        if self._session is not None:
            await self._session.close()

    async def _final_flush(self) -> None:
        while (batch := await self._store.next_batch(self._telemetry.batch_max_events)) is not None:
            if await self.ship(batch) != "delivered":
                return

    async def _run(self) -> None:
        interval = self._telemetry.flush_interval_ms / 1000
        delay = interval
        while not self._stop.is_set():
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
            try:
                delay = await self._step(interval)
            except Exception:  # the loop must outlive any one failure
                log.exception("shipper: unexpected failure; retrying")
                delay = self._backoff()

    async def _step(self, interval: float) -> float:
        """Ship one batch (or poll); the delay before the next step."""
        batch = await self._store.next_batch(self._telemetry.batch_max_events)
        if batch is None:
            suspension = self._kill.check()
            if suspension is not None and suspension.source == "server":
                await self.ship(Batch(uuid.uuid4().hex, (), ()))
                return self._telemetry.poll_interval_seconds
            return interval
        outcome = await self.ship(batch)
        if outcome == "delivered":
            # A full batch means a backlog, and a batch that was under way (a part of a split
            # one, or a retry) means more of the same: go on without waiting. Otherwise wait, so
            # that steady traffic ships in batches of an interval's events, not in dribbles.
            full = len(batch.event_ids) >= self._telemetry.batch_max_events
            return 0.0 if full or batch.resumed else interval
        if outcome == "split":
            return 0.0
        if outcome == "auth":
            return AUTH_RETRY_SECONDS
        if outcome.startswith("retry-after:"):
            return float(outcome.split(":", 1)[1])
        return self._backoff()

    def _backoff(self) -> float:
        """Equal jitter: uniform in [c/2, c] for c = min(cap, 2^(attempt-1) s), so waits grow
        from about a second to the cap while many daemons coming back after one outage spread
        out (full jitter could retry at once, again and again)."""
        self._attempt += 1
        ceiling = min(self._telemetry.max_backoff_seconds, 2.0 ** (self._attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def ship(self, batch: Batch) -> str:
        """Send one batch: 'delivered', 'split', 'auth', 'retry-after:<s>' or 'retry'."""
        assert self._session is not None
        headers = {
            HEADER: self._key,
            "Idempotency-Key": batch.id,
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(
                self._url, data=batch.payload(), headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                answer = await resp.content.read(_ANSWER_LIMIT)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

        if 200 <= status < 300:
            await self._delivered(batch, answer)
            return "delivered"
        if status in (401, 403):
            self.failures_total += 1
            self.last_error = f"HTTP {status}"
            if not self._auth_failing:
                log.error(
                    "shipper: the AtlasBurn API refused the key (HTTP %d): events keep spooling; "
                    "check atlasburn.api_key (retrying once a minute)",
                    status,
                )
            self._auth_failing = True
            return "auth"
        if status in (400, 413, 422) and batch.event_ids:
            why = f"HTTP {status}: {answer[:200].decode('utf-8', 'replace')}"
            n = len(batch.event_ids)
            if n > 1:
                await self._store.split(batch, n if n <= SINGLES else math.isqrt(n - 1) + 1)
                return "split"
            await self._store.poison(batch, why)
            return "split"
        if status in (429, 503) and retry_after is not None:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                self._failed(f"HTTP {status}, Retry-After {retry_after}")
                return f"retry-after:{seconds}"
        return self._failed(f"HTTP {status}")

    def _failed(self, why: str) -> str:
        self.failures_total += 1
        if self.last_error is None or self._attempt == 0:
            log.warning("shipper: ingest failed (%s); retrying with backoff", why)
        self.last_error = why
        return "retry"

    async def _delivered(self, batch: Batch, answer: bytes) -> None:
        if batch.event_ids:
            await self._store.delivered(batch)
            self.batches_shipped += 1
            self.events_shipped += len(batch.event_ids)
        if self._attempt or self._auth_failing:
            log.warning("shipper: ingest works again (after %s)", self.last_error)
        self._attempt = 0
        self._auth_failing = False
        self.last_error = None
        try:
            parsed = orjson.loads(answer) if answer else {}
        except orjson.JSONDecodeError:
            parsed = {}
        if not isinstance(parsed, dict):
            return
        rejected = parsed.get("rejected")
        if isinstance(rejected, int) and rejected > 0:
            log.warning(
                "shipper: the AtlasBurn API rejected %d event(s) of batch %s", rejected, batch.id
            )
        await self._apply_status(parsed.get("guardrail_status"))

    def report_suspension(self, suspension: Suspension) -> None:
        """A local layer fired: tell the API, in the background (never blocking traffic)."""
        if suspension.source != "local" or self._session is None:
            return
        from .tasks import spawn

        spawn(self._report(suspension), name="report-suspension")

    async def _report(self, suspension: Suspension) -> None:
        assert self._session is not None
        url = self._config.atlasburn.api_base.rstrip("/") + "/api/guardrails/enforce"
        left = suspension.seconds_left(time.time())
        body = {
            "org_id": suspension.org_id,
            "action": "suspend",
            "layer": suspension.layer,
            "ttl_seconds": round(left) if left is not None else None,
            "reason": suspension.reason,
        }
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                async with self._session.post(
                    url, json=body, headers={HEADER: self._key}, allow_redirects=False
                ) as resp:
                    status = resp.status
                    await resp.content.read(_ANSWER_LIMIT)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status, why = 0, type(exc).__name__
            else:
                why = f"HTTP {status}"
            if 200 <= status < 300:
                log.info(
                    "guardrail: reported the %s suspension to the AtlasBurn API", suspension.layer
                )
                return
            if 400 <= status < 500 and status != 429:
                log.error("guardrail: the AtlasBurn API refused the suspension report (%s)", why)
                return
            delay = random.uniform(0, min(self._telemetry.max_backoff_seconds, 2.0**attempt))
            log.warning(
                "guardrail: reporting the suspension failed (%s); retry %d/%d in %.1fs",
                why,
                attempt,
                REPORT_ATTEMPTS,
                delay,
            )
            await asyncio.sleep(delay)
        log.error(
            "guardrail: gave up reporting the %s suspension to the AtlasBurn API", suspension.layer
        )

    async def _apply_status(self, status: object) -> None:
        current = self._kill.check()
        if status == "suspended":
            if current is None or current.source != "server":
                await self._kill.suspend(
                    SERVER_LAYER, "suspended by the AtlasBurn API", None, "server"
                )
        elif status == "ok" and current is not None and current.source == "server":
            await self._kill.clear("resumed by the AtlasBurn API", "server")


REPORT_ATTEMPTS = 10


def _retry_after_seconds(value: str) -> float | None:
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)
