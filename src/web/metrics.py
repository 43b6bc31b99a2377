"""The metrics blueprint: ``GET /metrics``, the crawl's state for Prometheus, read at each scrape.

Every value is read from MongoDB and Redis when Prometheus asks, by a collector in a registry of
the app's own (never prometheus_client's global one). What a scrape reads stays the same size
however long the ledger grows (README: Metrics), but for the counters' sum below:

* outcomes by outcome — summed from the per-minute counters
  (:func:`~image_crawler.outcomes.counted_totals`), which grow with the minutes a crawl was
  busy, not with its outcomes;
* images stored — the collection's metadata (:func:`~image_crawler.storage.count_images`);
* recent errors by reason — the error-reason counters of the last :data:`RECENT_ERROR_MINUTES`
  minutes (:func:`~image_crawler.outcomes.top_error_reasons`);
* runs not finished by state, and their lines without an outcome — the runs not finished
  (:func:`~image_crawler.outcomes.unfinished_runs`, which marks those it finds over, so the read
  stays the size of the runs going on);
* queues — four counters per Dramatiq queue, and the workers' two download counters
  (:func:`~image_crawler.context.count_downloads`), in one Redis transaction.

A store that does not answer leaves its metrics out and ``image_crawler_up{store=…}`` at 0:
the scrape still answers 200, and why the store is down goes to the log.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import pymongo.errors
import redis.exceptions
from flask import Blueprint, Response, current_app
from flask.blueprints import BlueprintSetupState
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from image_crawler import outcomes, storage
from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE
from image_crawler.context import DOWNLOADED_BODIES_KEY, DOWNLOADED_BYTES_KEY
from image_crawler.dramatiq_internals import queue_keys
from image_crawler.outcomes import counted_totals, top_error_reasons, unfinished_runs
from image_crawler.redaction import redact

from .db import get_db, get_redis

bp = Blueprint("metrics", __name__)

#: Errors count as recent for this many minutes after they ended.
RECENT_ERROR_MINUTES = 5
#: Reasons named in ``image_crawler_recent_errors``; the rest are summed as ``other``.
METRIC_REASONS = 20

#: The states of a run not finished (:attr:`~image_crawler.outcomes.RunSummary.state`, but ``done``),
#: each reported in ``image_crawler_runs`` even when no run is in it.
RUN_STATES = tuple(state for state in outcomes.RUN_STATES if state != "done")

#: The queues of the pipeline, as the workers consume them.
QUEUES = (ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE)

_REGISTRY = "image_crawler.metrics"
_FAILURES: dict[str, tuple[type[BaseException], ...]] = {
    "mongo": (pymongo.errors.PyMongoError, OSError),
    "redis": (redis.exceptions.RedisError, OSError),
}


@bp.record_once
def _give_the_app_its_registry(state: BlueprintSetupState) -> None:
    registry = CollectorRegistry()
    registry.register(CrawlCollector())
    state.app.extensions[_REGISTRY] = registry


@bp.get("/metrics")
def metrics() -> Response:
    """The crawl's metrics in Prometheus' text format, read now from MongoDB and Redis."""
    registry: CollectorRegistry = current_app.extensions[_REGISTRY]
    response = Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
    response.cache_control.no_store = True
    return response


class CrawlCollector:
    """A prometheus_client collector of the crawl's state; reads the current app's stores."""

    def collect(self) -> Iterator[Metric]:
        """Every metric of both stores, then ``image_crawler_up`` saying which store answered."""
        up = GaugeMetricFamily(
            "image_crawler_up",
            "Whether this scrape could read the store (1) or it did not answer (0).",
            labels=["store"],
        )
        readers: dict[str, Callable[[], Iterable[Metric]]] = {"mongo": _from_mongo, "redis": _from_redis}
        for store, read in readers.items():
            try:
                families = list(read())
            except _FAILURES[store] as exc:
                up.add_metric([store], 0)
                current_app.logger.warning(
                    "metrics: %s is down: %s", store, redact(f"{type(exc).__name__}: {exc}")
                )
            else:
                up.add_metric([store], 1)
                yield from families
        yield up


def _from_mongo() -> Iterator[Metric]:
    db = get_db()
    ended = CounterMetricFamily(
        "image_crawler_outcomes",
        "URL lines that ended, by outcome (success, duplicate, error).",
        labels=["outcome"],
    )
    for outcome, count in counted_totals(db).items():
        ended.add_metric([outcome], count)
    yield ended

    yield GaugeMetricFamily(
        "image_crawler_images_stored",
        "Distinct images stored (MongoDB's estimate from collection metadata).",
        value=storage.count_images(db),
    )

    recent = GaugeMetricFamily(
        "image_crawler_recent_errors",
        f"Error outcomes of the last {RECENT_ERROR_MINUTES} minutes (this one and those before) by reason,"
        f" without the detail after a colon; the {METRIC_REASONS} most frequent reasons are named, the"
        " others summed as other.",
        labels=["reason"],
    )
    for reason, count in _recent_reasons():
        recent.add_metric([reason], count)
    yield recent

    unfinished = unfinished_runs(db)
    by_state = Counter(summary.state for summary in unfinished)
    runs = GaugeMetricFamily(
        "image_crawler_runs",
        "Runs not finished, by state: sending (enqueue is still reading its list), stalled (still sending"
        " by its record, but its enqueue gave no sign for a while), running (all sent, lines left)"
        " or interrupted (enqueue stopped before the end, lines left).",
        labels=["state"],
    )
    for state in RUN_STATES:
        runs.add_metric([state], by_state[state])
    yield runs
    yield GaugeMetricFamily(
        "image_crawler_lines_in_flight",
        "URL lines sent by the runs not finished that have no outcome yet.",
        value=sum(summary.in_flight for summary in unfinished),
    )


def _recent_reasons() -> list[tuple[str, int]]:
    """``(reason, count)`` of the recent errors, the most frequent first, ``other`` last."""
    since = storage.this_minute() - dt.timedelta(minutes=RECENT_ERROR_MINUTES - 1)
    counts: Counter[str] = Counter()
    for reason, count in top_error_reasons(get_db(), since=since, limit=0):
        counts[outcomes.reason_kind(reason)] += count
    named = counts.most_common(METRIC_REASONS)
    rest = sum(counts.values()) - sum(count for _, count in named)
    return named + ([("other", rest)] if rest else [])


def _from_redis() -> Iterator[Metric]:
    # Per queue, the keys of dramatiq_internals.queue_keys (fetched = messages not acked - waiting);
    # one transaction reads them all, with the workers' download counters (absent until counted).
    with get_redis().pipeline(transaction=True) as pipe:
        for queue in QUEUES:
            keys = queue_keys(queue)
            pipe.llen(keys.waiting)
            pipe.hlen(keys.messages)
            pipe.hlen(keys.delayed_messages)
            pipe.zcard(keys.dead)
        pipe.mget(DOWNLOADED_BYTES_KEY, DOWNLOADED_BODIES_KEY)
        *counts, (downloaded_bytes, downloads) = pipe.execute()

    messages = GaugeMetricFamily(
        "image_crawler_queue_messages",
        "Unfinished messages per Dramatiq queue: waiting for a worker, delayed (due later, such as a retry"
        " after its backoff), or in flight (taken by a worker, running or prefetched, not yet acknowledged).",
        labels=["queue", "state"],
    )
    dead = GaugeMetricFamily(
        "image_crawler_queue_dead_messages",
        "Messages per Dramatiq queue that failed for good, kept by Dramatiq for 7 days.",
        labels=["queue"],
    )
    for index, queue in enumerate(QUEUES):
        waiting, unacked, delayed, dead_lettered = counts[4 * index : 4 * index + 4]
        messages.add_metric([queue, "waiting"], waiting)
        messages.add_metric([queue, "delayed"], delayed)
        messages.add_metric([queue, "in_flight"], max(0, unacked - waiting))
        dead.add_metric([queue], dead_lettered)
    yield messages
    yield dead

    yield CounterMetricFamily(
        "image_crawler_downloaded_bytes",
        "Bytes of the bodies downloaded in full, counted by workers; resets with Redis.",
        value=int(downloaded_bytes or 0),
    )
    yield CounterMetricFamily(
        "image_crawler_downloads",
        "Bodies downloaded in full, counted by workers; resets with Redis.",
        value=int(downloads or 0),
    )
