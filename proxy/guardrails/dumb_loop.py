"""The dumb loop detector: identical requests in a sliding window.

``LoopDetector`` counts identical requests (by fingerprint) in a sliding window: the
``threshold``-th within ``window_seconds`` trips it. ``LoopGuard`` puts it in front of the relay
and the local ingest: exemptions, SDK retries, ingested events at their own time, and what a trip
does (suspend the org, or refuse only that fingerprint).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import xxhash

from ..config import LoopDetectorConfig
from ..events import Event, ts_epoch
from .kill_switch import KillSwitch, Suspension

if TYPE_CHECKING:
    from .fleet import Fleet

# In a fleet, an answered request's answer is held back at most this long until Redis has
# counted it (and published it, if it is near the threshold): the client's next identical
# request may reach another daemon a moment later. Only while Redis answers within it: after
# one answer waited in vain, none waits until a batch is counted within it again. A request
# whose fingerprint is two short of the threshold waits at most this long for Redis's count.
# (Here, not in fleet.py: the relay waits with ``acked`` without importing redis-py.)
ACK_WAIT_SECONDS = 0.05

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Trip:
    count: int
    reason: str


class LoopDetector:
    """Counts identical requests in a sliding window, to the microsecond, in about 20 bytes per
    fingerprint.

    A fingerprint is known by the 64-bit xxh3 hash of its text. Almost every fingerprint is seen
    only once, so it is kept as a 12-byte record in one of a few thousand ``bytearray`` buckets,
    chosen by the hash's low bits: the hash's top 48 bits, then the time in microseconds (48
    bits). So 61 bits tell two fingerprints apart (48 and the 13 bits of 8,192 buckets): a
    collision among a million fingerprints has odds near 1 in 4 million, and it counts one
    occurrence too many, where a trip needs ``threshold - 1`` of them.
    Records are looked up with ``bytearray.find``: C speed, and no Python object per fingerprint
    (a dict of them cost about 110 bytes each). They are appended as they are seen, so a bucket
    is in time order and the ones that have left the window are at its front; they are cut off
    as the bucket grows. A fingerprint seen again within the window moves to a dict that holds
    the times of its last ``threshold - 1`` occurrences. There are two generations of that dict,
    each at most ``window_seconds`` old: when the current one is a window old, the previous one
    (all of whose times have left the window) is dropped whole, and so are all buckets once the
    newest record is a window old. Every time is compared with the window on use, so what is kept
    beyond it never counts.

    An occurrence may be counted late (an event posted to the local ingest, at its own time):
    it is stored at its own time, the window is still the one ending at the clock's time, and
    generations rotate on the clock, so counts stay exact in any arrival order. (A late record
    in a bucket can hold back the trimming of expired ones behind it; they still never count.)

    Memory is bounded: a bucket holds at most ``_BUCKET_CAP`` records (two to four times its
    share of ``max_tracked``; past it its oldest record is forgotten), and a generation of
    repeats at most ``max_tracked`` (past it the generation is retired early). Forgetting can
    only let a loop run longer, never refuse an honest request. Nothing is ever rehashed, so no
    call stalls the event loop.
    """

    def __init__(self, config: LoopDetectorConfig) -> None:
        self._repeats: dict[int, tuple[int, ...]] = {}
        self._previous: dict[int, tuple[int, ...]] = {}
        self._buckets: list[bytearray | None] = []
        self._mask = 0
        # Microseconds subtracted from every time, so that it fits 48 bits; it starts (and moves)
        # so that a time a whole window before the clock's is still positive.
        self._epoch = -_HEADROOM
        self._started = -_US_LIMIT  # when the current generation of repeats started
        self._newest = -_US_LIMIT  # when the newest record was added
        self.forgotten = 0  # fingerprints dropped early by a memory bound
        self.configure(config)

    def configure(self, config: LoopDetectorConfig) -> None:
        """New thresholds take effect at once; what was counted so far is kept (but a new
        ``max_tracked`` that changes the number of buckets starts the records afresh)."""
        self.threshold = config.threshold
        self._window = round(config.window_seconds * 1_000_000)
        self.max_tracked = config.max_tracked
        self.allow = frozenset(_hash(f.encode()) for f in config.allow_fingerprints)
        self._label = f"{config.window_seconds:g}s"
        count = 1 << max(6, min(16, (config.max_tracked // _BUCKET_SHARE).bit_length()))
        if len(self._buckets) != count:
            self._buckets = [None] * count
            self._mask = count - 1

    @property
    def label(self) -> str:
        """The window, as reasons name it (``60s``)."""
        return self._label

    def __len__(self) -> int:
        singles = sum(len(b) for b in self._buckets if b) // _RECORD
        return singles + len(self._repeats) + len(self._previous)

    @property
    def window_seconds(self) -> float:
        return self._window / 1_000_000

    def peek(self, fingerprint: str, now: float | None = None) -> int:
        """How many occurrences of ``fingerprint`` the window (ending ``now``, the monotonic
        clock in seconds) holds; nothing is counted or changed."""
        key = _hash(fingerprint.encode())
        if key in self.allow:
            return 0
        if now is None:
            us = time.monotonic_ns() // 1000 - self._epoch
        else:
            us = int(now * 1_000_000) - self._epoch
        cutoff = us - self._window
        times = self._repeats.get(key)
        if times is None and self._previous:
            times = self._previous.get(key)
        if times is not None:
            return sum(1 for t in times if t > cutoff)
        bucket = self._buckets[key & self._mask]
        if bucket is None:
            return 0
        needle = (key >> 16).to_bytes(6, "little")
        pos = bucket.find(needle)
        if pos % _RECORD and pos > 0:
            pos = _aligned_find(bucket, needle, pos)
        if pos < 0:
            return 0
        return int(int.from_bytes(bucket[pos + 6 : pos + _RECORD], "little") > cutoff)

    def observe(
        self, fingerprint: str, now: float | None = None, age: float = 0.0, trip: bool = True
    ) -> Trip | None:
        """Count one occurrence; a Trip when it is the threshold-th within the window.

        ``now``: the monotonic clock in seconds (read when None). ``age``: how many seconds
        before ``now`` the occurrence happened (0 on the relay's path; an ingested event's
        own time otherwise). The window is always the one that ends ``now``: an occurrence
        older than it is not counted, and one counted late leaves it at its own time.
        ``trip=False`` only counts (the relay records an answered request; the next one is
        judged by ``peek``): the latest ``threshold - 1`` times are kept, never a Trip.
        """
        key = _hash(fingerprint.encode())
        if key in self.allow:
            return None
        if now is None:
            us = time.monotonic_ns() // 1000 - self._epoch
        else:
            us = int(now * 1_000_000) - self._epoch
        # Generations rotate on the clock, never on a late occurrence's time: a generation then
        # holds only times from before the next one started, so dropping it a window after
        # that start drops nothing inside the window.
        if us - self._started >= self._window:
            us = self._rotate(us)
        at = us
        if age:
            at = us - round(age * 1_000_000)
            if at <= us - self._window:
                return None
        times = self._repeats.pop(key, None)
        if times is None and self._previous:
            times = self._previous.pop(key, None)
        if times is None:
            index = key & self._mask
            bucket = self._buckets[index]
            needle = (key >> 16).to_bytes(6, "little")
            if bucket is None:  # the bucket's first record
                self._buckets[index] = bytearray(needle + at.to_bytes(6, "little"))
                self._newest = us  # (not ``at``: the clock, which never goes back)
                return None
            pos = bucket.find(needle)
            if pos % _RECORD and pos > 0:  # matched bytes that straddle two records: look on
                pos = _aligned_find(bucket, needle, pos)
            if pos < 0:  # the usual case: a fingerprint not seen in the window
                if not len(bucket) % _TRIM_EVERY:  # every 8th record: cut what has expired
                    self._trim(bucket, us - self._window)
                bucket += needle + at.to_bytes(6, "little")
                self._newest = us
                return None
            times = (int.from_bytes(bucket[pos + 6 : pos + _RECORD], "little"),)
            del bucket[pos : pos + _RECORD]
        cutoff = us - self._window
        recent = tuple(t for t in times if t > cutoff)
        count = len(recent) + 1
        if count >= self.threshold:
            if trip:  # and it is forgotten: the next window counts afresh
                return Trip(count, f"fingerprint {fingerprint} seen {count} times in {self._label}")
            recent = tuple(sorted(recent))[count - self.threshold + 1 :]
        if not recent:  # the earlier occurrences have all left the window: seen once again
            index = key & self._mask
            record = (key >> 16).to_bytes(6, "little") + at.to_bytes(6, "little")
            bucket = self._buckets[index]
            if bucket is None:
                self._buckets[index] = bytearray(record)
            else:
                bucket += record
            self._newest = us
            return None
        if len(self._repeats) >= self.max_tracked:
            self.forgotten += len(self._previous)
            self._rotate(us)
        # Every time inside the window is kept (at most threshold - 2 of them before this one,
        # or it would have tripped), so the order they arrived in never changes a count.
        self._repeats[key] = recent[-(self.threshold - 2) :] + (at,)
        return None

    def forget(self, fingerprint: str) -> None:
        """Drop every occurrence of ``fingerprint`` (a trip elsewhere in the fleet: its count
        starts afresh, as after a trip here)."""
        key = _hash(fingerprint.encode())
        self._repeats.pop(key, None)
        self._previous.pop(key, None)
        bucket = self._buckets[key & self._mask]
        if bucket:
            needle = (key >> 16).to_bytes(6, "little")
            pos = bucket.find(needle)
            if pos % _RECORD and pos > 0:
                pos = _aligned_find(bucket, needle, pos)
            if pos >= 0:
                del bucket[pos : pos + _RECORD]

    def _trim(self, bucket: bytearray, cutoff: int) -> None:
        """Cut the records that have left the window off the front of a growing bucket, and
        the oldest one if it is still full."""
        end, size = 0, len(bucket)
        while end < size and int.from_bytes(bucket[end + 6 : end + _RECORD], "little") <= cutoff:
            end += _RECORD
        if end == 0 and size >= _BUCKET_CAP * _RECORD:
            end = _RECORD
            self.forgotten += 1
        if end:
            del bucket[:end]

    def _rotate(self, us: int) -> int:
        """Start a new generation of repeats at ``us``; the time, which changes only when the
        epoch has to move (every 4.4 years of monotonic time)."""
        self._previous = self._repeats
        self._repeats = {}
        if us - self._newest >= self._window:  # every record has left the window
            self._buckets = [None] * len(self._buckets)
        if us >= _US_LIMIT:
            self.forgotten += len(self)
            self._epoch += us - _HEADROOM
            self._previous, self._buckets = {}, [None] * len(self._buckets)
            us = _HEADROOM
            self._newest = -_US_LIMIT
        self._started = us
        return us


_hash = xxhash.xxh3_64_intdigest
_RECORD = 12  # the hash's top 48 bits, then the time in microseconds (48 bits)
_US_LIMIT = 1 << 47  # times stay below 2**47 microseconds (4.4 years) from the epoch
_HEADROOM = 86_400 * 1_000_000  # the longest window (config allows a day): late times stay >= 0
_BUCKET_SHARE = 32  # buckets: a power of two above max_tracked / 32 (8,192 for 250,000)
_BUCKET_CAP = 2 * _BUCKET_SHARE  # records in a bucket at most
_TRIM_EVERY = 8 * _RECORD  # a bucket is trimmed each time it reaches 8n records


def _aligned_find(bucket: bytearray, needle: bytes, at: int) -> int:
    """The record starting with ``needle``, when a find matched bytes straddling two records."""
    while at >= 0 and at % _RECORD:
        at = bucket.find(needle, at + 1)
    return at


LOOP_LAYER = "dumb_loop_detector"
ALLOW_KEY = "guardrails.dumb_loop_detector.allow_fingerprints"
EXEMPT_KEY = "guardrails.dumb_loop_detector.exempt_header"
_NAMED = re.compile(r"fingerprint (sha256:[0-9a-f]{64})")  # in a trip's reason (``LoopGuard``)


def repeat_hint(reason: str, exempt_header: str) -> str:
    """How to let a repeat that is expected through, for a refusal's message: the fingerprint
    the trip's ``reason`` names for ``allow_fingerprints``, or the ``exempt_header`` (named when
    one is configured)."""
    m = _NAMED.search(reason)
    which = f'"{m.group(1)}"' if m else "its fingerprint (atlasburn-proxy report --by fingerprint)"
    header = (
        f"send the header {exempt_header} with it"
        if exempt_header
        else f"set {EXEMPT_KEY} and send that header with it"
    )
    return f"if this repeat is expected, add {which} to {ALLOW_KEY}, or {header}"


RETRY_HEADER = "x-stainless-retry-count"
_MAX_BLOCKED = 100_000
# An ingested event's ts up to this far ahead of this host's clock counts as now (clocks
# differ a little); further ahead, it is not counted.
FUTURE_SKEW_SECONDS = 5.0
MAX_INGESTED = 100_000  # ingested events remembered (to count a repeat once), at most


class RecentKeys:
    """Keys remembered until their own expiry (monotonic seconds), at most ``limit`` of them:
    past it, the expired ones are dropped, then the oldest remembered half."""

    def __init__(self, limit: int = MAX_INGESTED) -> None:
        self.limit = limit
        self._until: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def add(self, key: int, until: float, now: float) -> bool:
        """Remember ``key`` until ``until``; False when it was already remembered (and not
        expired), True when it is new."""
        known = self._until.get(key)
        if known is not None and known > now:
            return False
        if known is None and len(self._until) >= self.limit:
            kept = {k: t for k, t in self._until.items() if t > now}
            if len(kept) >= self.limit:  # insertion order: the first ones counted are dropped
                kept = dict(itertools.islice(kept.items(), len(kept) // 2, None))
            self._until = kept
        self._until[key] = until
        return True


class LoopGuard:
    """The loop detector in front of the relay: exemptions, SDK retries, and what a trip does
    (``scope = "org"``: the org is suspended for ``ttl_seconds``; ``"fingerprint"``: only that
    request is refused until then).

    What is counted is a request the provider answered (2xx): the relay asks ``check`` when a
    request arrives (refused when the answered ones in the window and it make ``threshold``)
    and ``record``s it once it is answered. A request the provider refuses or that fails costs
    nothing and is no loop; and a neighbour without a provider key, whose requests all get 401,
    cannot suspend the org by sending four of them."""

    def __init__(self, config: LoopDetectorConfig, kill: KillSwitch) -> None:
        self.detector = LoopDetector(config)
        self.kill = kill
        self.blocked: dict[str, Suspension] = {}  # scope "fingerprint" only
        self.ingested = RecentKeys()  # events posted to the local ingest, counted once each
        # With [fleet] redis_url: the fleet's count of fingerprints about to trip, and where
        # this daemon's occurrences go.
        self.fleet: Fleet | None = None
        self.configure(config)

    def configure(self, config: LoopDetectorConfig) -> None:
        self.enabled = config.enabled
        self.detector.configure(config)
        self.ttl = config.ttl_seconds
        self.per_fingerprint = config.scope == "fingerprint"
        self.exempt_header = config.exempt_header

    def counts(self, headers: Any) -> bool:
        """Whether a request with these headers is an occurrence: not exempt (``exempt_header``)
        and not an SDK's retry of one call (``x-stainless-retry-count`` of 1 or more)."""
        if self.exempt_header and headers.get(self.exempt_header):
            return False
        retry = headers.get(RETRY_HEADER)
        return not retry or retry == "0"

    def check(self, fingerprint: str, headers: Any) -> Suspension | None:
        """The refusal for a request arriving, if the loop detector has one: its fingerprint is
        refused (scope ``fingerprint``), or with the answered occurrences in the window it is
        the ``threshold``-th (which trips: the org is suspended, or the fingerprint refused)."""
        if self.blocked:
            blocked = self.blocked.get(fingerprint)
            if blocked is not None:
                if blocked.expires_at is not None and blocked.expires_at > time.time():
                    return blocked
                del self.blocked[fingerprint]
        if not self.counts(headers):
            return None
        threshold = self.detector.threshold
        here = self.detector.peek(fingerprint)
        if here + 1 >= threshold:
            return self.observe(fingerprint)  # this daemon's own count, exact
        fleet = self.fleet
        if fleet is None:
            return None
        # The fleet's count, of the fingerprints about to trip; it includes this daemon's
        # occurrences once they reached Redis, so the larger of the two is the count.
        seen = fleet.count(fingerprint)
        if seen + 1 < threshold:
            return None
        return self._fleet_trip(fleet, fingerprint, seen + 1)

    async def check_fleet(self, fingerprint: str, headers: Any) -> Suspension | None:
        """After ``check`` let a request through: if the fleet's count of its fingerprint is
        two short of the threshold, Redis is asked for the count now (bounded; see
        ``Fleet.warm``), so that the last occurrence elsewhere, answered a moment ago, is not
        missed. The refusal, if the count trips the detector."""
        fleet = self.fleet
        if fleet is None or not fleet.warm(fingerprint) or not self.counts(headers):
            return None
        seen = max(await fleet.fresh_count(fingerprint), self.detector.peek(fingerprint))
        if seen + 1 < self.detector.threshold:
            return None
        return self._fleet_trip(fleet, fingerprint, seen + 1)

    def _fleet_trip(self, fleet: Fleet, fingerprint: str, count: int) -> Suspension:
        """A trip on the fleet's count: every daemon starts the count afresh, this one too."""
        fleet.tripped(fingerprint)
        self.detector.forget(fingerprint)
        reason = f"fingerprint {fingerprint} seen {count} times in {self.detector.label}"
        return self._trip(fingerprint, Trip(count, reason + " across the fleet"))

    def record(self, fingerprint: str) -> asyncio.Future[bool] | None:
        """A request that ``check`` let through was answered (2xx): count it (never a trip
        here: the next one is refused by ``check``), in the fleet too; what the fleet gives to
        wait for (``Fleet.occurrence``)."""
        self.detector.observe(fingerprint, trip=False)
        if self.fleet is not None:
            return self.fleet.occurrence(fingerprint)
        return None

    def observe_ingested(self, event: Event) -> Suspension | None:
        """An event posted to the local /api/ingest with a 2xx status: counted at its own
        ``ts`` when that is inside the window (not older than ``window_seconds``; not further
        ahead of this host's clock than ``FUTURE_SKEW_SECONDS``, a smaller lead counting as
        now), and once however
        often the same event is posted (an ingest retry; the same event is the same ingest
        fields, compared by their 64-bit xxh3). The refusal, if it trips the detector."""
        if not 200 <= event.status < 300:
            return None  # only what the provider answered is an occurrence (see the class)
        age = time.time() - ts_epoch(event.ts)
        if age < -FUTURE_SKEW_SECONDS:
            return None
        age = max(age, 0.0)
        window = self.detector.window_seconds
        if age >= window:
            return None
        now = time.monotonic()
        # Remembered while the event's time is inside the window: a repeat after it has left
        # would not be counted anyway.
        if not self.ingested.add(_hash(orjson.dumps(event.to_ingest())), now - age + window, now):
            return None
        return self.observe(event.fingerprint, age)

    def observe(self, fingerprint: str, age: float = 0.0, share: bool = False) -> Suspension | None:
        """Count one occurrence (``age`` seconds ago; see ``LoopDetector.observe``), in the
        fleet's count too when ``share`` (an answered request; an ingested event is this
        daemon's alone); the refusal when it trips the detector."""
        trip = self.detector.observe(fingerprint, age=age)
        if share and self.fleet is not None:
            self.fleet.occurrence(fingerprint)
        if trip is None:
            return None
        if self.fleet is not None:
            self.fleet.tripped(fingerprint)
        return self._trip(fingerprint, trip)

    def _trip(self, fingerprint: str, trip: Trip) -> Suspension:
        """What a trip does: the org suspended, or (scope ``fingerprint``) this one refused."""
        if not self.per_fingerprint:
            return self.kill.suspend_now(LOOP_LAYER, trip.reason, self.ttl, "local")[0]
        suspension = Suspension(
            self.kill.org_id, LOOP_LAYER, trip.reason, "local", time.time() + self.ttl
        )
        if len(self.blocked) >= _MAX_BLOCKED:
            now = time.time()
            self.blocked = {k: v for k, v in self.blocked.items() if (v.expires_at or 0) > now}
        self.blocked[fingerprint] = suspension
        log.warning(
            "guardrail: %s refused until %s (%s)",
            fingerprint,
            suspension.expires_iso(),
            trip.reason,
        )
        return suspension


def _give_up(ack: asyncio.Future[bool]) -> None:
    if not ack.done():
        ack.set_result(False)


async def acked(ack: asyncio.Future[bool]) -> bool:
    """Wait for ``ack`` (``Fleet.occurrence``) at most ``ACK_WAIT_SECONDS``, timed by the
    daemon: False when Redis was slower. A timer on the future itself, not asyncio.wait or a
    timeout around it: no waiter future and no context manager per answer."""
    timer = asyncio.get_running_loop().call_later(ACK_WAIT_SECONDS, _give_up, ack)
    try:
        return await ack
    finally:
        timer.cancel()
