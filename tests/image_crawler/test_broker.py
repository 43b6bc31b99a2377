"""Dramatiq setup: one Redis for broker, results and group barriers; middleware in an order that matters."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_MAINTENANCE_CHANCE, RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit
from dramatiq.results import Results
from dramatiq.results.middleware import DEFAULT_RESULT_TTL

from image_crawler import broker as broker_module
from image_crawler import cli, dramatiq_internals
from image_crawler.broker import REDIS_OUTAGE_BUDGET_S, connect_redis, create_broker, setup_broker
from image_crawler.config import get_settings
from image_crawler.dramatiq_internals import DistinctGroupCallbacks, ack_set_key, queue_keys
from image_crawler.middleware import CrashGuard, RecordFailures, WorkerShape
from support.services import free_port, start_redis


@pytest.fixture
def settings(redis_url):
    return dataclasses.replace(get_settings(), redis_url=redis_url)


@pytest.fixture
def broker(settings):
    created = create_broker(settings)
    yield created
    created.close()


def _position(broker: RedisBroker, kind: type) -> int:
    kinds = [type(middleware) for middleware in broker.middleware]
    assert kinds.count(kind) == 1, kinds
    return kinds.index(kind)


def _middleware(broker: RedisBroker, kind: type):
    return broker.middleware[_position(broker, kind)]


def _address(client) -> tuple:
    kwargs = client.connection_pool.connection_kwargs
    return kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0)


def test_the_broker_is_a_redis_broker_on_redis_url(broker, redis_url):
    parts = urlsplit(redis_url)

    assert isinstance(broker, RedisBroker)
    assert _address(broker.client) == (parts.hostname, parts.port, 0)
    assert broker.client.ping()


def test_results_and_group_barriers_live_in_the_same_redis(broker):
    results = _middleware(broker, Results)
    groups = _middleware(broker, DistinctGroupCallbacks)

    assert _address(results.backend.client) == _address(broker.client)
    assert _address(groups.rate_limiter_backend.client) == _address(broker.client)


def test_group_callbacks_come_before_results_so_results_are_stored_first(broker):
    assert _position(broker, DistinctGroupCallbacks) < _position(broker, Results)


def test_record_failures_comes_before_retries_so_it_sees_their_verdict(broker):
    assert _position(broker, RecordFailures) < _position(broker, Retries)
    assert _middleware(broker, RecordFailures).actor_name == "record_failure"


def test_the_broker_has_exactly_the_pipeline_middleware(broker):
    assert [type(middleware) for middleware in broker.middleware] == [
        AgeLimit,
        CrashGuard,
        TimeLimit,
        ShutdownNotifications,
        Callbacks,
        Pipelines,
        DistinctGroupCallbacks,
        Results,
        RecordFailures,
        Retries,
        WorkerShape,
    ]


def test_the_crash_guard_waits_for_its_turn_before_the_time_limit_starts(broker):
    assert _position(broker, CrashGuard) < _position(broker, TimeLimit)


def test_a_dead_worker_is_noticed_within_seconds_not_minutes(broker):
    assert broker.heartbeat_timeout == broker_module.HEARTBEAT_TIMEOUT_MS
    assert broker.maintenance_chance == broker_module.MAINTENANCE_CHANCE
    # Dramatiq's defaults (60 s, 1 command in 1,000 checks) strand a dead worker's messages for minutes.
    assert broker.heartbeat_timeout <= 30_000 < DEFAULT_HEARTBEAT_TIMEOUT
    assert broker.maintenance_chance >= 10_000 > DEFAULT_MAINTENANCE_CHANCE


def test_results_outlive_dramatiqs_ten_minute_default(broker):
    assert _middleware(broker, Results).result_ttl == broker_module.RESULT_TTL_MS
    assert broker_module.RESULT_TTL_MS > DEFAULT_RESULT_TTL == 10 * 60 * 1000


def test_retries_back_off_from_one_second(broker):
    retries = _middleware(broker, Retries)

    assert (retries.min_backoff, retries.max_backoff) == (1_000, 60_000)


def test_each_call_creates_a_new_broker(settings, broker):
    other = create_broker(settings)
    try:
        assert other is not broker
        assert other.broker_id != broker.broker_id
    finally:
        other.close()


def test_setup_broker_makes_it_the_global_broker(settings):
    previous = dramatiq.get_broker()
    created = setup_broker(settings)
    try:
        assert dramatiq.get_broker() is created
    finally:
        dramatiq.set_broker(previous)
        created.close()


def test_the_actors_are_bound_to_the_global_broker_with_follow_up_work_first_and_new_work_last():
    from image_crawler import actors

    assert dramatiq.get_broker() is actors.broker
    fetch = actors.broker.get_actor("fetch")
    assert (fetch.queue_name, fetch.priority) == (broker_module.FETCH_QUEUE, 100)
    for name in ("md5", "grayscale", "collect", "record_failure", "record_admit_failure"):
        actor = actors.broker.get_actor(name)
        assert (actor.queue_name, actor.priority) == (broker_module.PROCESS_QUEUE, 0), name
    admit = actors.broker.get_actor("admit")
    assert (admit.queue_name, admit.priority) == (broker_module.ADMIT_QUEUE, 200)  # new work comes last
    assert actors.md5.options["store_results"] is True
    assert actors.grayscale.options["store_results"] is True


# --- sending a batch in one round trip ---------------------------------------------------

_QUEUE = "pipelined-test"


@pytest.fixture
def queued(broker):
    broker.declare_queue(_QUEUE)
    broker.flush(_QUEUE)
    yield lambda: broker.client.hlen(queue_keys(_QUEUE, broker.namespace).messages)
    broker.flush(_QUEUE)


def _message(n: int) -> dramatiq.Message:
    return dramatiq.Message(queue_name=_QUEUE, actor_name="nothing", args=(n,), kwargs={}, options={})


def test_messages_sent_in_a_pipelined_block_arrive_together_at_its_end(broker, queued):
    with broker.pipelined():
        for n in range(3):
            broker.enqueue(_message(n))
        assert queued() == 0

    assert queued() == 3
    assert broker.do_qsize(_QUEUE) == 3


def test_a_failing_pipelined_block_sends_nothing_and_leaves_the_broker_usable(broker, queued):
    with pytest.raises(RuntimeError), broker.pipelined():
        broker.enqueue(_message(1))
        raise RuntimeError("the file could not be read")

    assert queued() == 0
    broker.enqueue(_message(2))
    assert queued() == 1


def test_a_pipelined_block_does_not_capture_other_threads(broker, queued):
    seen = []

    with broker.pipelined():
        other = threading.Thread(target=lambda: seen.append(broker.do_qsize(_QUEUE)))
        other.start()
        other.join()

    assert seen == [0]


def _multi_calls(broker) -> int:
    return broker.client.info("commandstats").get("cmdstat_multi", {}).get("calls", 0)


def test_a_transactional_block_sends_its_messages_and_commands_together(broker, queued):
    multis = _multi_calls(broker)
    with broker.pipelined(transaction=True) as pipe:
        broker.enqueue(_message(1))
        broker.enqueue(_message(2))
        pipe.set("pipelined-test:mark", 1)
        assert queued() == 0 and not broker.client.exists("pipelined-test:mark")

    assert queued() == 2
    assert broker.client.get("pipelined-test:mark") == b"1"
    assert _multi_calls(broker) == multis + 1  # in one MULTI/EXEC
    broker.client.delete("pipelined-test:mark")


# --- a fetch whose reply was lost ---------------------------------------------------------


@pytest.fixture
def sweep_every_call(monkeypatch):
    monkeypatch.setattr(dramatiq_internals, "ORPHAN_SWEEP_S", 0.0)


def _drain(consumer, *, ack: bool, calls: int = 20) -> list[int]:
    """What ``calls`` calls of the consumer hand out (acked at once when ``ack``)."""
    received = []
    for _ in range(calls):
        message = next(consumer)
        if message is not None:
            received.append(message.args[0])
            if ack:
                consumer.ack(message)
    return received


def test_messages_whose_fetch_reply_was_lost_are_requeued(broker, queued, sweep_every_call):
    for n in range(3):
        broker.enqueue(_message(n))
    broker.do_fetch(_QUEUE, 2)  # Redis ran a fetch, and its reply never reached anybody
    acks = ack_set_key(broker.broker_id, _QUEUE, broker.namespace)
    assert broker.client.scard(acks) == 2

    consumer = broker.consume(_QUEUE, prefetch=10, timeout=10)
    received = _drain(consumer, ack=True)

    assert sorted(received) == [0, 1, 2]  # each exactly once
    assert broker.client.scard(acks) == 0
    assert queued() == 0  # every message acked and gone


def test_messages_a_consumer_holds_are_never_requeued(broker, queued, sweep_every_call):
    for n in range(3):
        broker.enqueue(_message(n))

    consumer = broker.consume(_QUEUE, prefetch=10, timeout=10)
    received = _drain(consumer, ack=False)  # handed out, still being worked on

    assert sorted(received) == [0, 1, 2]
    assert broker.client.llen(queue_keys(_QUEUE, broker.namespace).waiting) == 0  # nothing put back
    acks = ack_set_key(broker.broker_id, _QUEUE, broker.namespace)
    assert broker.client.scard(acks) == 3


# --- group barriers count distinct members ---------------------------------------------------


class _Recorder:
    """A broker stand-in for the middleware's hook: records what it enqueues."""

    def __init__(self) -> None:
        self.enqueued: list[dramatiq.Message] = []

    def enqueue(self, message):
        self.enqueued.append(message)


