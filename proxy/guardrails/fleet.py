"""Fleet sync: one org's guardrails shared by every daemon through Redis (docs/contract.md,
"Fleet").

With ``[fleet] redis_url`` set, the daemons of an org share three things. Each guardrail still
decides from this daemon's memory, which a background task keeps in step; a request waits for
Redis only twice, each at most ``ACK_WAIT_SECONDS`` (below).

- The kill flag. Key ``<prefix>guardrail:<org>``: a JSON object (``state``, ``layer``,
  ``reason``, ``source``, ``expires_at`` ISO or null, ``version`` in epoch ms, ``by``) with a
  Redis TTL equal to the time left. Every change made on a daemon (the local API, an operator
  command, a loop or spend trip, an ingest answer) is written by a script that keeps the newer
  of the two versions, and published on ``<prefix>fleet:<org>``; each daemon applies what is
  newer than its own. A clear writes ``state: "ok"`` (kept a day: a daemon that was away cannot
  bring back a flag that was cleared meanwhile). On every (re)connection a daemon writes its own
  state the same way and takes the newer one: an emptied Redis is refilled, a suspension set
  while Redis was away reaches the fleet, and a daemon that starts reads the flag.
- The dumb loop detector's count. Each answered occurrence goes to a sorted set per fingerprint
  (``<prefix>loop:<org>:<fingerprint>``, members kept ``window_seconds``), one script call per
  batch; when the fleet's count reaches ``threshold - 2`` (from a threshold of 4) and
  ``threshold - 1`` — the next identical request trips — the script publishes the fingerprint
  with its latest times, and every daemon remembers it (at most ``MAX_HOT``). A request is
  judged on the larger of this daemon's exact count and the fleet's: what a daemon receives
  grows with the requests that repeat, not with the fleet's traffic. So that the next request,
  sent to another daemon the moment an answer arrives, is judged on the occurrence, an answered
  request's answer waits until Redis has counted it (not while Redis is slower than
  ``ACK_WAIT_SECONDS``), and a request whose fingerprint is two short asks Redis for the count.
  A trip deletes the set and publishes a reset: every daemon forgets the fingerprint.
- The spend cap. Each daemon adds its priced spend, every ``SPEND_FLUSH_SECONDS``, to one hash
  per org (``<prefix>spend:<org>``: minute buckets and rolling hour and day totals, kept up to
  date in O(1) a call); a daemon whose addition takes the fleet over a cap suspends the org
  (and the flag reaches the fleet like any other).
- The budgets (``[[guardrails.budgets]]``). The same scripts as the spend cap's, one hash per
  budget (``<prefix>budget:<org>:<name>``): each daemon adds its spend per budget every
  ``SPEND_FLUSH_SECONDS`` and, in the same round trip, reads back every configured budget's
  totals (an addition of $0 for a budget it did not spend in), at least every
  ``BUDGET_SYNC_SECONDS``; a budget is over on a daemon when the fleet's total is (it refuses
  the requests the budget matches, on every daemon, within about a second). Refilled after a
  Redis loss like the spend cap's.

Redis down, slow, emptied or restarted: every daemon guards alone meanwhile (its own loop
detector, spend cap and flag, as without a fleet), logs the loss once, and reconnects with a
back-off (``RECONNECT_MIN_SECONDS`` doubling to ``RECONNECT_MAX_SECONDS``) for ever; a command
that takes more than ``COMMAND_TIMEOUT_SECONDS`` counts as a loss. Occurrences seen while
disconnected are not replayed (they are in this daemon's own count); spend is (the cap is about
the total).

Redis holds fingerprints, counters, daemon names (host:pid) and the flag: never a provider key,
a prompt or an AtlasBurn key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from ..config import FleetConfig, redis_location
from ..events import iso_ms, ts_epoch
from ..text import inert
from .budgets import Budgets
from .dumb_loop import ACK_WAIT_SECONDS, LoopGuard
from .kill_switch import KillSwitch, Suspension
from .spend import SPEND_LAYER, SpendCap, usd_text

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMAND_TIMEOUT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 2.0
RECONNECT_MIN_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 10.0
HEARTBEAT_SECONDS = 1.0  # an idle connection sends a PING this often (a blackhole is a loss)
SPEND_FLUSH_SECONDS = 0.25
BUDGET_SYNC_SECONDS = 1.0  # the fleet's budget totals are read at least this often
STOP_SECONDS = 5.0
CLEARED_KEPT_SECONDS = 86400
MAX_HOT = 16384  # fingerprints about to trip that a daemon remembers from the fleet
MAX_QUEUED = 65536  # occurrences waiting for Redis; past it the oldest are not sent
MAX_MESSAGE_BYTES = 65536  # a message on the channel larger than this is ignored

# KEYS[1] the flag; ARGV: value (JSON), version (ms), TTL (ms, 0: none), channel.
# Writes the flag unless Redis holds a version at least as new; publishes what it wrote.
# Returns the value Redis keeps when it is newer (the caller applies it), else nothing.
_FLAG = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, obj = pcall(cjson.decode, current)
  if ok and type(obj) == 'table' and tonumber(obj['version']) and
     tonumber(obj['version']) >= tonumber(ARGV[2]) then
    return current
  end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return false
"""

