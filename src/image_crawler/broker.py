"""Dramatiq setup: the Redis broker, its middleware and their order. Nothing else."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
    prometheus,
)
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend as ResultBackend
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .config import Settings
from .middleware import CrashGuard, DistinctGroupCallbacks, ExpectedFailures, RecordFailures, WorkerShape

#: A worker that has not been heard from for this long is presumed dead and its messages
#: (running and prefetched) are put back on their queues. Dramatiq's default is 60 s.
HEARTBEAT_TIMEOUT_MS = 20_000
#: One broker command in this many millionths runs that check. Dramatiq's default (1,000, i.e.
#: 0.1 %) leaves a dead worker's messages stranded for many minutes on a quiet queue.
MAINTENANCE_CHANCE = 50_000
#: How long results wait for the collector in the result backend (Dramatiq's default: 10 min).
RESULT_TTL_MS = 60 * 60 * 1000

#: While Redis is unreachable (a restart, a failover), every Redis call of a worker — fetching,
#: acking, enqueueing a retry or a group callback, storing a result — waits and tries again for
#: about this long instead of failing: a failed enqueue inside Dramatiq's after-hooks is only
#: logged, and the message would then be acknowledged with its follow-up lost. A process a
#: person waits for (``image-crawler``) makes its clients inside :func:`outage_budget` instead.
REDIS_OUTAGE_BUDGET_S = 300

#: How often a consumer looks for messages of its own that it lost track of (see below).
ORPHAN_SWEEP_S = 10.0

FETCH_QUEUE = "fetch"
PROCESS_QUEUE = "process"
#: Batches of URL lines from ``enqueue``, turned into fetch messages as workers have room.
ADMIT_QUEUE = "admit"

# Work already started outranks new work (a lower number runs first): a worker holding several
# kinds of message finishes md5, grayscale, collect and the recorders, then fetches, and admits
# new lines last, so parked bodies and results are read long before their TTLs.
PROCESS_PRIORITY = 0
FETCH_PRIORITY = 100
ADMIT_PRIORITY = 200


#: Where a worker host's exporter serves Dramatiq's metrics with ``WORKER_METRICS=1``, unless
#: Dramatiq's own ``dramatiq_prom_host``/``dramatiq_prom_port`` say otherwise. Dramatiq's
#: exporter listens on every interface (dramatiq#309); ours on this machine only.
WORKER_METRICS_HOST = "127.0.0.1"
WORKER_METRICS_PORT = 9191


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


class _PipelinableScript:
    """The broker's Lua dispatch script, sent on the calling thread's pipeline when it has one."""

    def __init__(self, script: Callable[..., Any]) -> None:
        self.script = script
        self.local = threading.local()

    def __call__(self, keys=None, args=None, client=None):
        return self.script(keys=keys, args=args, client=client or getattr(self.local, "pipe", None))


class _OrphanRequeueingConsumer(_RedisConsumer):
    """A Redis consumer that puts back messages it fetched but never received.

    Dramatiq's fetch script moves message ids to this worker's ack set and returns the
    messages. When Redis runs that and then goes away before the reply arrives (a restart),
    the client retries and gets the next messages: the first ones stay in the ack set of a
    worker that is alive, so maintenance never requeues them, and their jobs never end.
    Every ``ORPHAN_SWEEP_S`` the consumer compares its ack set with the messages it holds
    (prefetched, or handed to a worker thread and not yet acked); ids it did not hold in two
    sweeps in a row are requeued.

    When Dramatiq replaces a consumer (after a connection error it could not ride out), the new
    one does not know what the old one handed out: those messages may run a second time, which
    every actor of the pipeline tolerates; the ones the old consumer had prefetched or was
    holding for a delay come back instead of staying stuck.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out: set[str] = set()  # redis message ids given to worker threads, not yet acked
        self._lock = threading.Lock()  # worker threads ack; the consumer thread sweeps
        self._unheld: set[str] = set()
        self._next_sweep = time.monotonic() + ORPHAN_SWEEP_S

    def __next__(self):
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_SWEEP_S
            self._requeue_orphans()
        message = super().__next__()
        if message is not None:
            with self._lock:
                self._handed_out.add(message.options["redis_message_id"])
        return message

    def ack(self, message):
        super().ack(message)  # a failed ack raises and is tried again: the message stays held
        self._release(message)

    def nack(self, message):
        super().nack(message)
        self._release(message)

    def _release(self, message) -> None:
        with self._lock:
            self._handed_out.discard(message.options["redis_message_id"])

    def _requeue_orphans(self) -> None:
        # Take what is held *before* reading the ack set: an id acked in between is simply absent.
        with self._lock:
            held = set(self._handed_out)
        held.update(
            dramatiq.Message.decode(data).options["redis_message_id"] for data in self.message_cache if data
        )
        acks = f"{self.broker.namespace}:__acks__.{self.broker.broker_id}.{self.queue_name}"
        try:
            unheld = {member.decode() for member in self.broker.client.smembers(acks)} - held
            orphans, self._unheld = unheld & self._unheld, unheld
            if orphans:
                logging.getLogger(__name__).warning(
                    "Requeueing %d message(s) of queue %r whose fetch reply was lost.",
                    len(orphans),
                    self.queue_name,
                )
                self.broker.do_requeue(self.queue_name, *orphans)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._unheld = set()  # Redis is away: look again at the next sweep