def _member(group_id: str, callback: dramatiq.Message) -> dramatiq.Message:
    options = {"group_completion_uuid": group_id, "group_completion_callbacks": [callback.asdict()]}
    return dramatiq.Message(queue_name="q", actor_name="member", args=(), kwargs={}, options=options)


@pytest.fixture
def group_callbacks(broker):
    middleware = _middleware(broker, DistinctGroupCallbacks)
    group_id = f"group-test-{uuid.uuid4().hex}"
    callback = dramatiq.Message(queue_name="q", actor_name="collect", args=(1,), kwargs={}, options={})
    yield middleware, group_id, callback
    broker.client.delete(group_id, f"{group_id}@members")


def test_a_group_fires_once_all_its_distinct_members_completed_and_leaves_nothing(broker, group_callbacks):
    middleware, group_id, callback = group_callbacks
    middleware.rate_limiter_backend.add(group_id, 2, 60_000)  # what group.run() does for two members
    first, second = _member(group_id, callback), _member(group_id, callback)
    recorder = _Recorder()

    middleware.after_process_message(recorder, first)
    assert recorder.enqueued == []
    middleware.after_process_message(recorder, second)

    assert [message.message_id for message in recorder.enqueued] == [callback.message_id]
    assert broker.client.exists(group_id, f"{group_id}@members") == 0