# KEYS: one sorted set per occurrence (a fingerprint's); ARGV: window (ms), threshold, channel,
# daemon, then for each occurrence its time (ms), member and fingerprint. Counts each; when a
# fingerprint's window holds threshold - 1 or more (or, for a threshold of 4 or more,
# threshold - 2: "warm", the next but one trips), publishes it with its latest times (at most
# threshold - 1). One call for a whole batch. Returns the counts.
_OCCURRENCES = """
local window = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local counts = {}
for i, key in ipairs(KEYS) do
  local at = 4 + (i - 1) * 3
  local now = tonumber(ARGV[at + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('ZADD', key, now, ARGV[at + 2])
  redis.call('PEXPIRE', key, window)
  local n = redis.call('ZCARD', key)
  counts[i] = n
  if threshold > 1 and (n >= threshold - 1 or (threshold >= 4 and n >= threshold - 2)) then
    local recent = redis.call('ZRANGE', key, -(threshold - 1), -1, 'WITHSCORES')
    local times = {}
    for j = 2, #recent, 2 do times[#times + 1] = tonumber(recent[j]) end
    redis.call('PUBLISH', ARGV[3], cjson.encode({t = 'hot', fp = ARGV[at + 3], times = times,
                                                 by = ARGV[4]}))
  end
end
return counts
"""

# The spend hash's upkeep, shared by the two scripts below (``h`` and ``now`` set by each):
# minutes leave each window's total as time passes (each once), and an addition.
_SPEND_LIB = """
local function advance(name, span, delete)
  local limit = now - span + 60
  local from = tonumber(redis.call('HGET', h, name .. '_from'))
  if not from then
    from = limit
  elseif limit - from > 86400 then
    -- idle for over a day: recount from what is left
    local total = 0
    local fields = redis.call('HKEYS', h)
    for _, f in ipairs(fields) do
      local m = tonumber(string.match(f, '^m:(%-?%d+)$'))
      if m then
        if m < now - 86400 + 60 then
          redis.call('HDEL', h, f)
        elseif m >= limit then
          total = total + tonumber(redis.call('HGET', h, f))
        end
      end
    end
    redis.call('HSET', h, name, total)
    from = limit
  end
  while from < limit do
    local v = tonumber(redis.call('HGET', h, 'm:' .. from) or '0')
    if v ~= 0 then redis.call('HINCRBYFLOAT', h, name, -v) end
    if delete then redis.call('HDEL', h, 'm:' .. from) end
    from = from + 60
  end
  redis.call('HSET', h, name .. '_from', limit)
end
local function add(minute, usd)
  if usd > 0 and minute >= now - 86400 + 60 then
    redis.call('HINCRBYFLOAT', h, 'm:' .. minute, usd)
    redis.call('HINCRBYFLOAT', h, 'day', usd)
    if minute >= now - 3600 + 60 then redis.call('HINCRBYFLOAT', h, 'hour', usd) end
  end
end
"""

