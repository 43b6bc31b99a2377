"""Dramatiq setup: the broker on its Redis client (and that client's outage budget), the queues
and their priorities, and the middleware and their order.

The middleware themselves are in :mod:`image_crawler.middleware`; what relies on Dramatiq's
private details (the broker class, its consumer, the group barrier, Redis key formats) is in
:mod:`image_crawler.dramatiq_internals`. The Redis client is made here because it is the
broker's: a process's other Redis users (claim checks, host turns) share it, or one made the
same way (:func:`connect_redis`), so that all of them ride out an outage alike; a command a
person waits for makes it within a shorter :func:`outage_budget`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend as ResultBackend
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .config import Settings
from .dramatiq_internals import WORKER_LOGGER, DistinctGroupCallbacks, PipelinedRedisBroker
from .middleware import CrashGuard, ExpectedFailures, RecordFailures, WorkerMetrics, WorkerShape

#: A worker that has not been heard from for this long is presumed dead and its messages
#: (running and prefetched) are put back on their queues. Dramatiq's default is 60 s.
HEARTBEAT_TIMEOUT_MS = 20_000
#: One broker command in this many millionths runs that check. Dramatiq's default (1,000, i.e.
#: 0.1 %) leaves a dead worker's messages stranded for many minutes on a quiet queue.
MAINTENANCE_CHANCE = 50_000
#: How long results wait for the collector in the result backend (Dramatiq's default: 10 min).
RESULT_TTL_MS = 60 * 60 * 1000
#: Backoff of a failed message's retries (ms), unless its actor sets its own ``max_backoff``:
#: 1 s, 2 s, 4 s… with jitter, at most a minute (Dramatiq's defaults: 15 s, and 7 days).
MESSAGE_MIN_BACKOFF_MS = 1_000
MESSAGE_MAX_BACKOFF_MS = 60_000

#: While Redis is unreachable (a restart, a failover), every Redis call of a worker — fetching,
#: acking, enqueueing a retry or a group callback, storing a result — waits and tries again for
#: about this long instead of failing: a failed enqueue inside Dramatiq's after-hooks is only
#: logged, and the message would then be acknowledged with its follow-up lost. A process a
#: person waits for (``image-crawler``) makes its clients inside :func:`outage_budget` instead.
REDIS_OUTAGE_BUDGET_S = 300

FETCH_QUEUE = "fetch"
PROCESS_QUEUE = "process"
#: Batches of URL lines from ``enqueue``, turned into fetch messages as workers have room.
ADMIT_QUEUE = "admit"
#: The pipeline's actors (``image_crawler.actors``), in the order a URL meets them, then the
#: recorders of messages that failed for good: named here so that reading them sets up nothing.
ACTOR_NAMES = ("admit", "fetch", "md5", "grayscale", "collect", "record_failure", "record_admit_failure")
#: Every queue the actors use, in the same order.
QUEUE_NAMES = (ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE)

# Work already started outranks new work (a lower number runs first): a worker holding several
# kinds of message finishes md5, grayscale, collect and the recorders, then fetches, and admits
# new lines last, so parked bodies and results are read long before their TTLs.
PROCESS_PRIORITY = 0
FETCH_PRIORITY = 100
ADMIT_PRIORITY = 200


#: Group barriers live as long as results (and claim checks) when their group never completes;
#: a completed group's barrier is deleted when it fires. A member ending after its barrier
#: expired fires the collector, which then ends its jobs in ``md5 result missing``: the same
#: fate as a result that expired.
BARRIER_TTL_MS = RESULT_TTL_MS


_outage_budget_s: ContextVar[float] = ContextVar("outage_budget_s", default=REDIS_OUTAGE_BUDGET_S)


@contextmanager
def outage_budget(seconds: float) -> Iterator[None]:
    """Make the Redis clients created in this block ride out an outage of ``seconds``, not minutes.

    For a process a person waits for: enter it before :mod:`image_crawler.actors` is first
    imported (that import creates the broker and its client). Clients made outside the block,
    the workers' among them, keep ``REDIS_OUTAGE_BUDGET_S``.
    """
    token = _outage_budget_s.set(seconds)
    try:
        yield
    finally:
        _outage_budget_s.reset(token)


class _OutageRetry(Retry):
    """redis-py's retry, bounded by time: a call gives up ``budget_s`` seconds after it began.

    A count of retries alone does not bound an outage: each try may wait for a whole socket
    timeout first (a Redis that accepts connections and never answers).
    """

    def __init__(self, budget_s: float) -> None:
        backoff = ExponentialWithJitterBackoff(cap=min(5.0, budget_s / 5), base=0.25)
        super().__init__(backoff, retries=-1)
        self.budget_s = budget_s

    def call_with_retry(
        self, do: Callable[[], Any], fail: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        deadline = time.monotonic() + self.budget_s

        def fail_within_budget(error: Exception, *failures: int) -> None:
            fail(error, *failures)  # redis-py's clean-up (disconnect) first
            if time.monotonic() >= deadline:
                raise error

        return super().call_with_retry(do, fail_within_budget, *args, **kwargs)


def connect_redis(url: str) -> redis.Redis:
    """A Redis client that rides out an outage of up to ``REDIS_OUTAGE_BUDGET_S`` seconds.

    Inside :func:`outage_budget`, of that many seconds instead (and no socket waits longer).
    """
    budget_s = _outage_budget_s.get()
    return redis.Redis.from_url(
        url,
        retry=_OutageRetry(budget_s),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        socket_connect_timeout=min(5.0, budget_s),
        socket_timeout=min(60.0, budget_s),
        health_check_interval=30,
    )


def create_broker(settings: Settings) -> PipelinedRedisBroker:
    """A Redis broker for ``REDIS_URL`` with the pipeline's middleware, in an order that matters.

    ``before_*`` hooks run first-to-last and ``after_*`` hooks last-to-first, so: CrashGuard
    before TimeLimit does not count waiting for a turn as running, and drops its mark only
    after every other hook is done; listing the group callbacks before Results stores a
    member's result before its group's callback is enqueued; listing RecordFailures before
    Retries lets it see the verdict Retries gave a failed message. With ``WORKER_METRICS``,
    :class:`WorkerMetrics` comes first, as in Dramatiq's own default list: its after-hooks
    then see every message its before-hook saw, even one a later middleware skips.
    """
    client = connect_redis(settings.redis_url)
    result_backend = ResultBackend(client=client)
    rate_limiter_backend = RateLimiterBackend(client=client)
    middleware: list[Middleware] = [WorkerMetrics()] if settings.worker_metrics else []
    middleware += [
        AgeLimit(),
        CrashGuard(client),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        DistinctGroupCallbacks(rate_limiter_backend, barrier_ttl=BARRIER_TTL_MS),
        Results(backend=result_backend, result_ttl=RESULT_TTL_MS),
        RecordFailures(),
        Retries(min_backoff=MESSAGE_MIN_BACKOFF_MS, max_backoff=MESSAGE_MAX_BACKOFF_MS),
        WorkerShape(),
    ]
    return PipelinedRedisBroker(
        client=client,
        middleware=middleware,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
    )


def setup_broker(settings: Settings) -> PipelinedRedisBroker:
    """Create the broker and make it Dramatiq's global broker (what actors bind to)."""
    broker = create_broker(settings)
    dramatiq.set_broker(broker)
    worker_logger = logging.getLogger(WORKER_LOGGER)
    if not any(isinstance(f, ExpectedFailures) for f in worker_logger.filters):
        worker_logger.addFilter(ExpectedFailures())
    return broker
