"""Retry policy and RecordFailures: transient errors are retried, the rest end in one error outcome."""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import uuid
from types import SimpleNamespace

import dramatiq
import pymongo.errors
import pytest
import redis.exceptions
from dramatiq.broker import MessageProxy
from dramatiq.middleware import TimeLimitExceeded
from dramatiq.results import ResultFailure, Results

from image_crawler import errors, outcomes, storage
from image_crawler.broker import PROCESS_QUEUE
from image_crawler.dramatiq_internals import WORKER_LOGGER
from image_crawler.middleware import (
    CRASH_MARK_TTL_S,
    DEFAULT_WORKER_THREADS,
    WORKERS_KEY,
    CrashGuard,
    ExpectedFailures,
    RecordFailures,
    Verdict,
    WorkerShape,
    _Turns,
    is_transient,
    reason_for,
    retry_transient,
    worker_threads,
)
from support.waiting import wait_until

# --- which failures are worth another try, and what they leave in the outcome ----------


@pytest.mark.parametrize(
    ("exception", "transient", "reason"),
    [
        (errors.HttpStatusError(404), False, "http 404"),
        (errors.HttpStatusError(400), False, "http 400"),
        (errors.HttpStatusError(503), True, "http 503"),
        (errors.HttpStatusError(500), True, "http 500"),
        (errors.HttpStatusError(429), True, "http 429"),
        (errors.HttpStatusError(408), True, "http 408"),
        (errors.FetchTimeout(), True, "timeout"),
        (errors.ConnectionFailed("connection reset"), True, "connection reset"),
        (errors.TooLarge(), False, "too large"),
        (errors.TooManyRedirects(), False, "too many redirects"),
        (errors.InvalidUrl("not an http(s) url"), False, "not an http(s) url"),
        (errors.ForbiddenAddress("private address"), False, "private address"),
        (errors.NotAnImage(), False, "not an image"),
        (errors.TruncatedImage(), False, "truncated image"),
        (errors.TooManyPixels("too many pixels: 1100x1000"), False, "too many pixels: 1100x1000"),
        (errors.ClaimExpired("body expired"), False, "body expired"),
        (errors.ResultMissing("md5 result missing"), True, "md5 result missing"),
        (errors.StoreBusy("grayscale file being written by another worker"), True, None),
        (redis.exceptions.ConnectionError("Connection refused"), True, "redis unavailable"),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), True, "redis unavailable"),
        (redis.exceptions.WatchError("Watched variable changed."), True, "redis unavailable"),
        (pymongo.errors.AutoReconnect("connection closed"), True, "mongodb unavailable"),
        (pymongo.errors.ServerSelectionTimeoutError("no servers"), True, "mongodb unavailable"),
        (pymongo.errors.DuplicateKeyError("E11000"), False, "internal error: DuplicateKeyError"),
        (TimeLimitExceeded(), False, "time limit exceeded"),
        (KeyError("width"), False, "internal error: KeyError"),
        (ValueError("boom"), False, "internal error: ValueError"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_each_failure_is_classified_with_a_short_reason(exception, transient, reason):
    assert is_transient(exception) is transient
    if reason is not None:
        assert reason_for(exception) == reason


def test_the_reason_of_a_crawl_error_is_its_own_not_its_message_text():
    error = errors.FetchError("dns lookup failed")

    assert reason_for(error) == "dns lookup failed"
    assert not is_transient(error)


def test_retry_transient_retries_transient_errors_up_to_the_max():
    retry_when = retry_transient(3)
    busy = errors.StoreBusy("busy")

    assert [retry_when(retries, busy) for retries in range(5)] == [True, True, True, False, False]


def test_retry_transient_never_retries_a_permanent_error():
    retry_when = retry_transient(3)

    assert retry_when(0, errors.HttpStatusError(404)) is False
    assert retry_when(0, KeyError("id")) is False


def test_retry_transient_with_no_retries_gives_up_at_once():
    assert retry_transient(0)(0, errors.FetchTimeout()) is False


# --- RecordFailures, with a stand-in broker --------------------------------------------


class _Broker:
    """Actors by name: each has its options, and what was sent to it is noted in ``sent``."""

    def __init__(self, *, unreachable: bool = False, **options: dict) -> None:
        self.options = options
        self.unreachable = unreachable
        self.sent: list[tuple] = []
        self.middleware: list = []

    def get_actor(self, name: str):
        broker = self

        class _Actor:
            options = broker.options.get(name, {})

            def send(self, *args):
                if broker.unreachable:
                    raise redis.exceptions.ConnectionError("Connection refused")
                broker.sent.append((name, *args))

        return _Actor()


@pytest.fixture
def logged():
    """Messages the middleware logs (works with ``-p no:logging`` too, unlike caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("image_crawler.middleware")
    logger.addHandler(handler)
    yield lambda: "\n".join(record.getMessage() for record in records)
    logger.removeHandler(handler)


#: A message's first argument: a batch (or parcel) of one run's ``[line, url, attempts]`` lines.
_JOB = {"run": "run", "lines": [[3, "http://example.com/a.png", 0]]}


def _message(actor_name: str, *, failed: bool, args: tuple = (_JOB,)) -> MessageProxy:
    proxy = MessageProxy(dramatiq.Message(PROCESS_QUEUE, actor_name, args, {}, {}))
    if failed:
        proxy.fail()
    return proxy


def test_a_message_that_failed_for_good_is_handed_on_with_its_reason():
    broker = _Broker()

    RecordFailures().after_process_message(
        broker, _message("grayscale", failed=True), exception=errors.NotAnImage()
    )

    assert broker.sent == [("record_failure", _JOB, "not an image")]


def test_an_internal_error_is_handed_on_too():
    broker = _Broker()

    RecordFailures().after_process_message(broker, _message("collect", failed=True), exception=KeyError("x"))

    assert broker.sent == [("record_failure", _JOB, "internal error: KeyError")]


def test_a_message_that_will_be_retried_is_not_handed_on():
    broker = _Broker()

    RecordFailures().after_process_message(
        broker, _message("fetch", failed=False), exception=errors.HttpStatusError(503)
    )

    assert broker.sent == []


def test_a_message_that_succeeded_is_not_handed_on():
    broker = _Broker()

    RecordFailures().after_process_message(broker, _message("md5", failed=False), result="abc")

    assert broker.sent == []


def test_a_failure_of_the_recording_actor_itself_is_only_logged(logged):
    broker = _Broker()
    message = _message("record_failure", failed=True, args=(_JOB, "http 404"))

    RecordFailures().after_process_message(
        broker, message, exception=pymongo.errors.ServerSelectionTimeoutError("no servers")
    )

    assert broker.sent == []
    assert "Could not record the failure of record_failure" in logged()


def test_a_failure_that_cannot_be_sent_is_logged_not_raised(logged):
    broker = _Broker(unreachable=True)

    RecordFailures().after_process_message(
        broker, _message("fetch", failed=True), exception=errors.TooLarge()
    )

    assert "Could not send the failure of fetch" in logged()


def test_the_recording_actor_name_is_a_parameter():
    broker = _Broker()

    RecordFailures("note_error").after_process_message(
        broker, _message("fetch", failed=True), exception=errors.TooLarge()
    )

    assert broker.sent == [("note_error", _JOB, "too large")]


def test_an_actor_can_name_its_own_recorder():
    batch = {"run": "run", "lines": [[1, "http://example.com/a.png"]]}
    broker = _Broker(admit={"failure_recorder": "record_admit_failure"})

    RecordFailures().after_process_message(
        broker, _message("admit", failed=True, args=(batch,)), exception=KeyError("x")
    )

    assert broker.sent == [("record_admit_failure", batch, "internal error: KeyError")]


def test_an_actor_whose_recorder_is_none_is_only_logged(logged):
    broker = _Broker(record_admit_failure={"failure_recorder": None})
    message = _message("record_admit_failure", failed=True, args=({"run": "r", "lines": []}, "x"))

    RecordFailures().after_process_message(
        broker, message, exception=pymongo.errors.ServerSelectionTimeoutError("no servers")
    )

    assert broker.sent == []
    assert "Could not record the failure of record_admit_failure" in logged()


# --- RecordFailures in a real worker ---------------------------------------------------


def _job() -> dict:
    """A parcel of one line whose body was never parked (as md5, grayscale and collect get it)."""
    return {
        "run": uuid.uuid4().hex[:12],
        "claim": uuid.uuid4().hex,
        "lines": [[1, "http://example.com/a.png"]],
        "sizes": [10],
    }


def _settle(pipeline) -> None:
    """Wait until the worker has nothing left to do (record_failure messages included)."""
    pipeline.broker.join(PROCESS_QUEUE, timeout=20_000)
    pipeline.worker.join()


def _result_backend(broker):
    return next(middleware.backend for middleware in broker.middleware if isinstance(middleware, Results))


def test_a_group_member_that_fails_for_good_gives_exactly_one_error_outcome(make_pipeline):
    from image_crawler import actors

    pipeline = make_pipeline(threads=4)
    job = _job()  # its body was never parked: both members find the claim check expired
    members = [actors.md5.send(job), actors.grayscale.send(job)]

    for member in members:
        with pytest.raises(ResultFailure, match="body expired"):
            member.get_result(backend=_result_backend(pipeline.broker), block=True, timeout=20_000)
    pipeline.wait_for(job["run"], 1, timeout=20)
    _settle(pipeline)

    ledger = list(storage.ledger(pipeline.db).find({"run": job["run"]}))
    assert [(entry["outcome"], entry["reason"]) for entry in ledger] == [("error", "body expired")]
    assert storage.images(pipeline.db).count_documents({}) == 0


def test_a_collector_without_member_results_raises_a_transient_result_missing(make_pipeline):
    from image_crawler import actors

    make_pipeline(threads=1)
    job = _job()
    members = {"md5": uuid.uuid4().hex, "grayscale": uuid.uuid4().hex}

    with pytest.raises(errors.ResultMissing) as caught:
        actors.collect.fn(job, [["image/png", 10, "http://example.com/a.png"]], members)

    assert caught.value.reason == "md5 result missing"
    assert is_transient(caught.value)
    assert retry_transient(10)(3, caught.value) is True


def test_a_collector_without_member_results_ends_in_error_once_retries_run_out(make_pipeline):
    """An expired result never comes back: after a few short retries the job ends in a clear error."""
    from image_crawler import actors

    pipeline = make_pipeline(threads=2)
    job = _job()
    members = {"md5": uuid.uuid4().hex, "grayscale": uuid.uuid4().hex}

    actors.collect.send(job, [["image/png", 10, "http://example.com/a.png"]], members)
    pipeline.wait_for(job["run"], 1, timeout=60)
    _settle(pipeline)

    ledger = list(storage.ledger(pipeline.db).find({"run": job["run"]}))
    assert [(entry["outcome"], entry["reason"]) for entry in ledger] == [("error", "md5 result missing")]
    assert outcomes.count_outcomes(pipeline.db, job["run"]) == {"success": 0, "duplicate": 0, "error": 1}


def test_a_missing_result_is_retried_only_briefly():
    retry_when = retry_transient(10)
    missing = errors.ResultMissing("md5 result missing")
    assert [retry_when(n, missing) for n in range(6)] == [True] * 4 + [False] * 2
    busy = errors.StoreBusy("busy")
    assert retry_when(9, busy) and not retry_when(10, busy)


# --- CrashGuard: deliveries of a message whose worker died ----------------------------------


@pytest.fixture
def guard(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield CrashGuard(client, ttl=600)
    client.close()


def _guarded_broker(handler) -> _Broker:
    return _Broker(guarded={"on_crash": handler})


def _guarded_message() -> MessageProxy:
    return MessageProxy(dramatiq.Message(PROCESS_QUEUE, "guarded", (_JOB,), {}, {}))


def test_a_first_delivery_is_told_no_worker_died_and_its_mark_goes_when_it_ends(guard):
    seen = []
    broker = _guarded_broker(lambda message, deaths: seen.append(deaths) or Verdict.RUN)
    message = _guarded_message()

    guard.before_process_message(broker, message)
    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 1  # while it runs
    guard.after_process_message(broker, message, exception=RuntimeError("a failure is not a death"))

    assert seen == [0]
    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0
    guard.before_process_message(broker, message)  # retried later: still nobody died
    guard.after_process_message(broker, message)
    assert seen == [0, 0]


def test_a_delivery_after_workers_died_running_it_is_told_how_many(guard):
    seen = []
    broker = _guarded_broker(lambda message, deaths: seen.append(deaths) or Verdict.RUN)
    message = _guarded_message()
    for _ in range(2):  # two deliveries whose worker died: started, never ended
        guard.before_process_message(broker, message)
        guard._local.held = None
        guard._turns.release(False)
    assert 0 < guard.client.ttl(CrashGuard.mark_key(message.message_id)) <= 600  # marks expire

    guard.before_process_message(broker, message)
    guard.after_process_message(broker, message)

    assert seen == [0, 1, 2]
    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0


def test_a_handled_message_is_skipped_and_forgotten(guard):
    from dramatiq.middleware import SkipMessage

    broker = _guarded_broker(lambda message, deaths: Verdict.HANDLED)
    message = _guarded_message()

    with pytest.raises(SkipMessage):
        guard.before_process_message(broker, message)
    guard.after_skip_message(broker, message)

    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0


def test_actors_without_a_handler_are_not_guarded(guard):
    broker = _Broker()
    message = _message("record_failure", failed=False)

    guard.before_process_message(broker, message)
    guard.after_process_message(broker, message)

    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0


def test_a_message_run_alone_waits_for_the_running_ones_and_new_ones_wait_for_it():
    turns = _Turns()
    order: list[str] = []
    turns.acquire(alone=False)  # a message already running

    def suspect():
        turns.acquire(alone=True)
        order.append("suspect runs")
        turns.release(alone=True)

    def newcomer():
        turns.acquire(alone=False)
        order.append("newcomer runs")
        turns.release(alone=False)

    first = threading.Thread(target=suspect)
    first.start()
    wait_until(lambda: turns._waiting_alone == 1, "the suspect to wait alone", pause=0.01)
    second = threading.Thread(target=newcomer)
    second.start()
    wait_until(lambda: turns._waiting_shared == 1, "the newcomer to wait", pause=0.01)  # behind the suspect
    assert order == []
    order.append("running one ends")
    turns.release(alone=False)
    first.join()
    second.join()

    assert order == ["running one ends", "suspect runs", "newcomer runs"]


def test_a_message_waiting_for_its_turn_is_not_marked_as_running(guard):
    broker = _guarded_broker(lambda message, deaths: Verdict.RUN)
    waiting = _guarded_message()
    guard._turns.acquire(alone=True)  # a suspect runs alone in this process

    thread = threading.Thread(target=guard.before_process_message, args=(broker, waiting))
    thread.start()
    wait_until(lambda: guard._turns._waiting_shared == 1, "the message to wait for its turn", pause=0.01)
    # If the suspect killed the process now, the waiting message would not have died running.
    assert guard.client.exists(CrashGuard.mark_key(waiting.message_id)) == 0
    guard._turns.release(alone=True)
    thread.join()

    assert guard.client.exists(CrashGuard.mark_key(waiting.message_id)) == 1  # running now


def test_a_suspect_gives_up_its_shared_turn_and_counts_again_once_alone(guard):
    broker = _guarded_broker(lambda message, deaths: Verdict.RUN_ALONE if deaths else Verdict.RUN)
    message = _guarded_message()
    guard.client.set(CrashGuard.mark_key(message.message_id), 2)  # two workers died running it

    guard.before_process_message(broker, message)

    assert guard._turns._alone
    assert guard.client.get(CrashGuard.mark_key(message.message_id)) == b"3"
    guard.after_process_message(broker, message)
    assert not guard._turns._alone
    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0


def test_a_suspect_whose_handler_fails_still_runs_alone_and_counted(guard):
    """Dramatiq runs a message whose before-hook raised, so a failing handler must not lose the count."""

    def handler(message, deaths):
        raise pymongo.errors.AutoReconnect("mongodb down")

    broker = _guarded_broker(handler)
    message = _guarded_message()
    guard.client.set(CrashGuard.mark_key(message.message_id), 1)  # one worker died running it

    guard.before_process_message(broker, message)  # does not raise: Dramatiq would only log it

    assert guard._turns._alone  # no neighbour can be blamed if it kills the process now
    assert guard.client.get(CrashGuard.mark_key(message.message_id)) == b"2"  # and it would count
    guard.after_process_message(broker, message)
    assert not guard._turns._alone
    assert guard.client.exists(CrashGuard.mark_key(message.message_id)) == 0


def test_a_message_that_cannot_be_marked_is_retried_later_not_run_unguarded(redis_url):
    from dramatiq.middleware import MiddlewareError

    from image_crawler.middleware import GuardUnavailable
    from support.services import free_port

    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    guard = CrashGuard(unreachable, ttl=600)
    broker = _guarded_broker(lambda message, deaths: Verdict.RUN)
    message = _guarded_message()

    with pytest.raises(GuardUnavailable) as caught:
        guard.before_process_message(broker, message)
    with pytest.raises(redis.exceptions.ConnectionError):  # Dramatiq logs an after-hook's error
        guard.after_process_message(broker, message, exception=caught.value)

    assert isinstance(caught.value, MiddlewareError)  # what Dramatiq does not swallow
    assert is_transient(caught.value) and reason_for(caught.value) == "redis unavailable"
    assert guard._turns._sharing == 0  # its turn was given back


def test_an_expected_failure_whose_reason_holds_a_percent_sign_still_logs_one_line():
    try:
        raise errors.CrawlError("100% broken, %s and %(name)s")
    except errors.CrawlError:
        record = logging.LogRecord(
            WORKER_LOGGER,
            logging.ERROR,
            __file__,
            1,
            "Failed to process message %s with unhandled exception.",
            ("fetch(...)",),
            exc_info=sys.exc_info(),
        )

    assert ExpectedFailures().filter(record)

    assert record.getMessage() == (
        "Failed to process message fetch(...) with unhandled exception. (100% broken, %s and %(name)s)"
    )
    assert record.levelname == "WARNING"


# --- WorkerShape: how many threads a worker process runs ---------------------------------------


def test_until_a_worker_boots_its_threads_are_dramatiqs_default():
    default = inspect.signature(dramatiq.Worker.__init__).parameters["worker_threads"].default
    assert default == DEFAULT_WORKER_THREADS  # and `dramatiq --threads`'s (its help says 8)

    assert WorkerShape().threads == DEFAULT_WORKER_THREADS
    assert worker_threads(_Broker()) == DEFAULT_WORKER_THREADS  # a broker without a WorkerShape


def test_a_booted_worker_tells_its_broker_how_many_threads_it_runs_and_lists_itself_while_it_works(
    redis_url, monkeypatch
):
    shape = WorkerShape()
    broker = _Broker()
    broker.middleware = [shape]
    broker.client = redis.Redis.from_url(redis_url)
    broker.broker_id = "test-broker"
    try:
        broker.client.delete(WORKERS_KEY)
        shape.after_worker_boot(broker, SimpleNamespace(worker_threads=3))

        assert worker_threads(broker) == 3
        threads, _, listed_ms = broker.client.hget(WORKERS_KEY, "test-broker").decode().partition(":")
        assert int(threads) == 3 and int(listed_ms) > 0

        broker.client.hdel(WORKERS_KEY, "test-broker")  # as a count does when the heartbeat lapsed
        shape.before_process_message(broker, None)
        assert broker.client.hget(WORKERS_KEY, "test-broker") is None  # listed a moment ago

        monkeypatch.setattr("image_crawler.middleware.RELIST_S", 0.0)
        shape.before_process_message(broker, None)
        assert broker.client.hget(WORKERS_KEY, "test-broker").decode().startswith("3:")
    finally:
        broker.client.close()


def test_a_crash_mark_outlives_its_message_by_a_day_by_default(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        assert CrashGuard(client).ttl == CRASH_MARK_TTL_S == 24 * 3600
    finally:
        client.close()


def test_a_worker_that_cannot_list_itself_still_processes_its_message(dead_port, monkeypatch, caplog):
    shape = WorkerShape()
    broker = _Broker()
    broker.middleware = [shape]
    broker.broker_id = "test-broker"
    broker.client = redis.Redis(port=dead_port, socket_connect_timeout=0.5, retry_on_error=[])
    monkeypatch.setattr("image_crawler.middleware.RELIST_S", 0.0)
    try:
        with caplog.at_level(logging.WARNING, logger="image_crawler.middleware"):
            shape.before_process_message(broker, None)  # Redis is down: no exception for the message
    finally:
        broker.client.close()

    assert f"could not list this worker in {WORKERS_KEY}" in caplog.text
