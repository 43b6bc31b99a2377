"""Dramatiq setup: the Redis broker, its middleware and their order. Nothing else."""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit
from dramatiq.middleware.group_callbacks import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend as ResultBackend

from .config import Settings
from .middleware import ExpectedFailures, RecordFailures

#: A worker that has not been heard from for this long is presumed dead and its messages
#: (running and prefetched) are put back on their queues. Dramatiq's default is 60 s.
HEARTBEAT_TIMEOUT_MS = 20_000
#: One broker command in this many millionths runs that check. Dramatiq's default (1,000, i.e.
#: 0.1 %) leaves a dead worker's messages stranded for many minutes on a quiet queue.
MAINTENANCE_CHANCE = 50_000
#: How long results wait for the collector in the result backend (Dramatiq's default: 10 min).
RESULT_TTL_MS = 60 * 60 * 1000

FETCH_QUEUE = "fetch"
PROCESS_QUEUE = "process"


def create_broker(settings: Settings) -> RedisBroker:
    """A Redis broker for ``REDIS_URL`` with the pipeline's middleware, in an order that matters.

    ``after_*`` hooks run last-to-first, so listing GroupCallbacks before Results stores a
    member's result before its group's callback is enqueued, and listing RecordFailures
    before Retries lets it see the verdict Retries gave a failed message.
    """
    result_backend = ResultBackend(url=settings.redis_url)
    rate_limiter_backend = RateLimiterBackend(url=settings.redis_url)
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        GroupCallbacks(rate_limiter_backend),
        Results(backend=result_backend, result_ttl=RESULT_TTL_MS),
        RecordFailures(),
        Retries(min_backoff=1_000, max_backoff=60_000),
    ]
    return RedisBroker(
        url=settings.redis_url,
        middleware=middleware,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
    )


def setup_broker(settings: Settings) -> RedisBroker:
    """Create the broker and make it Dramatiq's global broker (what actors bind to)."""
    broker = create_broker(settings)
    dramatiq.set_broker(broker)
    worker_logger = logging.getLogger("dramatiq.worker.WorkerThread")
    if not any(isinstance(f, ExpectedFailures) for f in worker_logger.filters):
        worker_logger.addFilter(ExpectedFailures())
    return broker