class PipelinedRedisBroker(RedisBroker):
    """A :class:`RedisBroker` that can send a batch of messages in one Redis pipeline,
    and whose consumers recover messages whose fetch reply was lost.

    Every message still goes through Dramatiq's own ``enqueue`` (middleware hooks, ids, the
    Lua dispatch script); inside :meth:`pipelined` the calling thread's script calls are
    queued on a Redis pipeline instead of being sent one by one. Other threads (a worker's
    consumers in the same process) are not affected.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._dispatch_script = _PipelinableScript(self.scripts["dispatch"])
        self.scripts["dispatch"] = self._dispatch_script

    @property
    def consumer_class(self):
        return _OrphanRequeueingConsumer

    @contextmanager
    def pipelined(self, *, transaction: bool = False) -> Iterator[redis.client.Pipeline]:
        """Buffer this thread's ``enqueue`` calls made in the block and send them at its end.

        Yields the pipeline, so other commands can ride along; with ``transaction=True`` the
        block is sent as one MULTI/EXEC, which no other client sees half done (Redis does not
        roll back a command that fails inside it). A pipeline that loses its connection is sent
        again, unless it WATCHes a key: then it raises ``WatchError``.
        """
        local = self._dispatch_script.local
        with self.client.pipeline(transaction=transaction) as pipe:
            local.pipe = pipe
            try:
                yield pipe
            finally:
                local.pipe = None
            pipe.execute()


def worker_metrics_address(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """The host and port the worker metrics exporter listens on, from Dramatiq's variables."""
    host = environ.get("dramatiq_prom_host") or WORKER_METRICS_HOST
    return host, int(environ.get("dramatiq_prom_port") or WORKER_METRICS_PORT)


class WorkerMetrics(prometheus.Prometheus):
    """Dramatiq's Prometheus middleware, its exporter at :func:`worker_metrics_address`.

    Each worker process counts its messages in files under ``dramatiq_prom_db`` (default:
    ``<tmp>/dramatiq-prometheus``); one process forked by the ``dramatiq`` command serves the sum.
    """

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_worker_metrics]


def serve_worker_metrics() -> int:
    """Serve the metrics of every worker process of this ``dramatiq`` command (a fork function)."""
    # Imported here, not at the top: worker processes import this module before the middleware
    # points prometheus_client at the shared files (after_process_boot), and a process that
    # imported it before then would count in its own memory, unseen by this exporter.
    import prometheus_client
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry, path=prometheus.DB_PATH)
    host, port = worker_metrics_address()
    _, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    thread.join()
    return 0


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
        Retries(min_backoff=1_000, max_backoff=60_000),
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
    worker_logger = logging.getLogger("dramatiq.worker.WorkerThread")
    if not any(isinstance(f, ExpectedFailures) for f in worker_logger.filters):
        worker_logger.addFilter(ExpectedFailures())
    return broker
