"""How hard one host is asked, over every worker on every machine: the state lives in Redis.

A :class:`HostGate` hands out turns to request a host: at most ``HOST_CONCURRENCY`` requests in
flight to one host name at once, at least ``HOST_DELAY_MS`` between two starts, none while the
host said to come back later (``Retry-After``), and fewer for a while after it said it was
overloaded (429, or 503 with ``Retry-After``) — the idea of Scrapy's AutoThrottle, kept simple
(docs/architecture.md, "Politeness"). Times are Redis's own clock, so workers whose clocks
differ still space their requests.

How an overloaded host recovers, in steps of :data:`THROTTLE_MS` (a minute):

- a 429 halves the concurrency the host has at that moment (never below 1; the 429s answering one
  burst, within :data:`HALVE_ONCE_MS` of a halving, halve it once) and pauses the host for as
  long as ``Retry-After`` says (at most ``RETRY_AFTER_MAX``);
- after the pause (at once without one), the halved concurrency holds for one step; a later 429
  halves it again and starts the step anew;
- then it doubles after each further step until it is back at ``HOST_CONCURRENCY``: 8 halved
  twice is 2 for a minute after the pause, 4 for the minute after, then 8. A host without a
  limit (0) recovers to the requests it had in flight when it was first halved, then has none.

A turn that is not free is not waited for long: :meth:`HostGate.turn` raises :class:`HostBusy`
with how long to wait, and the caller gives its thread other work (the fetch actor sends the
line again with that delay, without counting an attempt).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis

__all__ = ["HostBusy", "HostGate", "host_of"]

logger = logging.getLogger(__name__)

#: A host that said 429 (or 503 with ``Retry-After``) gets half its concurrency for this long after
#: its pause ends (after the 429, without a pause); then twice that for each further step this
#: long, until it is back at its limit.
THROTTLE_MS = 60_000
#: 429s within this long of a halving are answers to the same burst: they halve only once.
HALVE_ONCE_MS = 2_000
#: When every turn of a host is taken, we do not know when one frees up: ask again after this.
BUSY_RETRY_MS = 1_000

_PREFIX = "image-crawler:host:"

# The concurrency of a host now (Lua, shared by both scripts): ``limit`` (0: none) unless the host
# is throttled; then ``throttled`` until ``throttle_until``, doubled for each ``step`` ms after
# that, until that reaches the limit (``recover_to`` for a host without one). Returns the
# concurrency and whether the host is still throttled.
_LIMIT_NOW = """
local function limit_now(limit, throttled, throttle_until, recover_to, step, now)
  if not throttled then return limit, false end
  local level = throttled
  if now >= throttle_until then
    level = throttled * 2 ^ (math.floor((now - throttle_until) / step) + 1)
  end
  local full = limit
  if full == 0 then full = recover_to or 0 end
  if level >= full then return limit, false end
  return level, true
end
"""

# KEYS: the host's state hash, its in-flight set. ARGV: limit (0: none), delay ms, turn id,
# turn lifetime ms, throttle ms. Returns 0 (the turn is taken), -1 (every turn is taken), or
# the ms to wait.
_TAKE = (
    _LIMIT_NOW
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, delay = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'next_start', 'pause_until', 'throttled', 'throttle_until',
  'recover_to')
local next_start, pause_until = tonumber(s[1]) or 0, tonumber(s[2]) or 0
if pause_until > now then return pause_until - now end
if next_start > now then return next_start - now end
limit = limit_now(limit, tonumber(s[3]), tonumber(s[4]) or 0, tonumber(s[5]), tonumber(ARGV[5]), now)
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= limit then return -1 end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
if delay > 0 then
  redis.call('HSET', KEYS[1], 'next_start', now + delay)
  -- Never shorter than it was: a pause or a recovery of the host may need the hash for longer.
  redis.call('PEXPIRE', KEYS[1], math.max(delay + 60000, redis.call('PTTL', KEYS[1])))
end
return 0
"""
)

# KEYS: the host's state hash, its in-flight set. ARGV: limit (0: none), pause ms (0: none),
# throttle ms, halve-once ms. Halves the host's concurrency (from what it is now, once per
# burst of 429s), pauses it, and keeps the hash until its recovery is over (and a minute).
_SLOW_DOWN = (
    _LIMIT_NOW
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, pause, throttle = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'pause_until', 'throttled', 'throttle_until', 'halved_at',
  'recover_to')
local pause_until, throttle_until = tonumber(s[1]) or 0, tonumber(s[3]) or 0
local halved_at, recover_to = tonumber(s[4]) or 0, tonumber(s[5])
local current, active = limit_now(limit, tonumber(s[2]), throttle_until, recover_to, throttle, now)
if limit > 0 then
  recover_to = limit
elseif not active then
  -- No limit: halve what is in flight, and recover to it.
  current = math.max(redis.call('ZCARD', KEYS[2]), 2)
  recover_to = current