# KEYS[1] the org's spend hash; ARGV: minute (epoch s) of the spend, USD, the current minute,
# hour cap, day cap (0: none). Fields: m:<minute> USD, and for each window ("hour", "day")
# its total and the first minute it still holds ("<window>_from"). Minutes that leave a window
# are taken off its total as time passes (each once: O(1) a call, amortized); minute buckets
# older than a day are deleted. Returns {hour total, day total, seconds until the hour total
# is under its cap, the same for the day} as strings (seconds 0 when under).
_SPEND = (
    """
local h = KEYS[1]
local now = tonumber(ARGV[3])
"""
    + _SPEND_LIB
    + """
advance('hour', 3600, false)
advance('day', 86400, true)
add(tonumber(ARGV[1]), tonumber(ARGV[2]))
redis.call('EXPIRE', h, 90000)
local function until_under(name, span, cap)
  local total = tonumber(redis.call('HGET', h, name) or '0')
  if cap <= 0 or total <= cap then return total, 0 end
  local m = now - span + 60
  local left = total
  while m <= now do
    left = left - tonumber(redis.call('HGET', h, 'm:' .. m) or '0')
    if left <= cap then return total, math.max(m + span - now, 1) end
    m = m + 60
  end
  return total, 60
end
local hour, hour_wait = until_under('hour', 3600, tonumber(ARGV[4]))
local day, day_wait = until_under('day', 86400, tonumber(ARGV[5]))
return {tostring(hour), tostring(day), tostring(hour_wait), tostring(day_wait)}
"""
)

# KEYS[1] the org's spend hash; ARGV: the hash's epoch this daemon knows ('' for none yet), a
# new epoch, the current minute, then (minute, USD) pairs: this daemon's own spend of the last
# day. A hash without an epoch was emptied (a Redis restarted empty): it gets the new one, and
# each daemon that comes back adds its own spend again, once per epoch. Returns the epoch.
_SPEND_REFILL = (
    """
local h = KEYS[1]
local now = tonumber(ARGV[3])
"""
    + _SPEND_LIB
    + """
local epoch = redis.call('HGET', h, 'epoch')
local refill = false
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', h, 'epoch', epoch)
  refill = true
elseif ARGV[1] ~= '' and epoch ~= ARGV[1] then
  refill = true
end
if refill then
  advance('hour', 3600, false)
  advance('day', 86400, true)
  for i = 4, #ARGV - 1, 2 do add(tonumber(ARGV[i]), tonumber(ARGV[i + 1])) end
  redis.call('EXPIRE', h, 90000)
end
return epoch
"""
)


class _Lost(Exception):
    """The connection to Redis is gone (or never came)."""


