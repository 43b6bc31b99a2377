"""Benchmark only: ``dramatiq benchmarks.instrumented_actors`` = ``image_crawler.actors`` + stage timing.

The workers run the project's actors, broker and settings unchanged; this module only adds
two timing middleware around them and wraps a few functions the actors call, to see where a
message's time goes:

- ``_Outer`` (first in the middleware list) sees the whole ``process_message`` span, including
  the other middleware's hooks (CrashGuard's mark, storing results, the group barrier,
  enqueueing the callback); it also stamps every message this process enqueues with the time
  it was enqueued.
- ``_Inner`` (last) sees the actor's own run; the wrapped calls (claim-check reads and writes,
  Redis pipelines sent, result reads, ``to_grayscale``, MongoDB reads and writes) split it
  further. Only the outermost wrapped call on a thread counts (a claim put that sends its own
  pipeline is a claim put), so the spans of a message never overlap.
- A fetch message's downloads run on the process's download threads (``FETCH_CONCURRENCY``),
  not on the message's thread: each is timed there, from submission (``download queued``:
  waiting for a free download thread) and from its start (``http download``), and added to the
  message that submitted it. They overlap the message's own time, which is mostly waiting for
  them, so they are kept apart (``download_spans``), not in ``spans``.

Queue wait is the time from enqueue (the stamp, or ``message_timestamp`` for messages sent by
``image-crawler enqueue``, which runs without this module) to the start of processing. Records
stay in memory and are written as JSON to ``$BENCH_STAGE_DIR/stages-<pid>.json`` when the worker
shuts down, so the measurement adds no I/O to the run. ``worker_boot`` also warms up the
process's context (MongoDB client, indexes, Redis pool, HTTP client, download threads), as the
ceiling does before it starts its clock, and writes ``ready-<pid>``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import redis.client
from dramatiq.middleware import Middleware

from image_crawler import actors, imaging, outcomes, storage
from image_crawler.actors import broker
from image_crawler.claims import ClaimCheck
from image_crawler.context import get_context

_STAGE_DIR = Path(os.environ.get("BENCH_STAGE_DIR", "."))
_ENQUEUED_AT = "bench_enqueued_at"

_local = threading.local()
_records: list[dict[str, Any]] = []
_records_lock = threading.Lock()


def _spans() -> dict[str, float] | None:
    return getattr(_local, "spans", None)


def _timed(label: str | Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, adding its wall time to ``label`` of the message running on this thread.

    ``label`` may be a function of the call's arguments. A call made inside another timed call
    is left to the outer one.
    """

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        spans = _spans()
        if spans is None or getattr(_local, "timing", False):
            return function(*args, **kwargs)
        _local.timing = True
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _local.timing = False
            name = label(*args, **kwargs) if callable(label) else label
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - start

    return timed


def _pipelined(what: str) -> Callable[..., str]:
    """A label for a claim-check call: queued on a caller's pipeline, or sent at once."""

    def label(*args: Any, pipe: Any = None, **kwargs: Any) -> str:
        return f"{what} (queued on a pipeline)" if pipe is not None else what

    return label


ClaimCheck.put = _timed(_pipelined("redis claim put"), ClaimCheck.put)  # type: ignore[method-assign]
ClaimCheck.get = _timed("redis claim get", ClaimCheck.get)  # type: ignore[method-assign]
ClaimCheck.drop = _timed(_pipelined("redis claim drop"), ClaimCheck.drop)  # type: ignore[method-assign]
# What a pipeline queued (bodies, retries, the group, collect's deletions) costs when it is sent.
redis.client.Pipeline.execute = _timed("redis pipeline sent", redis.client.Pipeline.execute)  # type: ignore[method-assign]
imaging.to_grayscale = _timed("to_grayscale", imaging.to_grayscale)
storage.image_jobs = _timed("mongo image_jobs", storage.image_jobs)
storage.store_new_images = _timed("mongo store_new_images", storage.store_new_images)
outcomes.record_outcomes = _timed("mongo record_outcomes", outcomes.record_outcomes)
outcomes.ended_jobs = _timed("mongo ended_jobs (redelivery check)", outcomes.ended_jobs)
actors._member_result = _timed("redis result get", actors._member_result)
dramatiq.group.run = _timed("enqueue group (+ barrier SET)", dramatiq.group.run)  # type: ignore[method-assign]


def _time_downloads(pool: Any) -> None:
    """Make ``pool.submit`` time each download and add it to the submitting message's record."""
    submit = pool.submit

    def timed_submit(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        spans = getattr(_local, "download_spans", None)
        lock = getattr(_local, "download_lock", None)
        submitted = time.perf_counter()

        def run() -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                if spans is not None and lock is not None:
                    with lock:
                        spans["download queued"] = spans.get("download queued", 0.0) + started - submitted
                        spans["http download"] = spans.get("http download", 0.0) + ended - started

        return submit(run)

    pool.submit = timed_submit


def _lines(message: dramatiq.Message) -> int:
    argument = message.args[0] if message.args else None
    return len(argument.get("lines", ())) if isinstance(argument, dict) else 0


class _Outer(Middleware):
    def before_enqueue(self, broker, message, delay):
        message.options[_ENQUEUED_AT] = time.time() * 1000

    def before_process_message(self, broker, message):
        _local.outer_start = time.perf_counter()
        _local.started_at = time.time() * 1000

    def after_process_message(self, broker, message, *, result=None, exception=None):
        inner = getattr(_local, "inner", None)
        if inner is None:
            return
        enqueued_at = message.options.get(_ENQUEUED_AT, message.message_timestamp)
        record = {
            "actor": message.actor_name,
            "lines": _lines(message),
            "enqueued_at": enqueued_at,
            "message_timestamp": message.message_timestamp,
            "started_at": _local.started_at,
            "queue_wait": (_local.started_at - enqueued_at) / 1000,
            "total": time.perf_counter() - _local.outer_start,
            "actor_time": inner["actor_time"],
            "spans": inner["spans"],
            "download_spans": inner["download_spans"],
            "failed": exception is not None,
            "retries": message.options.get("retries", 0),
        }
        _local.inner = None
        with _records_lock:
            _records.append(record)

    after_skip_message = after_process_message

    def after_worker_boot(self, broker, worker):
        # Connections, indexes and download threads, as the ceiling opens them before its clock.
        context = get_context()
        _time_downloads(context.downloads)
        _STAGE_DIR.mkdir(parents=True, exist_ok=True)
        (_STAGE_DIR / f"ready-{os.getpid()}").write_text(str(time.time()))

    def before_worker_shutdown(self, broker, worker):
        with _records_lock:
            data = json.dumps({"pid": os.getpid(), "records": _records})
        path = _STAGE_DIR / f"stages-{os.getpid()}.json"
        partial = path.with_suffix(".part")
        partial.write_text(data)
        partial.replace(path)


class _Inner(Middleware):
    def before_process_message(self, broker, message):
        _local.spans = {}
        _local.download_spans = {}
        _local.download_lock = threading.Lock()
        _local.inner_start = time.perf_counter()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if _spans() is None:  # skipped before this middleware's before-hook ran (CrashGuard)
            _local.inner = {"actor_time": 0.0, "spans": {}, "download_spans": {}}
            return
        with _local.download_lock:
            downloads = dict(_local.download_spans)
        _local.inner = {
            "actor_time": time.perf_counter() - _local.inner_start,
            "spans": _local.spans,
            "download_spans": downloads,
        }
        _local.spans = None
        _local.download_spans = None

    after_skip_message = after_process_message


broker.middleware.insert(0, _Outer())
broker.add_middleware(_Inner())
