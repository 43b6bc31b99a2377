"""How hard one host is asked, over every worker on every machine: the state lives in Redis.

A :class:`HostGate` hands out turns to request a host: at most ``HOST_CONCURRENCY`` requests in
flight to one host name at once, at least ``HOST_DELAY_MS`` between two starts, none while the
host said to come back later (``Retry-After``), and half as many for a while after it said it
was overloaded (429, or 503 with ``Retry-After``) — the idea of Scrapy's AutoThrottle, kept
simple (docs/architecture.md, "Politeness"). Times are Redis's own clock, so workers whose
clocks differ still space their requests.

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

#: A host that said 429 (or 503 with ``Retry-After``) gets half its concurrency for this long
#: after the last time it said so, or as long as it asked us to stay away if that is longer.
THROTTLE_MS = 60_000
#: 429s within this long of a halving are answers to the same burst: they halve only once.
HALVE_ONCE_MS = 2_000
#: When every turn of a host is taken, we do not know when one frees up: ask again after this.
BUSY_RETRY_MS = 1_000

_PREFIX = "image-crawler:host:"

# KEYS: the host's state hash, its in-flight set. ARGV: limit (0: none), delay ms, turn id,
# turn lifetime ms. Returns 0 (the turn is taken), -1 (every turn is taken), or the ms to wait.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, delay = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'next_start', 'pause_until', 'throttled', 'throttle_until')
local next_start, pause_until = tonumber(s[1]) or 0, tonumber(s[2]) or 0
local throttled, throttle_until = tonumber(s[3]), tonumber(s[4]) or 0
if pause_until > now then return pause_until - now end
if next_start > now then return next_start - now end
if throttled and throttle_until > now and (limit == 0 or throttled < limit) then limit = throttled end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= limit then return -1 end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
if delay > 0 then
  redis.call('HSET', KEYS[1], 'next_start', now + delay)
  redis.call('PEXPIRE', KEYS[1], math.max(delay, pause_until - now, throttle_until - now) + 60000)
end
return 0
"""

# KEYS: the host's state hash, its in-flight set. ARGV: limit (0: none), pause ms (0: none),
# throttle ms, halve-once ms. Halves the host's concurrency (from what it is now, once per
# burst of 429s) and pauses it.
_SLOW_DOWN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, pause, throttle = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'pause_until', 'throttled', 'throttle_until', 'halved_at')
local pause_until, throttled, throttle_until = tonumber(s[1]) or 0, tonumber(s[2]), tonumber(s[3]) or 0
local halved_at = tonumber(s[4]) or 0
local current = limit
if throttled and throttle_until > now then current = throttled end
if current == 0 then current = math.max(redis.call('ZCARD', KEYS[2]), 2) end
local now_limit = current
if now - halved_at >= tonumber(ARGV[4]) or not (throttled and throttle_until > now) then
  now_limit = math.max(1, math.floor(current / 2))
  halved_at = now
end
throttle_until = math.max(throttle_until, now + math.max(throttle, pause))
pause_until = math.max(pause_until, now + pause)
redis.call('HSET', KEYS[1], 'throttled', now_limit, 'throttle_until', throttle_until,
  'pause_until', pause_until, 'halved_at', halved_at)
redis.call('PEXPIRE', KEYS[1], throttle_until - now + 60000)
return now_limit
"""


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
    :param longest_pause_s: the longest a host is paused for (``RETRY_AFTER_MAX``): a server
        asking for longer does not get to stop its host for centuries.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        concurrency: int,
        delay_ms: int,
        turn_ms: int,
        patience_s: float = 2.0,
        longest_pause_s: float = 600.0,
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
            answer = int(self._take(keys=keys, args=[self.concurrency, self.delay_ms, token, self.turn_ms]))
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
        """``host`` said it is overloaded: halve its concurrency for a while, pause it ``retry_after_s``.

        The 429s that answer one burst of requests (within ``HALVE_ONCE_MS`` of a halving) halve
        it once. Returns the concurrency it has now.
        """
        pause_ms = 0 if retry_after_s is None else int(min(retry_after_s * 1000, self.longest_pause_ms))
        args = [self.concurrency, pause_ms, THROTTLE_MS, HALVE_ONCE_MS]
        return int(self._slow_down(keys=_keys(host), args=args))


def _keys(host: str) -> list[str]:
    return [f"{_PREFIX}{host}", f"{_PREFIX}{host}:turns"]
