"""Dramatiq middleware of the pipeline, and the retry policy they share.

The group barrier, which replaces a part of Dramatiq, is
:class:`~image_crawler.dramatiq_internals.DistinctGroupCallbacks`; what the middleware here rely
on beyond Dramatiq's public API is listed (and tested) in :mod:`image_crawler.dramatiq_internals`.
:func:`image_crawler.broker.create_broker` puts them in order.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

import pymongo.errors
import redis.exceptions
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage, TimeLimitExceeded, prometheus

from .dramatiq_internals import prometheus_db_path
from .errors import CrawlError

logger = logging.getLogger(__name__)

#: Worker threads per process until a worker boots and says how many it runs: Dramatiq's own
#: default (``dramatiq --threads``, ``Worker(worker_threads=)``).
DEFAULT_WORKER_THREADS = 8
#: Seconds a :class:`CrashGuard` mark outlives its message's start: longer than any redelivery takes.
CRASH_MARK_TTL_S = 24 * 3600
#: Where a worker host's exporter serves Dramatiq's metrics with ``WORKER_METRICS=1``, unless
#: Dramatiq's own ``dramatiq_prom_host``/``dramatiq_prom_port`` say otherwise. Dramatiq's
#: exporter listens on every interface (dramatiq#309); ours on this machine only.
WORKER_METRICS_HOST = "127.0.0.1"
WORKER_METRICS_PORT = 9191


class GuardUnavailable(MiddlewareError):
    """Redis could not mark a guarded message as running: it is retried, never run unguarded."""


_UNAVAILABLE: tuple[tuple[type[BaseException], str], ...] = (
    (GuardUnavailable, "redis unavailable"),
    (redis.exceptions.ConnectionError, "redis unavailable"),
    (redis.exceptions.TimeoutError, "redis unavailable"),
    # A transaction whose watched key changed, or whose connection was lost while watching.
    (redis.exceptions.WatchError, "redis unavailable"),
    (pymongo.errors.ConnectionFailure, "mongodb unavailable"),
)


def is_transient(exception: BaseException) -> bool:
    """Whether trying the same message again later may succeed."""
    if isinstance(exception, CrawlError):
        return exception.transient
    return any(isinstance(exception, kind) for kind, _ in _UNAVAILABLE)


def reason_for(exception: BaseException) -> str:
    """The short reason an exception leaves in a job's outcome."""
    if isinstance(exception, CrawlError):
        return exception.reason
    if isinstance(exception, TimeLimitExceeded):
        return "time limit exceeded"
    for kind, reason in _UNAVAILABLE:
        if isinstance(exception, kind):
            return reason
    return f"internal error: {type(exception).__name__}"


def retry_transient(max_retries: int, *, also: tuple[type[BaseException], ...] = ()):
    """A ``retry_when`` predicate: retry transient errors (and ``also`` these) up to ``max_retries`` times."""

    def retry_when(retries: int, exception: BaseException) -> bool:
        limit = exception.retry_limit if isinstance(exception, CrawlError) else None
        worth_it = is_transient(exception) or isinstance(exception, also)
        return retries < (max_retries if limit is None else min(limit, max_retries)) and worth_it

    return retry_when


