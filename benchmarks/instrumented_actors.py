"""Benchmark only: ``dramatiq benchmarks.instrumented_actors`` = ``image_crawler.actors`` + stage timing.

The workers run the project's actors, broker and settings unchanged; this module only adds
two timing middleware around them and wraps a few functions the actors call, to see where a
message's time goes:

- ``_Outer`` (first in the middleware list) sees the whole ``process_message`` span, including
  the other middleware's hooks (storing results, the group barrier, enqueueing the callback);
  it also stamps every message this process enqueues with the time it was enqueued.
- ``_Inner`` (last) sees the actor's own run; the wrapped calls (HTTP download, claim-check
  reads and writes, ``to_grayscale``, MongoDB writes, result reads) split it further.

Queue wait is the time from enqueue (the stamp, or ``message_timestamp`` for messages sent by
``image-crawler enqueue``, which runs without this module) to the start of processing. Records
stay in memory and are written as JSON to ``$BENCH_STAGE_DIR/stages-<pid>.json`` when the worker
shuts down, so the measurement adds no I/O to the run. ``worker_boot`` also warms up the
process's context (MongoDB client, indexes, Redis pool, HTTP client), as the ceiling does before
it starts its clock, and writes ``ready-<pid>``.
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
from dramatiq.middleware import Middleware

from image_crawler import actors, imaging, outcomes, storage
from image_crawler.actors import broker
from image_crawler.claims import ClaimCheck
from image_crawler.context import get_context
from image_crawler.fetching import Fetcher

_STAGE_DIR = Path(os.environ.get("BENCH_STAGE_DIR", "."))
_ENQUEUED_AT = "bench_enqueued_at"

_local = threading.local()
_records: list[dict[str, Any]] = []
_records_lock = threading.Lock()


def _spans() -> dict[str, float] | None:
    return getattr(_local, "spans", None)


def _timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, adding its wall time to ``label`` of the message running on this thread."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spans = _spans()
            if spans is not None:
                spans[label] = spans.get(label, 0.0) + time.perf_counter() - start

    return timed


Fetcher.fetch = _timed("http download", Fetcher.fetch)  # type: ignore[method-assign]
ClaimCheck.put = _timed("redis claim put", ClaimCheck.put)  # type: ignore[method-assign]
ClaimCheck.get = _timed("redis claim get", ClaimCheck.get)  # type: ignore[method-assign]
ClaimCheck.drop = _timed("redis claim drop", ClaimCheck.drop)  # type: ignore[method-assign]
imaging.to_grayscale = _timed("to_grayscale", imaging.to_grayscale)
storage.store_image = _timed("mongo store_image", storage.store_image)
outcomes.record_outcome = _timed("mongo record_outcome", outcomes.record_outcome)
actors._member_result = _timed("redis result get", actors._member_result)
dramatiq.group.run = _timed("enqueue group", dramatiq.group.run)  # type: ignore[method-assign]


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
            "enqueued_at": enqueued_at,
            "message_timestamp": message.message_timestamp,
            "started_at": _local.started_at,
            "queue_wait": (_local.started_at - enqueued_at) / 1000,
            "total": time.perf_counter() - _local.outer_start,
            "actor_time": inner["actor_time"],
            "spans": inner["spans"],
            "failed": exception is not None,
            "retries": message.options.get("retries", 0),
        }
        _local.inner = None
        with _records_lock:
            _records.append(record)

    after_skip_message = after_process_message

    def after_worker_boot(self, broker, worker):
        get_context()  # connections and indexes, as the ceiling opens them before its clock starts
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
        _local.inner_start = time.perf_counter()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        _local.inner = {"actor_time": time.perf_counter() - _local.inner_start, "spans": _local.spans}
        _local.spans = None

    after_skip_message = after_process_message


broker.middleware.insert(0, _Outer())
broker.add_middleware(_Inner())