end
local now_limit = current
if not active or now - halved_at >= tonumber(ARGV[4]) then
  now_limit = math.max(1, math.floor(current / 2))
  halved_at = now
end
pause_until = math.max(pause_until, now + pause)
throttle_until = math.max(throttle_until, pause_until + throttle)
-- The recovery is over once doubling reaches the limit: the hash is needed until then.
local over, level = throttle_until, now_limit * 2
while level < recover_to do
  over = over + throttle
  level = level * 2
end
redis.call('HSET', KEYS[1], 'throttled', now_limit, 'throttle_until', throttle_until,
  'pause_until', pause_until, 'halved_at', halved_at, 'recover_to', recover_to)
redis.call('PEXPIRE', KEYS[1], math.max(over - now + 60000, redis.call('PTTL', KEYS[1])))
return now_limit
"""
)


class HostBusy(Exception):
    """The host's turns are taken, or it is paused: try again in ``wait_ms`` milliseconds."""

    def __init__(self, host: str, wait_ms: int) -> None:
        super().__init__(f"{host} is busy for {wait_ms} ms")
        self.host = host
        self.wait_ms = wait_ms


def host_of(url: str) -> str:
    """The host name a URL's requests count against (lower case, without port or userinfo)."""
    return (urlsplit(url).hostname or "").rstrip(".").lower()


class HostGate:
    """Turns to request a host, shared through Redis by every worker.

    :param client: the Redis client (the broker's).
    :param concurrency: ``HOST_CONCURRENCY``, requests in flight to one host at once (0: no limit).
    :param delay_ms: ``HOST_DELAY_MS``, least time between the starts of two requests to one host.
    :param turn_ms: how long a turn is held at most: a worker that dies holding one gives it
        back after this (the longest a download can take, and some).
    :param patience_s: how long :meth:`turn` waits for a turn before raising :class:`HostBusy`.
    :param longest_pause_s: the longest a host is paused for (``RETRY_AFTER_MAX``; no default here,
        the setting has the one): a server asking for longer does not get to stop its host for centuries.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        concurrency: int,
        delay_ms: int,
        turn_ms: int,
        longest_pause_s: float,
        patience_s: float = 2.0,
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.delay_ms = delay_ms
        self.turn_ms = turn_ms
        self.patience_s = patience_s
        self.longest_pause_ms = int(longest_pause_s * 1000)
        self._take = client.register_script(_TAKE)
        self._slow_down = client.register_script(_SLOW_DOWN)

    @contextmanager
    def turn(self, host: str, *, until: float | None = None) -> Iterator[None]:
        """Hold a turn of ``host`` for the ``with`` block; :class:`HostBusy` if none comes soon.

        Waits at most ``patience_s`` (and not past the monotonic time ``until``).
        """
        token = uuid.uuid4().hex
        keys = _keys(host)
        deadline = time.monotonic() + self.patience_s
        if until is not None:
            deadline = min(deadline, until)
        pause = 0.05
        while True:
            args: list[int | str] = [self.concurrency, self.delay_ms, token, self.turn_ms, THROTTLE_MS]
            answer = int(self._take(keys=keys, args=args))
            if answer == 0:
                break
            wait_ms = BUSY_RETRY_MS if answer < 0 else min(answer, self.longest_pause_ms)
            left = deadline - time.monotonic()
            sleep = min(pause, wait_ms / 1000) if answer < 0 else wait_ms / 1000
            if sleep > left:
                raise HostBusy(host, max(wait_ms, 1))
            time.sleep(sleep * random.uniform(0.8, 1.2))  # jitter: waiting workers do not ask in step
            pause = min(pause * 2, 0.4)
        try:
            yield
        finally:
            try:
                self.client.zrem(keys[1], token)
            except redis.RedisError:  # the turn runs out by itself: no reason to fail the download
                logger.warning("could not give back a turn of %s; it expires on its own", host)

    def slow_down(self, host: str, *, retry_after_s: float | None) -> int:
        """``host`` said it is overloaded: pause it ``retry_after_s``, halve its concurrency for a while.

        Half for :data:`THROTTLE_MS` after the pause, then doubling each :data:`THROTTLE_MS` (the
        module docstring). The 429s that answer one burst of requests (within
        :data:`HALVE_ONCE_MS` of a halving) halve it once. Returns the concurrency it has now.
        """
        pause_ms = 0 if retry_after_s is None else int(min(retry_after_s * 1000, self.longest_pause_ms))
        args = [self.concurrency, pause_ms, THROTTLE_MS, HALVE_ONCE_MS]
        return int(self._slow_down(keys=_keys(host), args=args))


def _keys(host: str) -> list[str]:
    return [f"{_PREFIX}{host}", f"{_PREFIX}{host}:turns"]