class ExpectedFailures(logging.Filter):
    """Logs a message's :class:`CrawlError` (an expired body, a missing result) as one warning line.

    Dramatiq logs every exception an actor raises as an error with a traceback; expected failures
    would bury real faults. (A URL's own failures — a 404, a timeout — end that URL inside its
    batch and never reach this logger.) Attach to Dramatiq's worker logger
    (:data:`~image_crawler.dramatiq_internals.WORKER_LOGGER`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CrawlError):
            # The reason is an argument, never part of the format: it may hold a "%".
            record.msg, record.args = "%s (%s)", (record.getMessage(), record.exc_info[1].reason)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class RecordFailures(Middleware):
    """Hands every message that failed for good to an actor that records its lines' error.

    A group's completion callback never fires when a member fails, so without this the lines
    of a fetch, md5, grayscale or collect that gave up would never get an outcome.
    It must be placed before :class:`~dramatiq.middleware.Retries`: ``after_*`` hooks run
    in reverse order, so Retries has decided ``message.failed`` by the time this runs.

    The recorder is sent the failed message's first argument (its batch or parcel: a ``run``
    and its ``lines``) and the reason. An actor can
    name its own recorder with the ``failure_recorder`` option (``None``: failures of this
    actor are only logged, as a recorder's own must be).

    Parameters:
      actor_name(str): The default recorder, sent ``(batch, reason)``; its own failures are only logged.
    """

    def __init__(self, actor_name: str = "record_failure") -> None:
        self.actor_name = actor_name

    @property
    def actor_options(self) -> set[str]:
        return {"failure_recorder"}

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is None or not message.failed:
            return
        reason = reason_for(exception)
        options = broker.get_actor(message.actor_name).options
        recorder = options.get("failure_recorder", self.actor_name)
        if recorder is None or message.actor_name == self.actor_name:
            logger.error("Could not record the failure of %s%r: %s", message.actor_name, message.args, reason)
            return
        if not isinstance(exception, CrawlError):
            logger.error("Message %s of %s failed: %r", message.message_id, message.actor_name, exception)
        try:
            broker.get_actor(recorder).send(message.args[0], reason)
        except Exception:  # a lost outcome must at least be visible in the log
            logger.exception("Could not send the failure of %s%r", message.actor_name, message.args)


class Verdict(enum.Enum):
    """What :class:`CrashGuard` does with a message, as its actor's ``on_crash`` handler decides."""

    #: Run it as usual.
    RUN = "run"
    #: Run it while no other guarded message runs in this process.
    RUN_ALONE = "run alone"
    #: The handler dealt with it (split it, or recorded its end): skip it.
    HANDLED = "handled"


class _Turns:
    """A process-wide lock many messages share and one message can hold alone (writers first)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0
        self._waiting_shared = 0

    def acquire(self, alone: bool) -> None:
        with self._condition:
            if alone:
                self._waiting_alone += 1
                try:  # an exception raised into the wait (a time limit) must not leave us counted
                    self._condition.wait_for(lambda: not self._alone and self._sharing == 0)
                finally:
                    self._waiting_alone -= 1
                self._alone = True
            else:
                self._waiting_shared += 1
                try:
                    self._condition.wait_for(lambda: not self._alone and self._waiting_alone == 0)
                finally:
                    self._waiting_shared -= 1
                self._sharing += 1

    def release(self, alone: bool) -> None:
        with self._condition:
            if alone:
                self._alone = False
            else:
                self._sharing -= 1
            self._condition.notify_all()


class CrashGuard(Middleware):
    """Counts the deliveries of a message whose worker died while running it.

    Dramatiq retries on exceptions only: a message that kills its worker process (a decoder
    crash, the kernel's OOM killer) comes back after the heartbeat timeout, forever. Each
    message of an actor with an ``on_crash`` handler marks itself running in Redis for as long
    as it runs; a delivery that finds marks left by earlier ones knows how many times a worker
    died running it. The handler is called with that number (0 on a first delivery) and gives
    a :class:`Verdict`. A message run alone waits for the guarded messages running in its
    process to end, and they for it, so a worker that dies then died of that message alone:
    innocents running next to a culprit are suspected once, never condemned.

    It must come before :class:`~dramatiq.middleware.TimeLimit` (waiting to run alone is not
    running), and its after-hooks run last: the mark goes only when everything else is done.

    Parameters:
      client(redis.Redis): Where the marks live.
      ttl(int): Seconds a mark outlives its message's start (default: :data:`CRASH_MARK_TTL_S`).
    """

    _ARRIVE = """
    local deliveries = redis.call("incr", KEYS[1])
    redis.call("expire", KEYS[1], ARGV[1])
    return deliveries - 1
    """
    _LEAVE = """
    if redis.call("decr", KEYS[1]) <= 0 then
        redis.call("del", KEYS[1])
    end
    """

    def __init__(self, client, *, ttl: int = CRASH_MARK_TTL_S) -> None:
        self.client = client
        self.ttl = ttl
        self._arrive = client.register_script(self._ARRIVE)
        self._leave = client.register_script(self._LEAVE)
        self._turns = _Turns()
        self._local = threading.local()

    @property
    def actor_options(self) -> set[str]:
        return {"on_crash"}

    @staticmethod
    def mark_key(message_id: str) -> str:
        """Where a running message keeps the count of its unfinished deliveries."""
        return f"image-crawler:running:{message_id}"

    def before_process_message(self, broker, message):
        handler = broker.get_actor(message.actor_name).options.get("on_crash")
        if handler is None:
            return
        key = self.mark_key(message.message_id)
        # A message is marked only while it holds a turn: one waiting for its turn when the
        # process dies did not die running.
        self._turns.acquire(alone=False)
        self._local.held = (key, False)
        try:
            deaths = int(self._arrive(keys=[key], args=[self.ttl]))
        except redis.exceptions.RedisError as exc:
            # Dramatiq runs a message whose before-hook raised anything but a MiddlewareError
            # (dramatiq_internals, detail 14).
            raise GuardUnavailable(f"cannot mark {message} as running") from exc
        try:
            verdict = handler(message, deaths)
        except Exception:
            # Undecided (a store is down). Dramatiq runs a message whose before-hook raised, so
            # run it as safely as we can: alone, counted, if a worker ever died running it.
            logger.exception("Could not decide what to do with %s after %d worker deaths", message, deaths)
            verdict = Verdict.RUN_ALONE if deaths else Verdict.RUN
        if verdict is Verdict.HANDLED:
            raise SkipMessage(f"handled after {deaths} worker deaths")
        if verdict is Verdict.RUN_ALONE:
            logger.warning("Running %s alone: its worker died %d time(s) running it.", message, deaths)
            try:
                self._leave(keys=[key])
                self._local.held = None
                self._turns.release(alone=False)
                self._turns.acquire(alone=True)
                self._local.held = (key, True)
                self._arrive(keys=[key], args=[self.ttl])
            except redis.exceptions.RedisError as exc:
                raise GuardUnavailable(f"cannot mark {message} as running alone") from exc

    def after_process_message(self, broker, message, *, result=None, exception=None):
        self._finish()

    def after_skip_message(self, broker, message):
        self._finish()

    def _finish(self) -> None:
        held = getattr(self._local, "held", None)
        if held is None:
            return
        self._local.held = None
        key, alone = held
        try:
            self.client.delete(key)
        finally:
            self._turns.release(alone)


#: Hash of the broker id of every running worker process → ``"<worker threads>:<listed at, ms>"``:
#: the processes a short run is cut for (``actors._cluster_threads``).
WORKERS_KEY = "image-crawler:workers"
#: How often a worker process that takes messages lists itself in :data:`WORKERS_KEY` again.
RELIST_S = 10.0


class WorkerShape(Middleware):
    """Remembers how many worker threads this process runs (``--threads``), for batch sizing,
    and lists the process in :data:`WORKERS_KEY` while its worker runs.

    Dramatiq's heartbeats name every broker that sent a command lately, ``image-crawler
    enqueue``'s too (its dispatch script beats at each command): only a process that booted a
    worker is listed here, with its own number of threads and when it last listed itself (at
    boot, and again every :data:`RELIST_S` while it takes messages). An entry stops counting
    once its process's heartbeat is gone, and the next count drops it if it was not listed
    again meanwhile: a process that stopped or was killed, or one whose heartbeat Redis lost
    for a while (it lists itself again with its next message). Nothing is written at shutdown,
    so a stop during a Redis outage is not held up by it.
    """

    def __init__(self, default_threads: int = DEFAULT_WORKER_THREADS) -> None:
        self.threads = default_threads
        self._listed_at = 0.0

    def after_worker_boot(self, broker, worker):
        self.threads = worker.worker_threads
        self._list(broker)

    def before_process_message(self, broker, message):
        if time.monotonic() - self._listed_at >= RELIST_S:
            try:
                self._list(broker)
            except redis.exceptions.RedisError:  # only batch sizing depends on it: never the message
                logger.warning("could not list this worker in %s; a later message tries again", WORKERS_KEY)

    def _list(self, broker) -> None:
        self._listed_at = time.monotonic()
        listed_ms = int(time.time() * 1000)
        broker.client.hset(WORKERS_KEY, broker.broker_id, f"{self.threads}:{listed_ms}")


def worker_threads(broker) -> int:
    """The worker threads of this process, as its broker's :class:`WorkerShape` knows them
    (:data:`DEFAULT_WORKER_THREADS` for a broker without one)."""
    shape = next((m for m in broker.middleware if isinstance(m, WorkerShape)), None)
    return shape.threads if shape is not None else DEFAULT_WORKER_THREADS


def worker_metrics_address(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """The host and port the worker metrics exporter listens on, from Dramatiq's variables."""
    host = environ.get("dramatiq_prom_host") or WORKER_METRICS_HOST
    return host, int(environ.get("dramatiq_prom_port") or WORKER_METRICS_PORT)


class WorkerMetrics(prometheus.Prometheus):
    """Dramatiq's Prometheus middleware, its exporter at :func:`worker_metrics_address`.

    Each worker process counts its messages in files under ``dramatiq_prom_db`` (default:
    ``<tmp>/dramatiq-prometheus``); one process forked by the ``dramatiq`` command serves the sum.
    Overriding ``forks`` replaces Dramatiq's exporter (dramatiq_internals, detail 17).
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
    MultiProcessCollector(registry, path=prometheus_db_path())
    host, port = worker_metrics_address()
    _, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    thread.join()
    return 0
