"""One fetch batch's downloads, seen from the server: concurrent, bounded, retried line by line.

docs/architecture.md, "The flow": ``fetch`` downloads its lines concurrently on the process's
download threads (``FETCH_CONCURRENCY`` of them, over every batch the process fetches), and a
transient failure sends *that line* again, alone, with its attempt count and a backoff; the rest
of the batch goes on. Each test sends its batch as one fetch message (as ``admit`` would, with
no cutting of a short run in the way) to a real in-process pipeline, and judges by what the local
server observed: when each request arrived and was answered, how many were in flight at once,
how many times each URL was asked for, and by the fetch messages the broker was given.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import dramatiq
import pytest

from image_crawler import storage
from support.http_server import LocalHttpServer, Response, _Handler
from support.images import png_bytes

#: Longest the server holds an answer back waiting for other requests (a correct fetch needs far
#: less; within the suite's FETCH_TIMEOUT of 5 s, so a held download never times out).
HOLD_S = 3.0


class _TimedHandler(_Handler):
    """The suite's handler, also noting when each request arrived and when its answer was written,
    and holding an answer back while its path's condition (:meth:`TimedServer.hold`) is not met."""

    def _answer(self, *, send_body: bool) -> None:
        owner: TimedServer = self.server.owner  # type: ignore[assignment]
        path = urlsplit(self.path).path
        began = owner.arrived(path)
        try:
            owner.wait_for_turn(path)
            super()._answer(send_body=send_body)
        finally:
            owner.answered(path, began)


class TimedServer(LocalHttpServer):
    """A :class:`LocalHttpServer` that keeps, per path, the ``(arrived, answered)`` times of its
    requests (``time.monotonic()``), and can hold a path's answers until other requests came or went."""

    def __init__(self) -> None:
        super().__init__()
        self._httpd.RequestHandlerClass = _TimedHandler
        self._seen = threading.Condition()
        self._arrivals: dict[str, list[float]] = {}
        self._spans: dict[str, list[tuple[float, float]]] = {}
        self._holds: dict[str, Callable[[], bool]] = {}

    def hold(
        self, path: str, *, until_arrived: Sequence[str] = (), until_answered: Sequence[str] = ()
    ) -> None:
        """Answer ``path`` only once every path of ``until_arrived`` was asked for and every one of
        ``until_answered`` was answered, or after :data:`HOLD_S` if that does not happen."""
        self._holds[path] = lambda: (
            all(p in self._arrivals for p in until_arrived) and all(p in self._spans for p in until_answered)
        )

    def arrived(self, path: str) -> float:
        with self._seen:
            now = time.monotonic()
            self._arrivals.setdefault(path, []).append(now)
            self._seen.notify_all()
            return now

    def wait_for_turn(self, path: str) -> None:
        condition = self._holds.get(path)
        if condition is not None:
            with self._seen:
                self._seen.wait_for(condition, timeout=HOLD_S)

    def answered(self, path: str, began: float) -> None:
        with self._seen:
            self._spans.setdefault(path, []).append((began, time.monotonic()))
            self._seen.notify_all()

    def spans(self, path: str) -> list[tuple[float, float]]:
        with self._seen:
            return list(self._spans.get(path, []))