def test_a_member_completing_twice_counts_once(broker, group_callbacks):
    middleware, group_id, callback = group_callbacks
    middleware.rate_limiter_backend.add(group_id, 2, 60_000)
    member = _member(group_id, callback)
    recorder = _Recorder()

    middleware.after_process_message(recorder, member)
    middleware.after_process_message(recorder, member)  # redelivered after it completed

    assert recorder.enqueued == []
    assert 0 < broker.client.pttl(f"{group_id}@members") <= middleware.barrier_ttl


def test_a_failed_member_does_not_count(broker, group_callbacks):
    middleware, group_id, callback = group_callbacks
    middleware.rate_limiter_backend.add(group_id, 1, 60_000)
    recorder = _Recorder()

    middleware.after_process_message(recorder, _member(group_id, callback), exception=RuntimeError())

    assert recorder.enqueued == []
    assert broker.client.get(group_id) == b"1"


def test_a_member_of_a_group_whose_barrier_is_gone_fires_the_callback(group_callbacks):
    middleware, group_id, callback = group_callbacks  # fired already, or expired: collect is idempotent
    recorder = _Recorder()

    middleware.after_process_message(recorder, _member(group_id, callback))

    assert [message.message_id for message in recorder.enqueued] == [callback.message_id]


def test_group_barriers_expire_with_the_results(broker):
    assert _middleware(broker, DistinctGroupCallbacks).barrier_ttl == broker_module.RESULT_TTL_MS