class Fleet:
    """The fleet sync of one daemon: ``start`` it, ``stop`` it; the guardrails call the rest.

    ``count(fingerprint)`` (the fleet's occurrences in the window, about-to-trip fingerprints
    only) and ``occurrence(fingerprint)``, ``spent(usd)`` are synchronous and O(1): they read
    and queue; the background task talks to Redis."""

    def __init__(
        self,
        config: FleetConfig,
        org_id: str,
        kill: KillSwitch,
        loop: LoopGuard,
        spend: SpendCap,
        budgets: Budgets | None = None,
    ) -> None:
        self.url = config.redis_url.reveal()
        self.where = redis_location(self.url)
        prefix = config.key_prefix
        self.org_id = org_id
        self.flag_key = f"{prefix}guardrail:{org_id}"
        self.channel = f"{prefix}fleet:{org_id}"
        self.loop_prefix = f"{prefix}loop:{org_id}:"
        self.spend_key = f"{prefix}spend:{org_id}"
        self.budget_prefix = f"{prefix}budget:{org_id}:"
        self.name = f"{socket.gethostname()[:64]}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.kill = kill
        self.loop = loop
        self.spend = spend
        spend.fleet = self
        self.budgets = budgets
        if budgets is not None:
            budgets.fleet = self
        self._budget_spend: dict[str, dict[int, float]] = {}  # name -> minute -> USD not sent
        self._budget_epochs: dict[str, str] = {}  # name -> its hash's epoch (as _spend_epoch)
        self._budget_sha = ""  # _SPEND, loaded on this connection
        self.messages_sent = 0
        self.messages_received = 0
        self.reconnects = 0
        self.dropped_occurrences = 0
        self._hot: dict[str, tuple[float, ...]] = {}  # fingerprint -> epoch ms, oldest first
        self._occurrences: deque[tuple[str, int, asyncio.Future[bool] | None]] = deque()
        self._acks_fast = True  # Redis counted the last batch within ACK_WAIT_SECONDS
        self._resets: deque[str] = deque(maxlen=MAX_QUEUED)  # tripped: to forget fleet-wide
        self._client: redis.Redis | None = None  # set while connected
        self._spend_script: Any = None
        self._spend_epoch = ""  # the spend hash's epoch this daemon's own spend is part of
        self._stopping = False
        self._spend: dict[int, float] = {}  # minute (epoch s) -> USD not yet added
        self._flag_dirty = False
        self._wake = asyncio.Event()
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        kill.watchers.append(self._kill_changed)
        loop.fleet = self

    @property
    def connected(self) -> bool:
        return self._client is not None

    # ------------------------------------------------------------------ the guardrails' side

    def count(self, fingerprint: str, now: float | None = None) -> int:
        """How many occurrences of ``fingerprint`` the fleet's window holds, as last published
        (0 unless it is about to trip)."""
        times = self._hot.get(fingerprint)
        if times is None:
            return 0
        cutoff = ((time.time() if now is None else now) - self.loop.detector.window_seconds) * 1000
        n = sum(1 for t in times if t > cutoff)
        if n == 0:
            del self._hot[fingerprint]
        return n

    def occurrence(self, fingerprint: str) -> asyncio.Future[bool] | None:
        """An answered request counted by this daemon's loop detector: the fleet's too. A
        future done (True) once Redis has counted it, for the relay to hold the answer back by
        at most ``ACK_WAIT_SECONDS`` (``acked``); None when there is nothing to wait for
        (disconnected, or Redis slower than that)."""
        if not self.connected:
            return None  # not replayed: it is in this daemon's own count
        if len(self._occurrences) >= MAX_QUEUED:
            _release(self._occurrences.popleft()[2])
            self.dropped_occurrences += 1
        ack = asyncio.get_running_loop().create_future() if self._acks_fast else None
        self._occurrences.append((fingerprint, int(time.time() * 1000), ack))
        self._wake.set()
        return ack

    def warm(self, fingerprint: str) -> bool:
        """Whether the fleet's count of ``fingerprint`` is two short of the threshold (from a
        threshold of 4): the next answered one elsewhere may make it one short, and the
        relay asks Redis (``fresh_count``) before it lets this one through."""
        threshold = self.loop.detector.threshold
        return threshold >= 4 and self.connected and self.count(fingerprint) + 2 == threshold

    async def fresh_count(self, fingerprint: str) -> int:
        """The fleet's count of ``fingerprint`` in the window, read from Redis now (at most
        ``ACK_WAIT_SECONDS``; 0 when Redis does not answer in time)."""
        client = self._client
        if client is None:
            return 0
        cutoff = int((time.time() - self.loop.detector.window_seconds) * 1000)
        key = self.loop_prefix + fingerprint
        try:
            n = await _within(ACK_WAIT_SECONDS, client.zcount(key, f"({cutoff}", "+inf"))
        except (RedisError, OSError, TimeoutError):
            return 0
        return int(n)

    def late(self) -> None:
        """An answer waited ``ACK_WAIT_SECONDS`` in vain: until a batch is counted within it
        again, answers do not wait."""
        self._acks_fast = False

    def tripped(self, fingerprint: str) -> None:
        """A trip starts the count afresh, fleet-wide as on this daemon: the fingerprint's
        sorted set is deleted and every daemon told to forget it."""
        self._hot.pop(fingerprint, None)
        if self.connected:
            self._resets.append(fingerprint)
            self._wake.set()

    def spent(self, usd: float, now: float | None = None) -> None:
        """Priced spend of this daemon (USD), added to the fleet's within a quarter second."""
        now = time.time() if now is None else now
        minute = int(now // 60 * 60)
        self._spend[minute] = self._spend.get(minute, 0.0) + usd
        if len(self._spend) > 1440:  # a day of minutes while Redis is away: the oldest go
            del self._spend[min(self._spend)]

    def budget_spent(self, name: str, usd: float, now: float) -> None:
        """Priced spend (USD) counted in budget ``name``: the fleet's within a quarter second."""
        pending = self._budget_spend.get(name)
        if pending is None:
            pending = self._budget_spend[name] = {}
        minute = int(now // 60 * 60)
        pending[minute] = pending.get(minute, 0.0) + usd
        if len(pending) > 1440:  # a day of minutes while Redis is away: the oldest go
            del pending[min(pending)]

    def _kill_changed(self, suspension: Suspension | None, version: int) -> None:
        self._flag_dirty = True
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from ..tasks import spawn

        self._task = spawn(self._run(), name="fleet")

    async def stop(self) -> None:
        """Stop the sync: the spend not yet added goes first (within a second; the flag is
        already in Redis or in this daemon's store). Returns within ``STOP_SECONDS`` whatever
        Redis does."""
        self._stopping = True
        task = self._task
        if task is None:
            return
        if self.connected and self._spend and self._spend_script is not None:
            try:  # the last quarter second's spend, within a second
                await _within(1.0, self._send_spend(self._spend_script))
            except (RedisError, OSError, TimeoutError):
                pass
        client = self._client
        if client is not None and self._budget_spend and self._budget_sha:
            try:  # the budgets' likewise
                await _within(1.0, self._sync_budgets(client, self._budget_sha))
            except (RedisError, OSError, TimeoutError):
                pass
        deadline = asyncio.get_running_loop().time() + STOP_SECONDS
        # A cancel can be lost (asyncio.wait_for in redis-py on Python 3.11 drops one that
        # lands as its inner call ends): cancel again until the task is done.
        while not task.done() and asyncio.get_running_loop().time() < deadline:
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.done():
            log.error("fleet: the sync did not stop within %gs; left behind", STOP_SECONDS)
        self._task = None

    def state(self) -> dict[str, float]:
        return {
            "atlasburn_fleet_connected": float(self.connected),
            "atlasburn_fleet_messages_sent": self.messages_sent,
            "atlasburn_fleet_messages_received": self.messages_received,
            "atlasburn_fleet_reconnects": self.reconnects,
            "atlasburn_fleet_hot_fingerprints": len(self._hot),
        }

    async def _run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        ever = False
        while not self._stopping:
            client = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                # None: every command is bounded by _within already, and with a socket timeout
                # redis-py wraps each write in asyncio.wait_for (a Task per command on 3.11).
                socket_timeout=None,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
                client_name=None,
            )
            try:
                await self._session(client, ever)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, _Lost) as exc:
                why = f"{type(exc).__name__}: {inert(str(exc))[:200] or 'timed out'}"
                if self.connected or not ever:
                    log.warning(
                        "fleet: %s Redis at %s (%s): guarding alone until it is back;"
                        " reconnecting with a back-off up to %gs",
                        "lost" if self.connected else "cannot reach",
                        self.where,
                        why,
                        RECONNECT_MAX_SECONDS,
                    )
                    delay = RECONNECT_MIN_SECONDS
                ever = True
            finally:
                self._client = None
                self._budget_sha = ""
                if self.budgets is not None:
                    self.budgets.fleet_lost()  # each budget by this daemon's spend meanwhile
                self._resets.clear()
                while self._occurrences:
                    _release(self._occurrences.popleft()[2])
                await _close(client)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _session(self, client: redis.Redis, again: bool) -> None:
        """One connection, from connecting to its loss (raises then)."""
        await _within(COMMAND_TIMEOUT_SECONDS + CONNECT_TIMEOUT_SECONDS, client.ping())
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        # The writer holds one connection of the pool (each batch of occurrences goes straight
        # on it): no pool checkout and release around each command.
        own = client.client()
        try:
            await _within(COMMAND_TIMEOUT_SECONDS, pubsub.subscribe(self.channel))
            await _within(COMMAND_TIMEOUT_SECONDS, own.initialize())  # takes its connection
            flag = client.register_script(_FLAG)
            spend = self._spend_script = client.register_script(_SPEND)
            refill = client.register_script(_SPEND_REFILL)
            # Loaded once per connection, called by its SHA (a Script object on a pipeline
            # would ask SCRIPT EXISTS before every batch).
            occurrence = await _within(COMMAND_TIMEOUT_SECONDS, client.script_load(_OCCURRENCES))
            # The flag first: this daemon's, unless Redis holds a newer one (then that one).
            self._flag_dirty = False
            await self._push_flag(client, flag, initial=True)
            await self._refill_spend(refill)
            await self._refill_budgets(refill)
            budget_sha = await _within(COMMAND_TIMEOUT_SECONDS, client.script_load(_SPEND))
            self._client = client  # connected
            if again:
                self.reconnects += 1
                log.warning("fleet: Redis at %s is back: the fleet's guardrails again", self.where)
            else:
                log.info("fleet: connected to Redis at %s as %s", self.where, self.name)
            reader = asyncio.ensure_future(self._read(pubsub))
            self._budget_sha = budget_sha
            writer = asyncio.ensure_future(self._write(own, flag, occurrence, spend, budget_sha))
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended it
                raise _Lost("the connection ended")
            finally:
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
        finally:
            await _close(own)
            await _close(pubsub)

    # ------------------------------------------------------------------ writing

    async def _write(
        self, client: redis.Redis, flag: Any, occurrence: str, spend: Any, budget_sha: str
    ) -> None:
        last_spend = last_budgets = time.monotonic()
        while True:
            try:
                await _within(SPEND_FLUSH_SECONDS, self._wake.wait())
            except TimeoutError:
                pass
            self._wake.clear()
            did = False
            if self._flag_dirty:
                self._flag_dirty = False
                await self._push_flag(client, flag)
                did = True
            if self._occurrences or self._resets:
                await self._send_occurrences(client, occurrence)
                did = True
            now = time.monotonic()
            if self._spend and now - last_spend >= SPEND_FLUSH_SECONDS:
                last_spend = now
                await self._send_spend(spend)
                did = True
            budgets = self.budgets
            if (
                budgets is not None
                and budgets.active
                and now - last_budgets
                >= (SPEND_FLUSH_SECONDS if self._budget_spend else BUDGET_SYNC_SECONDS)
            ):
                last_budgets = now
                await self._sync_budgets(client, budget_sha)
                did = True
            if not did and now - last_spend >= HEARTBEAT_SECONDS:
                last_spend = now
                await _within(COMMAND_TIMEOUT_SECONDS, client.ping())

    async def _push_flag(self, client: redis.Redis, flag: Any, initial: bool = False) -> None:
        """Write this daemon's flag unless Redis holds a newer one, which is then applied."""
        kill = self.kill
        current = kill.check()
        if current is None and not kill.cleared:
            # Nothing to share: never changed here, or a suspension that expired (its key
            # expired with it). Read what the fleet holds.
            if initial:
                raw = await _within(COMMAND_TIMEOUT_SECONDS, client.get(self.flag_key))
                if isinstance(raw, bytes):
                    self._apply_flag(raw)
            return
        value, ttl_ms = self._flag_value(current)
        newer = await _within(
            COMMAND_TIMEOUT_SECONDS,
            flag(keys=[self.flag_key], args=[value, kill.version, ttl_ms, self.channel]),
        )
        if isinstance(newer, bytes):
            self._apply_flag(newer)
        else:
            self.messages_sent += 1

    def _flag_value(self, current: Suspension | None) -> tuple[bytes, int]:
        """The flag's JSON and its TTL in ms (0: none)."""
        body: dict[str, Any]
        if current is None:
            body = {"state": "ok", "layer": None, "reason": None, "source": None}
            ttl_ms = CLEARED_KEPT_SECONDS * 1000
            expires = None
        else:
            body = {
                "state": "suspended",
                "layer": current.layer,
                "reason": current.reason,
                "source": current.source,
            }
            expires = current.expires_at
            ttl_ms = 0 if expires is None else max(1, math.ceil((expires - time.time()) * 1000))
        body["expires_at"] = None if expires is None else iso_ms(expires)
        body["version"] = self.kill.version
        body["by"] = self.name
        return orjson.dumps(body), ttl_ms

    async def _send_occurrences(self, client: redis.Redis, sha: str) -> None:
        window_ms = int(self.loop.detector.window_seconds * 1000)
        threshold = self.loop.detector.threshold
        batch: list[tuple[str, int, asyncio.Future[bool] | None]] = []
        while self._occurrences and len(batch) < 512:
            batch.append(self._occurrences.popleft())
        started = time.monotonic()
        try:
            await self._count(client, sha, batch, window_ms, threshold)
        finally:
            for _, _, ack in batch:
                _release(ack)
        if batch and time.monotonic() - started <= ACK_WAIT_SECONDS:
            self._acks_fast = True
        if self._occurrences or self._resets:
            self._wake.set()

    async def _count(
        self,
        client: redis.Redis,
        sha: str,
        batch: list[tuple[str, int, asyncio.Future[bool] | None]],
        window_ms: int,
        threshold: int,
    ) -> None:
        """One script call for the batch's occurrences, and the trips' resets, in one round
        trip (without resets, the usual case, the call alone on the writer's own connection:
        no pipeline, no client machinery)."""
        resets: list[str] = []
        while self._resets and len(resets) < 512:
            resets.append(self._resets.popleft())
        keys: list[str] = []
        args: list[Any] = [window_ms, threshold, self.channel, self.name]
        for fingerprint, at, _ in batch:
            self._seq += 1
            keys.append(self.loop_prefix + fingerprint)
            args += (at, f"{self.name}:{self._seq}", fingerprint)
        await _rescripted(
            client, _OCCURRENCES, lambda: self._counted(client, sha, keys, args, resets)
        )

    async def _counted(
        self, client: redis.Redis, sha: str, keys: list[str], args: list[Any], resets: list[str]
    ) -> None:
        conn = client.connection
        if not resets and conn is not None:
            await _within(
                COMMAND_TIMEOUT_SECONDS, _command(conn, "EVALSHA", sha, len(keys), *keys, *args)
            )
            return
        async with client.pipeline(transaction=False) as pipe:
            if keys:
                pipe.evalsha(sha, len(keys), *keys, *args)
            for fingerprint in resets:
                pipe.delete(self.loop_prefix + fingerprint)
                message = {"t": "reset", "fp": fingerprint, "by": self.name}
                pipe.publish(self.channel, orjson.dumps(message))
            await _within(COMMAND_TIMEOUT_SECONDS, pipe.execute())

    async def _refill_spend(self, script: Any) -> None:
        """A spend hash emptied while this daemon was away (a Redis restarted empty) gets this
        daemon's own spend of the last day again (what it has not sent yet goes as usual)."""
        history: list[Any] = []
        if self.spend.enabled:
            for minute, usd in self.spend.minutes():
                usd -= self._spend.get(int(minute), 0.0)
                if usd > 0:
                    history += (int(minute), repr(usd))
        now = int(time.time() // 60 * 60)
        epoch = await _within(
            COMMAND_TIMEOUT_SECONDS,
            script(
                keys=[self.spend_key],
                args=[self._spend_epoch, f"{random.getrandbits(64):016x}", now, *history],
            ),
        )
        self._spend_epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def _refill_budgets(self, script: Any) -> None:
        """``_refill_spend`` for each budget's hash."""
        if self.budgets is None:
            return
        now = int(time.time() // 60 * 60)
        for name, budget in self.budgets.budgets.items():
            pending = self._budget_spend.get(name, {})
            history: list[Any] = []
            for minute, usd in budget.minutes():
                usd -= pending.get(int(minute), 0.0)
                if usd > 0:
                    history += (int(minute), repr(usd))
            epoch = await _within(
                COMMAND_TIMEOUT_SECONDS,
                script(
                    keys=[self.budget_prefix + name],
                    args=[
                        self._budget_epochs.get(name, ""),
                        f"{random.getrandbits(64):016x}",
                        now,
                        *history,
                    ],
                ),
            )
            self._budget_epochs[name] = epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def _sync_budgets(self, client: redis.Redis, sha: str) -> None:
        """Add each budget's spend not sent yet, and read back every budget's fleet totals, in
        one round trip (the spend cap's script, one hash per budget)."""
        budgets = self.budgets
        if budgets is None:
            return
        now = time.time()
        current = int(now // 60 * 60)
        pending, self._budget_spend = self._budget_spend, {}
        calls: list[tuple[str, int]] = []  # (budget, script calls for it)
        commands: list[tuple[Any, ...]] = []
        for name, budget in budgets.budgets.items():
            hour_cap = repr(budget.config.max_usd_per_hour)
            day_cap = repr(budget.config.max_usd_per_day)
            adds = sorted(pending.get(name, {}).items()) or [(current, 0.0)]
            for minute, usd in adds:
                key = self.budget_prefix + name
                commands.append((sha, 1, key, minute, repr(usd), current, hour_cap, day_cap))
            calls.append((name, len(adds)))
        try:
            # (Sent again after a NOSCRIPT, each call failed and none was added; a flush landing
            # between two of them would add the first twice: spend over-counted, never under.)
            results = await _rescripted(client, _SPEND, lambda: _evalshas(client, commands))
        except BaseException:
            for name, minutes in pending.items():  # not added: kept for the next attempt
                if name in budgets.budgets:
                    mine = self._budget_spend.setdefault(name, {})
                    for minute, usd in minutes.items():
                        mine[minute] = mine.get(minute, 0.0) + usd
            raise
        at = 0
        for name, n in calls:
            at += n
            hour, day, hour_wait, day_wait = (float(v) for v in results[at - 1])
            totals = {"hour": (hour, hour_wait), "day": (day, day_wait)}
            budgets.fleet_view(name, totals, now)

    async def _send_spend(self, script: Any) -> None:
        now = time.time()
        current = int(now // 60 * 60)
        hour_cap, day_cap = self.spend.caps()
        pending, self._spend = self._spend, {}
        result: list[bytes] = []
        try:
            for minute, usd in sorted(pending.items()):
                result = await _within(
                    COMMAND_TIMEOUT_SECONDS,
                    script(
                        keys=[self.spend_key],
                        args=[minute, repr(usd), current, repr(hour_cap), repr(day_cap)],
                    ),
                )
                del pending[minute]
        finally:
            for minute, usd in pending.items():  # not added: kept for the next attempt
                self._spend[minute] = self._spend.get(minute, 0.0) + usd
        hour, day, hour_wait, day_wait = (float(v) for v in result)
        if not self.spend.enabled or self.kill.check() is not None:
            return
        for total, cap, wait, label in (
            (hour, hour_cap, hour_wait, "hour"),
            (day, day_cap, day_wait, "day"),
        ):
            if cap > 0 and total > cap:
                reason = (
                    f"the fleet spent {usd_text(total)} in the last {label},"
                    f" over the cap of {usd_text(cap)}"
                )
                self.kill.suspend_now(SPEND_LAYER, reason, max(wait, 1.0), "local")
                return

    # ------------------------------------------------------------------ reading

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=HEARTBEAT_SECONDS)
            if message is None or message.get("type") != "message":
                continue
            data = message.get("data")
            if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
                continue
            self.messages_received += 1
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            kind = obj.get("t")
            if kind == "hot":
                self._hot_message(obj)
            elif kind == "reset":
                fingerprint = obj.get("fp")
                if isinstance(fingerprint, str) and obj.get("by") != self.name:
                    self._hot.pop(fingerprint, None)
                    self.loop.detector.forget(fingerprint)
            elif obj.get("by") != self.name:
                self._apply_flag(data)

    def _hot_message(self, obj: dict[str, Any]) -> None:
        fingerprint, times = obj.get("fp"), obj.get("times")
        if not isinstance(fingerprint, str) or not isinstance(times, list):
            return
        if len(fingerprint) > 128:
            return
        kept = tuple(sorted(float(t) for t in times[:64] if isinstance(t, int | float)))
        self._hot.pop(fingerprint, None)
        if len(self._hot) >= MAX_HOT:
            del self._hot[next(iter(self._hot))]  # the one heard of longest ago
        self._hot[fingerprint] = kept

    def _apply_flag(self, raw: bytes) -> None:
        """Take the fleet's flag (a JSON value of the key) if it is newer than this daemon's."""
        try:
            obj = orjson.loads(raw)
            version = int(obj["version"])
            state = obj["state"]
            expires = obj.get("expires_at")
            expires_at = None if expires is None else ts_epoch(str(expires))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("fleet: ignored a kill flag that is not one: %s", inert(repr(raw))[:200])
            return
        if state == "suspended":
            suspension = Suspension(
                self.org_id,
                str(obj.get("layer") or ""),
                str(obj.get("reason") or ""),
                str(obj.get("source") or "fleet"),
                expires_at,
            )
            if expires_at is not None and expires_at <= time.time():
                return
            self.kill.apply(suspension, version)
        elif state == "ok":
            self.kill.apply(None, version, str(obj.get("reason") or ""))


def _release(ack: asyncio.Future[bool] | None) -> None:
    """Let an answer held for an occurrence go (counted, dropped, or the connection lost)."""
    if ack is not None and not ack.done():
        ack.set_result(True)


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or TimeoutError after ``seconds`` (asyncio.timeout: unlike
    asyncio.wait_for on Python 3.11, it never drops a cancellation)."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def _rescripted(client: redis.Redis, script: str, send: Callable[[], Awaitable[T]]) -> T:
    """``send()``, which calls ``script`` by its SHA (loaded once per connection); when Redis
    lost it (NOSCRIPT: SCRIPT FLUSH, a failover to a replica that never loaded it), it is
    loaded again (same SHA) and ``send()`` runs once more, on the same connection."""
    try:
        return await send()
    except NoScriptError:
        await _within(COMMAND_TIMEOUT_SECONDS, client.script_load(script))
        return await send()


async def _evalshas(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """EVALSHA each of ``commands`` (its arguments), pipelined: the replies in order."""
    async with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.evalsha(*command)
        return await _within(COMMAND_TIMEOUT_SECONDS, pipe.execute())


async def _command(conn: Any, *args: Any) -> Any:
    """One command on a connection of redis-py's (``Redis.client()``'s, held), and its reply:
    what ``Redis.execute_command`` does without the retries (there are none), the pool and the
    hooks around it. An error reply raises; a lost or cancelled one disconnects it."""
    await conn.send_command(*args)
    return await conn.read_response()


async def _close(thing: Any) -> None:
    try:
        await _within(COMMAND_TIMEOUT_SECONDS, thing.aclose())
    except (RedisError, OSError, TimeoutError, AttributeError):
        pass