class EnqueuedFetches(dramatiq.Middleware):
    """Every fetch message given to the broker: ``(its batch, its delay in ms or None)``, once each.

    A delayed message is enqueued a second time, by the worker, when it is due (from the delay
    queue to the queue, with the same message id): that move is not a message sent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        self._sent: list[tuple[dict[str, Any], int | None]] = []

    def after_enqueue(self, broker, message, delay) -> None:
        if message.actor_name == "fetch":
            with self._lock:
                if message.message_id not in self._ids:
                    self._ids.add(message.message_id)
                    self._sent.append((message.args[0], delay))

    def sent(self) -> list[tuple[dict[str, Any], int | None]]:
        with self._lock:
            return list(self._sent)


@pytest.fixture
def server() -> Iterator[TimedServer]:
    with TimedServer() as running:
        yield running


@pytest.fixture
def enqueued(redis_url) -> Iterator[EnqueuedFetches]:
    from image_crawler import actors

    recorder = EnqueuedFetches()
    actors.broker.add_middleware(recorder)
    try:
        yield recorder
    finally:
        actors.broker.middleware.remove(recorder)


def _send_batch(urls: list[str]) -> tuple[str, list[list[Any]]]:
    """Send ``urls`` as one fetch message of a new run (lines 1…); returns the run and its lines."""
    from image_crawler import actors

    run = f"batch-{uuid.uuid4().hex[:8]}"
    message = actors.fetch_message(run, [(line, url) for line, url in enumerate(urls, start=1)])
    actors.fetch.send(message)
    return run, message["lines"]


def _outcomes(pipeline, run: str, lines: int) -> dict[int, tuple[str, str | None]]:
    pipeline.wait_for(run, lines, timeout=60)
    ledger = storage.ledger(pipeline.db).find({"run": run})
    return {doc["line"]: (doc["outcome"], doc.get("reason")) for doc in ledger}


def test_a_slow_url_does_not_hold_up_the_other_downloads_of_its_batch(make_pipeline, server):
    # One worker thread: whatever overlaps inside the batch overlaps on its download threads.
    pipeline = make_pipeline(threads=1)
    fast = [f"/fast/{n}.png" for n in range(5)]
    for n, path in enumerate(fast):
        server.add(path, body=png_bytes(20 + n, 16, seed=10 + n), content_type="image/png")
        server.hold(path, until_arrived=["/slow.png"])  # so that each is answered while the slow one waits
    # The slow one is held until every fast one was answered: at once if they ran beside it, for
    # HOLD_S (and then before any of them) if they waited for it.
    server.add("/slow.png", body=png_bytes(20, 20, seed=1), content_type="image/png")
    server.hold("/slow.png", until_answered=fast)

    run, _ = _send_batch([server.url("/slow.png")] + [server.url(path) for path in fast])

    assert _outcomes(pipeline, run, 6) == dict.fromkeys(range(1, 7), ("success", None))
    ((slow_arrived, slow_answered),) = server.spans("/slow.png")
    for path in fast:
        ((arrived, answered),) = server.spans(path)
        # Asked for and answered while the slow one was in flight. Made one after another (in
        # any order), those before the slow one would be answered before it arrived, and those
        # after it asked for only once it was answered.
        assert arrived < slow_answered and slow_arrived < answered < slow_answered, path


def test_a_transient_failure_is_sent_again_alone_with_its_attempt_count(make_pipeline, server, enqueued):
    pipeline = make_pipeline(threads=2)
    server.add_sequence(
        "/flaky.png",
        [Response(status=503), Response(body=png_bytes(30, 30, seed=2), content_type="image/png")],
    )
    steady = [f"/steady/{n}.png" for n in range(4)]
    for n, path in enumerate(steady):
        server.add(path, body=png_bytes(24, 18 + n, seed=20 + n), content_type="image/png")
    urls = [server.url(steady[0]), server.url(steady[1]), server.url("/flaky.png")]
    urls += [server.url(path) for path in steady[2:]]

    run, lines = _send_batch(urls)

    assert _outcomes(pipeline, run, 5) == dict.fromkeys(range(1, 6), ("success", None))
    sent = enqueued.sent()
    assert [batch for batch, _ in sent] == [
        {"run": run, "lines": lines},  # the batch as the test sent it, every attempt count 0
        {"run": run, "lines": [[3, server.url("/flaky.png"), 1]]},  # the 503 alone, its first retry
    ]
    assert sent[1][1] is not None and sent[1][1] > 0  # with a backoff
    assert server.hits("/flaky.png") == 2
    assert [server.hits(path) for path in steady] == [1, 1, 1, 1]  # the rest of the batch: once each


def test_a_process_runs_at_most_fetch_concurrency_downloads_at_once_over_all_its_batches(
    make_pipeline, server
):
    from image_crawler.fetching import Fetcher

    concurrency = 3
    # Two worker threads, each with a batch of 4 slow lines: 8 downloads asked for at once.
    pipeline = make_pipeline(threads=2, fetch_concurrency=concurrency, host_concurrency=0)
    # The HTTP pool would bound them too (test_fetching.py checks it): give the process a pool far
    # larger, so that what is counted below is its download threads alone (context.py).
    pipeline.context.fetcher.close()
    pipeline.context.fetcher = Fetcher(replace(pipeline.settings, fetch_concurrency=32))
    paths = [f"/held/{n}.png" for n in range(8)]
    for n, path in enumerate(paths):
        server.add(path, body=png_bytes(16, 16 + n, seed=30 + n), content_type="image/png", delay=0.4)

    runs = [_send_batch([server.url(path) for path in paths[start : start + 4]])[0] for start in (0, 4)]

    for run in runs:
        assert _outcomes(pipeline, run, 4) == dict.fromkeys(range(1, 5), ("success", None))
    first, second = ([server.spans(path)[0] for path in paths[start : start + 4]] for start in (0, 4))
    # The two batches were fetched at the same time (a pool per batch would have let 6 through).
    assert min(arrived for arrived, _ in second) < max(answered for _, answered in first)
    assert min(arrived for arrived, _ in first) < max(answered for _, answered in second)
    assert server.most_in_flight(f"127.0.0.1:{server.port}") == concurrency
    assert [server.hits(path) for path in paths] == [1] * 8
