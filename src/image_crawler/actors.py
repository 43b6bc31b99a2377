"""The pipeline's actors: admit → fetch(batch) → group[md5, grayscale] → collect, and the recorders.

Importing this module sets up the broker, so ``dramatiq image_crawler.actors`` starts
workers. The unit of a message is a *batch* of up to ``BATCH_SIZE`` URL lines of one run;
every line keeps its own fate inside it (docs/architecture.md, "The flow"):

* ``admit`` cuts a batch of ``enqueue`` (:data:`ADMIT_BATCH` lines) into fetch batches, once.
* ``fetch`` downloads its lines concurrently, ends permanent failures at once, sends each
  transient failure again alone (with backoff, up to ``FETCH_RETRIES``), parks the bodies of
  the others under a claim made for this execution, and runs ``group([md5, grayscale])`` on
  that *parcel* with ``collect`` as completion callback.
* ``md5`` returns the digests of the parcel's bodies; ``grayscale`` parks their PNGs and
  returns sizes or, per line, why the body is not an image.
* ``collect`` stores the new images, records every outcome of the parcel, and deletes what
  it read from Redis.

Every line ends in exactly one outcome. Any message that fails for good is handed to
``record_failure`` (``record_admit_failure`` for an admission batch) by
:class:`~image_crawler.middleware.RecordFailures`; a message whose worker died running it is
split, run alone or ended by :func:`after_worker_death` through
:class:`~image_crawler.middleware.CrashGuard`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, as_completed
from typing import Any

import dramatiq
import redis
from dramatiq.common import compute_backoff
from dramatiq.middleware import TimeLimitExceeded
from dramatiq.results import ResultMissing as _BackendResultMissing
from dramatiq.results import Results

from . import claims, imaging, outcomes, storage
from .broker import (
    ADMIT_PRIORITY,
    ADMIT_QUEUE,
    FETCH_PRIORITY,
    FETCH_QUEUE,
    HEARTBEAT_TIMEOUT_MS,
    PROCESS_PRIORITY,
    PROCESS_QUEUE,
    setup_broker,
)
from .claims import BODIES, PNGS
from .config import get_settings
from .context import Context, count_downloads, get_context, longest_download_s
from .context import share_redis as _share_redis
from .dramatiq_internals import heartbeats_key, result_message
from .errors import CrawlError, FetchTimeout, HttpStatusError, ResultMissing, ShuttingDown
from .fetching import Download
from .middleware import WORKERS_KEY, Verdict, reason_for, retry_transient, worker_threads
from .outcomes import Job
from .politeness import HostBusy, host_of
from .redaction import install_log_redaction
from .robots import TAG_DISALLOWED, RobotsDisallowed, RobotsPending, forbids_indexing

logger = logging.getLogger(__name__)
# Messages carry URLs as written, credentials included: no log line may show them.
install_log_redaction()

settings = get_settings()
broker = setup_broker(settings)
_share_redis(broker.client)  # one Redis pool per process: claim checks ride the broker's

#: URL lines per admit message.
ADMIT_BATCH = 1_000
#: How long an admitted batch is remembered, so a redelivered batch is not fetched twice.
ADMITTED_TTL_S = 7 * 24 * 3600
_ADMITTED_PREFIX = "image-crawler:admitted"
#: Marks a line sent on alone after its batch's worker died (kept as long as admission marks).
_SPLIT_PREFIX = "image-crawler:split"
_SPLIT_TRIES = 5
#: When a run's last lines are too few to give every worker thread full batches, they are cut
#: into about this many batches per thread, so no thread idles while another holds a long batch.
BATCHES_PER_THREAD = 4
#: Most bytes of bodies or PNGs read from (or parked in) Redis in one round trip: a batch of
#: large images moves a few at a time.
MOVE_BYTES = 16 * 1024 * 1024
#: Seconds after a fetch starts within which each of its downloads must start (all of them
#: then end within the fetch's time limit of 2 × FETCH_TIMEOUT + 60 s, with time to spare for
#: recording and sending what follows). Those that cannot,
#: because this process's FETCH_CONCURRENCY download threads are busy, go on in a new message.
START_WITHIN_S = 30
#: How long a line that could not start waits before it is fetched again (ms): the download
#: threads were all busy, and sending it straight back would only churn the queue.
NOT_STARTED_DELAY_MS = 5_000
#: Times in a row a line may be postponed so before that counts as an attempt (a process whose
#: download threads stay stuck must not keep a line going round for ever).
POSTPONE_LIMIT = 10
#: Backoff of a URL's transient failures (ms): 2 s, 4 s, 8 s… with jitter, at most 5 minutes.
RETRY_MIN_BACKOFF_MS = 2_000
RETRY_MAX_BACKOFF_MS = 300_000
#: Shortest wait of a line whose host had no turn free (ms): less would only churn the queue.
HOST_WAIT_MIN_MS = 250
#: Retries of a message that failed as a whole because Redis or MongoDB did (admit, fetch, the
#: recorders), and the longest backoff between them: together, through an outage of an hour.
STORE_RETRIES = 20
STORE_MAX_BACKOFF_MS = 300_000
#: Retries of md5 and grayscale (a result or a parked body not readable yet), and of collect.
PROCESS_RETRIES = 5
COLLECT_RETRIES = 10
COLLECT_MAX_BACKOFF_MS = 120_000
#: Time limit of a grayscale message: a minute per line (a 49-megapixel JPEG takes 4 s of CPU
#: here, more while it waits for the decode budget or shares the cores), never less than
#: Dramatiq's default of 10 minutes.
GRAYSCALE_MS_PER_LINE = 60_000
GRAYSCALE_LEAST_MS = 600_000


def admitted_key(batch: dict[str, Any]) -> str:
    """The Redis key that marks a batch as admitted (named after its first line)."""
    first_line = batch["lines"][0][0] if batch["lines"] else 0
    return f"{_ADMITTED_PREFIX}:{batch['run']}:{first_line}"


def jobs_of(batch: dict[str, Any]) -> list[Job]:
    """The jobs of any message of the pipeline (its ``run`` and ``[line, url, …]`` lines)."""
    return [Job.new(batch["run"], int(line[0]), line[1]) for line in batch["lines"]]


def fetch_batch_size(run_lines: int | None, *, threads: int, batch_size: int) -> int:
    """Lines per fetch message for a run of ``run_lines`` lines (None: not known yet, a long run).

    ``batch_size``, unless the run is too short to give each of ``threads`` worker threads
    :data:`BATCHES_PER_THREAD` full batches: then it is cut finer.
    """
    if run_lines is None:
        return batch_size
    return max(1, min(batch_size, math.ceil(run_lines / (max(1, threads) * BATCHES_PER_THREAD))))


def _cluster_threads() -> int:
    """Worker threads of the whole cluster: this process's, and those of every other worker
    process listed in ``WORKERS_KEY`` whose heartbeat is live (docs/architecture.md, "The
    flow": admit). Entries of processes that booted a heartbeat timeout ago and beat no more
    (stopped, killed, or not heard of since) are dropped."""
    now_ms = int(time.time() * 1000)
    since = now_ms - HEARTBEAT_TIMEOUT_MS
    with broker.client.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(heartbeats_key(broker.namespace), since, "+inf")
        pipe.hgetall(WORKERS_KEY)
        live, workers = pipe.execute()
    beating = {_as_str(name) for name in live}
    others, dead = 0, []
    for name, entry in workers.items():
        threads, _, listed_ms = _as_str(entry).partition(":")
        if _as_str(name) == broker.broker_id:
            continue
        if _as_str(name) in beating:
            others += int(threads)
        elif int(listed_ms or 0) < since:  # one just booted may not have beaten yet
            dead.append(name)
    if dead:
        broker.client.hdel(WORKERS_KEY, *dead)
    return worker_threads(broker) + others


def _as_str(value: bytes | str) -> str:
    """Redis answers bytes; broker ids are compared as str."""
    return value.decode() if isinstance(value, bytes) else value


def fetch_message(run: str, lines: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The argument of a fetch message: ``[line, url, attempts so far(, times postponed)]`` lines."""
    return {"run": run, "lines": [_fetch_line(*line) for line in lines]}


def _fetch_line(line: int, url: str, attempts: int = 0, postponed: int = 0) -> list[Any]:
    return [int(line), url, int(attempts)] + ([int(postponed)] if postponed else [])


def _cut(lines: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(lines), size):
        yield lines[start : start + size]


@dramatiq.actor(
    queue_name=ADMIT_QUEUE,
    priority=ADMIT_PRIORITY,
    retry_when=retry_transient(STORE_RETRIES),
    max_backoff=STORE_MAX_BACKOFF_MS,
    failure_recorder="record_admit_failure",
)
def admit(batch: dict[str, Any]) -> None:
    """Send fetch messages for the ``[line, url]`` lines of ``batch["lines"]`` of run ``batch["run"]``.

    All of them in one MULTI/EXEC with the batch's admitted mark, which the transaction WATCHes:
    a batch redelivered after a worker died, or delivered twice at once, is admitted once; a
    transaction whose reply was lost is not sent again but retried as a message, and finds
    the mark if it ran.
    """
    key = admitted_key(batch)
    if broker.client.exists(key):
        return
    lines = batch["lines"]
    batch_size = get_context().settings.batch_size
    size = fetch_batch_size(batch.get("run_lines"), threads=_cluster_threads(), batch_size=batch_size)
    with broker.pipelined(transaction=True) as pipe:
        pipe.watch(key)
        if pipe.exists(key):
            pipe.unwatch()
            return
        pipe.multi()
        for part in _cut(lines, size):
            fetch.send(fetch_message(batch["run"], part))
        pipe.set(key, 1, ex=ADMITTED_TTL_S)


def after_worker_death(message: dramatiq.Message, deaths: int) -> Verdict:
    """What to do with a pipeline message delivered again after ``deaths`` workers died running it.

    A fetch or grayscale batch is split: each line not finished yet goes on in a fetch message
    of its own (those two run code that parses what servers send). An md5 or collect message
    runs alone instead: splitting it would download its lines again, and a collect that died
    after storing an image must find it. A message of one line runs alone, until workers died
    ``MAX_DELIVERIES`` times running it: then its lines end in an error.
    """
    if deaths == 0:
        return Verdict.RUN
    batch = message.args[0]
    context = get_context()
    jobs = _unfinished(context, jobs_of(batch))
    if not jobs:
        return Verdict.HANDLED
    if len(jobs) > 1 and message.actor_name in (fetch.actor_name, grayscale.actor_name):
        logger.warning("%s: its worker died running it; its %d lines go on one by one.", message, len(jobs))
        attempts = {int(line[0]): int(line[2]) for line in batch["lines"] if len(line) > 2}
        _split([(job, attempts.get(job.line, 0)) for job in jobs])
        return Verdict.HANDLED
    if deaths >= context.settings.max_deliveries:
        reason = f"worker crashed while processing it ({deaths} times)"
        documents = [outcomes.outcome_document(job, outcomes.ERROR, reason=reason) for job in jobs]
        outcomes.record_outcomes(context.db, documents)
        if "claim" in batch:
            context.claims.drop(batch["claim"])
        return Verdict.HANDLED
    return Verdict.RUN_ALONE


def _split(jobs: list[tuple[Job, int]]) -> None:
    """Send each ``(job, attempts)`` on in a fetch message of its own, once: md5 and grayscale of
    one parcel may both be delivered again after the same death, and a line must not be
    fetched (or crash a worker) twice.

    The lines' split marks are set in the same transaction as the messages, which WATCHes
    them: when a concurrent split of the same lines wins, this one looks again.
    """
    keys = [f"{_SPLIT_PREFIX}:{job.id}" for job, _ in jobs]
    for _ in range(_SPLIT_TRIES):
        try:
            with broker.pipelined(transaction=True) as pipe:
                pipe.watch(*keys)
                split = [bool(pipe.exists(key)) for key in keys]
                pipe.multi()
                for (job, tries), key, done in zip(jobs, keys, split, strict=True):
                    if not done:
                        fetch.send(fetch_message(job.run, [(job.line, job.url, tries)]))
                        pipe.set(key, 1, ex=ADMITTED_TTL_S)
            return
        except redis.exceptions.WatchError:
            continue
    raise redis.exceptions.WatchError(f"could not split {len(jobs)} lines in {_SPLIT_TRIES} tries")


#: The options every actor that handles URL lines shares.
_GUARDED: dict[str, Any] = {"on_crash": after_worker_death}


@dramatiq.actor(
    queue_name=FETCH_QUEUE,
    priority=FETCH_PRIORITY,
    # A whole fetch fails only when Redis or MongoDB does (a URL's own failures end or retry
    # that URL): retried like the recorders, through a long outage; also when a store so slow
    # made it run out of time (running twice only repeats work).
    retry_when=retry_transient(STORE_RETRIES, also=(TimeLimitExceeded,)),
    max_backoff=STORE_MAX_BACKOFF_MS,
    # Every download of a batch ends within START_WITHIN_S + its longest (2 × FETCH_TIMEOUT,
    # and its robots.txt) of its start.
    time_limit=int(longest_download_s(settings) * 1000) + 60_000,
    **_GUARDED,
)
def fetch(batch: dict[str, Any]) -> None:
    """Download the batch's ``[line, url, attempts]`` lines at once; start md5 and grayscale on the bodies."""
    # Every download that starts gets its full FETCH_TIMEOUT (which a slow read may stretch to
    # twice that, fetching.py), so one that would start later than START_WITHIN_S after the
    # message did would outlive the time limit: it does not start, its line goes on later.
    started = time.monotonic()
    context = get_context()
    # No look at the ledger first: a fetch delivered again after its worker died was filtered by
    # after_worker_death, and one that runs twice otherwise (a lost ack) only repeats work whose
    # outcomes are already written, which the ledger ignores.
    sorting = _Sorting(context, batch)
    cutoff = started + START_WITHIN_S
    try:
        futures = {context.downloads.submit(_download, context, job.url, cutoff): job for job in sorting.jobs}
    except RuntimeError as exc:
        # The process is exiting (a worker thread may still take a prefetched message after the
        # interpreter shut the download threads down): the batch goes again, to another worker.
        raise ShuttingDown() from exc
    waited = started + START_WITHIN_S + context.longest_download_s - time.monotonic()
    try:
        for future in as_completed(futures, timeout=max(0.0, waited)):
            # Dropped as soon as it is filed: a finished download's body is held only until parked.
            sorting.file(futures.pop(future), future)
    except TimeoutError:
        # Downloads stuck past every deadline (a DNS lookup takes no timeout) end as a timeout,
        # and go on alone if they have retries left; those that never started go on untried.
        for future, job in futures.items():
            if future.cancel():
                sorting.postpone(job)
            elif future.done():  # finished just now
                sorting.file(job, future)
            else:
                sorting.retry_or_end(job, FetchTimeout())
    outcomes.record_outcomes(context.db, sorting.failed)
    parcel = sorting.parcel
    with broker.pipelined() as pipe:
        # The bodies go first on the pipeline: a member never starts before they are parked.
        context.claims.put(parcel["claim"], BODIES, sorting.pending, pipe=pipe)
        count_downloads(pipe, len(parcel["sizes"]), sum(parcel["sizes"]))
        for line, delay in sorting.again:
            fetch.send_with_options(args=(fetch_message(batch["run"], [line]),), delay=delay or None)
        if sorting.waiting:
            # Lines waiting for their hosts go on together, as soon as the first host may be free.
            delay = max(HOST_WAIT_MIN_MS, min(wait for _, wait in sorting.waiting))
            lines = [line for line, _ in sorting.waiting]
            logger.info(
                "%d %s for their hosts' turns, again in %d ms (%s)",
                len(lines),
                "line waits" if len(lines) == 1 else "lines wait",
                delay,
                sorting.busy_hosts(),
            )
            fetch.send_with_options(args=(fetch_message(batch["run"], lines),), delay=delay)
        if parcel["lines"]:
            digests, grays = md5.message(parcel), grayscale.message(parcel)
            group = dramatiq.group([digests, grays])
            members = {"md5": digests.message_id, "grayscale": grays.message_id}
            group.add_completion_callback(collect.message(parcel, sorting.meta, members))
            group.run()


class _Sorting:
    """Where the lines of one fetch end up: the parcel, the failed outcomes, or sent again."""

    def __init__(self, context: Context, batch: dict[str, Any]) -> None:
        self.context = context
        self.jobs = jobs_of(batch)
        self.attempts = {int(line[0]): int(line[2]) if len(line) > 2 else 0 for line in batch["lines"]}
        self.postponed = {int(line[0]): int(line[3]) if len(line) > 3 else 0 for line in batch["lines"]}
        self.parcel: dict[str, Any] = {
            "run": batch["run"],
            "claim": claims.new_claim(),
            "lines": [],
            "sizes": [],
        }
        self.meta: list[list[Any]] = []
        self.pending: dict[int, bytes] = {}  # bodies not parked yet
        self.failed: list[dict[str, Any]] = []
        self.again: list[tuple[list[Any], int]] = []  # ([line, url, attempts, postponed], delay ms)
        self.waiting: list[tuple[list[Any], int]] = []  # lines whose host had no turn free, and the wait

    def file(self, job: Job, future: Future) -> None:
        """File one finished download."""
        try:
            download: Download = future.result()
        except (_NotStarted, _HopPending):
            self.postpone(job)
            return
        except redis.RedisError:
            raise  # the whole fetch goes again once Redis is back (the host gate and robots use it)
        except (HostBusy, RobotsPending) as busy:
            # Not the line's fault, nor a try: it goes again with its attempts as they were.
            line = [job.line, job.url, self.attempts[job.line], self.postponed[job.line]]
            self.waiting.append((line, busy.wait_ms))
            return
        except CrawlError as exc:
            self.retry_or_end(job, exc)
            return
        except Exception as exc:
            logger.exception("Downloading %s failed unexpectedly", job.url)
            self.failed.append(outcomes.outcome_document(job, outcomes.ERROR, reason=reason_for(exc)))
            return
        index = len(self.parcel["lines"])
        self.parcel["lines"].append([job.line, job.url, self.attempts[job.line]])  # attempts: for a split
        self.parcel["sizes"].append(len(download.content))
        # Not the final URL: collect stores the line's URL, and a redirect's may carry credentials.
        self.meta.append([download.content_type, len(download.content)])
        self.pending[index] = download.content
        if sum(len(body) for body in self.pending.values()) >= MOVE_BYTES:
            self.context.claims.put(self.parcel["claim"], BODIES, self.pending)
            self.pending.clear()

    def retry_or_end(self, job: Job, exc: CrawlError) -> None:
        """A transient failure with retries left goes again, alone, with backoff; any other ends the line.

        A ``Retry-After`` is honoured: the line goes no sooner than it says, and ends at once
        (naming the wait) when it says longer than ``RETRY_AFTER_MAX``.
        """
        tries = self.attempts[job.line]
        retry_after = exc.retry_after if isinstance(exc, HttpStatusError) else None
        if retry_after is not None and retry_after > self.context.settings.retry_after_max:
            reason = f"{exc.reason}: retry-after {retry_after:.0f} s is over RETRY_AFTER_MAX"
            self.failed.append(outcomes.outcome_document(job, outcomes.ERROR, reason=reason))
        elif exc.transient and tries < self.context.settings.fetch_retries:
            _, delay = compute_backoff(tries, factor=RETRY_MIN_BACKOFF_MS, max_backoff=RETRY_MAX_BACKOFF_MS)
            if retry_after is not None:
                delay = max(delay, int(retry_after * 1000))
                logger.info(
                    "%s: %s, tried again in %.0f s as Retry-After asks", job.url, exc.reason, delay / 1000
                )
            self.again.append(([job.line, job.url, tries + 1], delay))
        else:
            self.failed.append(outcomes.outcome_document(job, outcomes.ERROR, reason=exc.reason))

    def busy_hosts(self) -> str:
        """The hosts the waiting lines wait for, for the log: a few of them."""
        hosts = sorted({host_of(line[1]) for line, _ in self.waiting})
        return ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")

    def postpone(self, job: Job) -> None:
        """A line that could not start (every download thread busy) goes again later, untried; after
        :data:`POSTPONE_LIMIT` times in a row that counts as an attempt that timed out."""
        times = self.postponed[job.line] + 1
        if times < POSTPONE_LIMIT:
            self.again.append(([job.line, job.url, self.attempts[job.line], times], NOT_STARTED_DELAY_MS))
        else:
            self.retry_or_end(job, FetchTimeout())


class _NotStarted(Exception):
    """A download that could not start within ``START_WITHIN_S`` of its batch: not its fault."""


class _HopPending(Exception):
    """A redirect hop's robots.txt is being fetched by another worker. The line's first URL was
    requested already, so it goes again as a line that could not start: counted towards
    :data:`POSTPONE_LIMIT`, not for ever."""


def _download(context: Context, url: str, cutoff: float) -> Download:
    """Download ``url`` in a turn of its host (else :class:`HostBusy`), unless it is past ``cutoff``.

    With ``OBEY_ROBOTS``, ``url`` and every redirect hop are asked of their robots.txt before
    they are requested; a hop to another host takes no turn there.
    """
    if time.monotonic() >= cutoff:
        raise _NotStarted()
    host = host_of(url)
    with context.hosts.turn(host, until=cutoff):
        try:
            if context.robots is None:
                return context.fetcher.fetch(url)
            robots = context.robots
            robots.check(url, until=cutoff)  # its robots.txt, once a day, in this turn

            def check_hop(hop: str) -> None:  # each redirect's too, before it is requested
                try:
                    robots.check(hop, until=cutoff)
                except RobotsPending as pending:
                    raise _HopPending() from pending

            download = context.fetcher.fetch(url, check_hop=check_hop)
            if forbids_indexing(download.robots_tags, user_agent=robots.user_agent):
                raise RobotsDisallowed(TAG_DISALLOWED)
            return download
        except HttpStatusError as exc:
            if exc.overloaded:
                now = context.hosts.slow_down(host, retry_after_s=exc.retry_after)
                wait = "" if exc.retry_after is None else f", paused {exc.retry_after:.0f} s"
                logger.warning(
                    "%s answered %s: at most %d at once to it for a while%s", host, exc.reason, now, wait
                )
            raise


def _unfinished(context: Context, jobs: list[Job]) -> list[Job]:
    """The jobs that have no outcome yet (a redelivered or repeated message skips the others)."""
    done = outcomes.ended_jobs(context.db, [job.id for job in jobs])
    return [job for job in jobs if job.id not in done]


def _bodies(context: Context, parcel: dict[str, Any]) -> Iterator[tuple[int, bytes]]:
    """The parcel's bodies in order, read a few megabytes at a time."""
    sizes = parcel["sizes"]
    for indexes in claims.chunks(range(len(sizes)), sizes, MOVE_BYTES):
        yield from context.claims.get(parcel["claim"], BODIES, indexes, "body").items()


@dramatiq.actor(
    store_results=True,
    retry_when=retry_transient(PROCESS_RETRIES),
    queue_name=PROCESS_QUEUE,
    priority=PROCESS_PRIORITY,
    **_GUARDED,
)
def md5(parcel: dict[str, Any]) -> list[str]:
    """MD5 hex of each downloaded body of the parcel."""
    context = get_context()
    return [hashlib.md5(body).hexdigest() for _, body in _bodies(context, parcel)]


@dramatiq.actor(
    store_results=True,
    retry_when=retry_transient(PROCESS_RETRIES),
    queue_name=PROCESS_QUEUE,
    priority=PROCESS_PRIORITY,
    time_limit=max(GRAYSCALE_LEAST_MS, settings.batch_size * GRAYSCALE_MS_PER_LINE),
    **_GUARDED,
)
def grayscale(parcel: dict[str, Any]) -> list[dict[str, Any]]:
    """Decode each body, park its grayscale PNG; per body its upright size, or why it is no image."""
    context = get_context()
    results: list[dict[str, Any]] = []
    pending: dict[int, bytes] = {}
    for index, body in _bodies(context, parcel):
        try:
            gray = imaging.to_grayscale(
                body,
                max_pixels=context.settings.max_image_pixels,
                compress_level=context.settings.png_compress_level,
                budget=context.decode_budget,
                formats=context.settings.allowed_image_formats,
            )
        except CrawlError as exc:
            results.append({"error": exc.reason})
            continue
        except Exception as exc:  # one body must not fail the others
            logger.exception("Decoding %s failed unexpectedly", parcel["lines"][index][1])
            results.append({"error": reason_for(exc)})
            continue
        results.append({"width": gray.width, "height": gray.height, "png": len(gray.png)})
        pending[index] = gray.png
        if sum(len(png) for png in pending.values()) >= MOVE_BYTES:
            context.claims.put(parcel["claim"], PNGS, pending)
            pending = {}
    context.claims.put(parcel["claim"], PNGS, pending)
    return results


@dramatiq.actor(
    retry_when=retry_transient(COLLECT_RETRIES),
    max_backoff=COLLECT_MAX_BACKOFF_MS,
    queue_name=PROCESS_QUEUE,
    priority=PROCESS_PRIORITY,
    **_GUARDED,
)
def collect(parcel: dict[str, Any], meta: list[list[Any]], members: dict[str, str]) -> None:
    """Pull md5 and grayscale results, store each new image once, and record every outcome of the parcel."""
    context = get_context()
    jobs = jobs_of(parcel)
    done = outcomes.ended_jobs(context.db, [job.id for job in jobs])
    if len(done) < len(jobs):
        digests: list[str] = _member_result(md5, members["md5"])
        grays: list[dict[str, Any]] = _member_result(grayscale, members["grayscale"])
        _store_and_record(context, parcel, meta, jobs, done, digests, grays)
    backend = _result_backend()
    with broker.client.pipeline(transaction=False) as pipe:
        context.claims.drop(parcel["claim"], pipe=pipe)
        for actor in (md5, grayscale):
            pipe.delete(backend.build_message_key(result_message(actor, members[actor.actor_name])))
        pipe.execute()


def _store_and_record(
    context: Context,
    parcel: dict[str, Any],
    meta: list[list[Any]],
    jobs: list[Job],
    done: set[str],
    digests: list[str],
    grays: list[dict[str, Any]],
) -> None:
    """Store the parcel's new images (PNG first), then record the outcomes of its unfinished jobs."""
    documents: list[dict[str, Any]] = []
    images: list[tuple[int, Job, str]] = []  # (index, job, md5) of the bodies that are images
    for index, job in enumerate(jobs):
        if job.id in done:
            continue
        if "error" in grays[index]:
            documents.append(outcomes.outcome_document(job, outcomes.ERROR, reason=grays[index]["error"]))
        else:
            images.append((index, job, digests[index]))
    # One job per MD5 not stored yet stores it (the first); the others find it stored.
    first, winners = storage.images_to_store(context.db, [digest for _, _, digest in images])
    sizes = [grays[index].get("png", 0) for index in range(len(jobs))]
    for indexes in claims.chunks([images[n][0] for n in first], sizes, MOVE_BYTES):
        pngs = context.claims.get(parcel["claim"], PNGS, indexes, "grayscale image")
        records = []
        for index in indexes:
            job, gray = jobs[index], grays[index]
            content_type, byte_size = meta[index][:2]  # messages of earlier versions carry a third item
            record = storage.ImageRecord(
                md5=digests[index],
                width=gray["width"],
                height=gray["height"],
                source_url=job.url,
                content_type=content_type,
                byte_size=byte_size,
            )
            records.append((record, pngs[index], job.id))
        winners.update(storage.store_new_images(context.db, records))
    documents += [outcomes.image_outcome(job, digest, winners) for _, job, digest in images]
    outcomes.record_outcomes(context.db, documents)


#: Recorders outlast a long MongoDB outage, and their own failures are only logged.
_RECORDER_OPTIONS: dict[str, Any] = {
    "retry_when": retry_transient(STORE_RETRIES),
    "max_backoff": STORE_MAX_BACKOFF_MS,
    "queue_name": PROCESS_QUEUE,
    "priority": PROCESS_PRIORITY,
    "failure_recorder": None,
}


@dramatiq.actor(**_RECORDER_OPTIONS)
def record_failure(batch: dict[str, Any], reason: str) -> None:
    """Record the error outcome of every line of a message that failed for good."""
    context = get_context()
    documents = [outcomes.outcome_document(job, outcomes.ERROR, reason=reason) for job in jobs_of(batch)]
    outcomes.record_outcomes(context.db, documents)
    if "claim" in batch:
        context.claims.drop(batch["claim"])


@dramatiq.actor(**_RECORDER_OPTIONS)
def record_admit_failure(batch: dict[str, Any], reason: str) -> None:
    """Record an error outcome for every line of a batch that could not be admitted."""
    record_failure.fn(batch, f"not admitted: {reason}")


def _member_result(actor: dramatiq.Actor, message_id: str) -> Any:
    try:
        return result_message(actor, message_id).get_result(backend=_result_backend())
    except _BackendResultMissing:
        raise ResultMissing(f"{actor.actor_name} result missing") from None


def _result_backend():
    for middleware in broker.middleware:
        if isinstance(middleware, Results):
            return middleware.backend
    raise RuntimeError("the broker has no Results middleware")