# --- riding out a Redis outage, or not ------------------------------------------------------

#: Generous bound on how long a short budget may take to run out (it used to be minutes).
_BOUND_S = 30


@pytest.fixture
def dead_redis_url(dead_port) -> str:
    """A Redis URL on which nothing listens."""
    return f"redis://127.0.0.1:{dead_port}/0"


@pytest.fixture
def silent_redis_url(silent_port) -> str:
    """A Redis URL whose server accepts connections and never answers (a hung Redis)."""
    return f"redis://127.0.0.1:{silent_port}/0"


def _outage_budget_of(client: redis.Redis) -> float:
    return client.get_retry().budget_s


def test_a_client_made_within_a_short_outage_budget_gives_up_after_it(dead_redis_url):
    with broker_module.outage_budget(1.0):
        client = connect_redis(dead_redis_url)

    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    assert 1.0 <= time.monotonic() - started < _BOUND_S


def test_a_short_outage_budget_also_bounds_a_redis_that_never_answers(silent_redis_url):
    with broker_module.outage_budget(1.0):
        client = connect_redis(silent_redis_url)

    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.ping()
    assert time.monotonic() - started < _BOUND_S


def test_the_outage_budget_applies_only_to_clients_made_inside_the_block(redis_url):
    with broker_module.outage_budget(2.0):
        inside = connect_redis(redis_url)
    after = connect_redis(redis_url)

    assert _outage_budget_of(inside) == 2.0
    assert _outage_budget_of(after) == REDIS_OUTAGE_BUDGET_S
    assert inside.ping() and after.ping()


def test_the_workers_budget_is_minutes_and_the_commands_seconds():
    assert REDIS_OUTAGE_BUDGET_S >= 60
    assert 1 <= cli.OUTAGE_BUDGET_S <= 10


def test_a_workers_client_rides_out_an_outage_longer_than_the_commands_budget(tmp_path):
    port = free_port()
    client = connect_redis(f"redis://127.0.0.1:{port}/0")  # as every worker's, outside any budget block
    replies: list[object] = []
    pinging = threading.Thread(target=lambda: replies.append(client.ping()), daemon=True)
    pinging.start()

    pinging.join(timeout=cli.OUTAGE_BUDGET_S + 2)
    assert pinging.is_alive(), replies  # still waiting for Redis, long after the command would have given up
    process, _ = start_redis(tmp_path, port=port)
    try:
        pinging.join(timeout=_BOUND_S)
        assert replies == [True]
    finally:
        process.terminate()
        process.wait(timeout=10)
        client.close()


def test_the_workers_broker_keeps_the_workers_outage_budget(redis_url):
    """``dramatiq image_crawler.actors`` imports the module just so, outside any budget block."""
    probe = "import image_crawler.actors as actors; print(actors.broker.client.get_retry().budget_s)"

    finished = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 0, finished.stderr
    assert float(finished.stdout) == REDIS_OUTAGE_BUDGET_S


def test_the_actor_names_of_the_broker_module_are_the_actors_that_exist():
    from image_crawler import actors
    from image_crawler.broker import ACTOR_NAMES

    assert set(ACTOR_NAMES) == set(actors.broker.actors)
    assert ACTOR_NAMES[:5] == ("admit", "fetch", "md5", "grayscale", "collect")  # the order a URL meets them
