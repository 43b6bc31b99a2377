"""Dramatiq setup: one Redis for broker, results and group barriers; middleware in an order that matters."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import dramatiq
import dramatiq.brokers.redis as redis_broker_module
import dramatiq.middleware.time_limit as time_limit_module
import pytest
import redis
import redis.retry
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import TimeLimit
from dramatiq.results import ResultMissing, Results
from dramatiq.results.middleware import DEFAULT_RESULT_TTL

from image_crawler import broker as broker_module
from image_crawler import cli, dramatiq_internals
from image_crawler.broker import (
    MESSAGE_MAX_BACKOFF_MS,
    MESSAGE_MIN_BACKOFF_MS,
    REDIS_OUTAGE_BUDGET_S,
    connect_redis,
    create_broker,
    setup_broker,
)
from image_crawler.config import get_settings
from image_crawler.dramatiq_internals import (
    GROUP_CALLBACKS_OPTION,
    GROUP_ID_OPTION,
    DistinctGroupCallbacks,
    ack_set_key,
    queue_keys,
)
from image_crawler.middleware import CrashGuard, Verdict
from support.clock import FakeClock, fake_time_of
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


# --- what the middleware order does -----------------------------------------------------
# ``before_*`` hooks run first-to-last and ``after_*`` hooks last-to-first (create_broker's
# docstring says why each order matters). Each test below drives the broker's own hooks, in its
# own order, through one message, and checks what that order is for.


def _declare(broker: RedisBroker, name: str, **options) -> dramatiq.Actor:
    """A do-nothing actor on ``broker`` (on a test queue), with these options."""
    return dramatiq.actor(lambda *args: None, broker=broker, actor_name=name, queue_name=_QUEUE, **options)


def _proxy(actor_name: str, *args, **options) -> MessageProxy:
    """A message of ``actor_name`` as a worker hands it to the hooks."""
    return MessageProxy(dramatiq.Message(_QUEUE, actor_name, args, {}, options))


@pytest.fixture
def enqueued(broker, monkeypatch):
    """What the broker's hooks enqueue (retries, failure records, group callbacks), kept here.

    ``(message, delay)`` pairs; ``enqueued.then`` (when set) is called with each message as it is
    enqueued, to look at the state of things at that moment.
    """

    class Enqueued(list):
        then = None

    sent = Enqueued()

    def enqueue(message, *, delay=None):
        if sent.then is not None:
            sent.then(message)
        sent.append((message, delay))
        return message

    monkeypatch.setattr(broker, "enqueue", enqueue)
    return sent


_BATCH = {"run": "r", "lines": [[1, "http://example.com/a.png"]]}


def test_a_message_that_failed_for_good_is_recorded_and_one_with_tries_left_only_retried(broker, enqueued):
    # RecordFailures comes before Retries, so its after-hook runs after theirs: it sees their verdict.
    _declare(broker, "record_failure")
    _declare(broker, "flaky", max_retries=3)
    tries_left = _proxy("flaky", _BATCH, retries=1)
    given_up = _proxy("flaky", _BATCH, retries=3)

    broker.emit_after("process_message", tries_left, exception=ValueError("boom"))
    assert [(message.actor_name, message.message_id) for message, _ in enqueued] == [
        ("flaky", tries_left.message_id)
    ]
    enqueued.clear()
    broker.emit_after("process_message", given_up, exception=ValueError("boom"))

    assert [(message.actor_name, message.args) for message, _ in enqueued] == [
        ("record_failure", (_BATCH, "internal error: ValueError"))
    ]


def test_a_failed_message_is_retried_after_a_second_at_first_and_never_after_more_than_a_minute(
    broker, enqueued
):
    _declare(broker, "flaky", max_retries=100)

    broker.emit_after("process_message", _proxy("flaky", _BATCH, retries=0), exception=ValueError())
    broker.emit_after("process_message", _proxy("flaky", _BATCH, retries=30), exception=ValueError())

    (_, first), (_, thirtieth) = enqueued
    assert (MESSAGE_MIN_BACKOFF_MS, MESSAGE_MAX_BACKOFF_MS) == (1_000, 60_000)
    assert 1_000 <= first <= 2_000  # ms: one second, with jitter
    assert 30_000 <= thirtieth <= 60_000  # capped at a minute, with jitter


def _run_group(broker, enqueued, members: int):
    """Run a group of ``members`` messages of a result-storing actor; its members, as sent."""
    member = _declare(broker, "member", store_results=True)
    collector = _declare(broker, "collector")
    group = dramatiq.group([member.message(n) for n in range(members)], broker=broker)
    group.add_completion_callback(collector.message())
    group.run()
    sent = [message for message, _ in enqueued]
    enqueued.clear()
    return sent


def test_a_groups_callback_is_sent_only_after_its_last_members_result_is_stored(broker, enqueued):
    # The group callbacks come before Results, so Results' after-hook stores the result first.
    results = _middleware(broker, Results).backend
    [member] = _run_group(broker, enqueued, members=1)
    stored_when_sent = []

    def look_for_the_result(message):
        try:
            stored_when_sent.append((message.actor_name, results.get_result(member)))
        except ResultMissing:
            stored_when_sent.append((message.actor_name, "no result yet"))

    enqueued.then = look_for_the_result
    broker.emit_after("process_message", MessageProxy(member), result="d41d8cd98f00b204")

    assert stored_when_sent == [("collector", "d41d8cd98f00b204")]
    broker.client.delete(results.build_message_key(member))


def test_an_unfinished_groups_barrier_lasts_as_long_as_its_members_results(broker, enqueued):
    results = _middleware(broker, Results).backend
    first, _ = _run_group(broker, enqueued, members=2)
    group_id = first.options[GROUP_ID_OPTION]

    broker.emit_after("process_message", MessageProxy(first), result="d41d8cd98f00b204")

    assert enqueued == []  # the other member is still running
    result_ttl = broker.client.pttl(results.build_message_key(first))
    assert result_ttl > DEFAULT_RESULT_TTL  # longer than Dramatiq's ten minutes
    members = DistinctGroupCallbacks.members_key(group_id)
    for barrier in (group_id, members):
        assert abs(broker.client.pttl(barrier) - result_ttl) < 60_000, barrier  # hours, to the minute
    broker.client.delete(results.build_message_key(first), group_id, members)


def test_a_guarded_messages_time_limit_starts_once_it_runs_and_its_mark_outlives_the_other_hooks(
    broker, enqueued, monkeypatch
):
    # CrashGuard comes before TimeLimit: what it does before the message runs (its handler deciding,
    # waiting for a turn) is not running time; and its after-hook, last, drops the mark last.
    clock = FakeClock()
    monkeypatch.setattr(time_limit_module, "monotonic", clock.monotonic)
    time_limit = _middleware(broker, TimeLimit)

    def on_crash(message, deaths):
        clock.sleep(600)  # ten minutes before the guard lets the message run
        return Verdict.RUN

    _declare(broker, "record_failure")
    _declare(broker, "guarded", on_crash=on_crash, max_retries=0, time_limit=60_000)
    message = _proxy("guarded", _BATCH)
    mark = CrashGuard.mark_key(message.message_id)

    broker.emit_before("process_message", message)
    assert time_limit.manager.deadlines[threading.get_ident()] == clock.now + 60  # a minute from now
    assert broker.client.exists(mark) == 1
    marked_when_sent = []
    enqueued.then = lambda sent: marked_when_sent.append((sent.actor_name, broker.client.exists(mark)))
    broker.emit_after("process_message", message, exception=ValueError("boom"))

    assert marked_when_sent == [("record_failure", 1)]  # a worker dying now died running it
    assert broker.client.exists(mark) == 0


def test_a_worker_silent_for_half_a_minute_is_presumed_dead_and_its_messages_go_back(
    settings, broker, queued, monkeypatch
):
    # Dramatiq's default (DEFAULT_HEARTBEAT_TIMEOUT) waits a minute before it presumes a worker dead.
    dead = create_broker(settings)
    waiting = queue_keys(_QUEUE, broker.namespace).waiting
    try:
        for n in range(2):
            broker.enqueue(_message(n))
        dead.do_fetch(_QUEUE, 2)  # and then its worker died: no more heartbeats
        monkeypatch.setattr(broker, "_should_do_maintenance", lambda command: 1)
        real_millis = redis_broker_module.current_millis

        monkeypatch.setattr(redis_broker_module, "current_millis", lambda: real_millis() + 10_000)
        broker.do_qsize(_QUEUE)
        assert broker.client.llen(waiting) == 0  # silent for 10 s: not dead yet
        monkeypatch.setattr(redis_broker_module, "current_millis", lambda: real_millis() + 30_000)
        broker.do_qsize(_QUEUE)
        assert broker.client.llen(waiting) == 2  # silent for 30 s: its messages are back on the queue
    finally:
        dead.close()


def test_on_a_quiet_queue_a_dead_workers_messages_come_back_within_dozens_of_commands(
    settings, queued, monkeypatch
):
    # Only some commands look for dead workers. With Dramatiq's default chance (1 in 1,000) the
    # messages would stay stranded for about a thousand commands: minutes, on a quiet queue.
    monkeypatch.setattr(redis_broker_module, "random", random.Random(9309))  # the same rolls each run
    dead, alive = create_broker(settings), create_broker(settings)
    waiting = queue_keys(_QUEUE, alive.namespace).waiting
    try:
        alive.enqueue(_message(1))
        dead.do_fetch(_QUEUE, 1)
        real_millis = redis_broker_module.current_millis
        monkeypatch.setattr(redis_broker_module, "current_millis", lambda: real_millis() + 120_000)
        commands = 0
        while alive.client.llen(waiting) == 0 and commands < 100:
            alive.do_qsize(_QUEUE)
            commands += 1

        assert alive.client.llen(waiting) == 1, f"still stranded after {commands} commands"
    finally:
        dead.close()
        alive.close()


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


def _multi_calls(observer) -> int:
    """MULTIs the server has run, read on ``observer``: a connection of its own, so that the
    reading neither goes through the broker's client (its pipelines) nor is counted in it."""
    return observer.info("commandstats").get("cmdstat_multi", {}).get("calls", 0)


def test_a_transactional_block_sends_its_messages_and_commands_together(broker, queued, redis_client):
    multis = _multi_calls(redis_client)
    with broker.pipelined(transaction=True) as pipe:
        broker.enqueue(_message(1))
        broker.enqueue(_message(2))
        pipe.set("pipelined-test:mark", 1)
        assert queued() == 0 and not broker.client.exists("pipelined-test:mark")

    assert queued() == 2
    assert broker.client.get("pipelined-test:mark") == b"1"
    assert _multi_calls(redis_client) == multis + 1  # in one MULTI/EXEC
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
    options = {GROUP_ID_OPTION: group_id, GROUP_CALLBACKS_OPTION: [callback.asdict()]}
    return dramatiq.Message(queue_name="q", actor_name="member", args=(), kwargs={}, options=options)


@pytest.fixture
def group_callbacks(broker):
    middleware = _middleware(broker, DistinctGroupCallbacks)
    group_id = f"group-test-{uuid.uuid4().hex}"
    callback = dramatiq.Message(queue_name="q", actor_name="collect", args=(1,), kwargs={}, options={})
    yield middleware, group_id, callback
    broker.client.delete(group_id, DistinctGroupCallbacks.members_key(group_id))


def test_a_group_fires_once_all_its_distinct_members_completed_and_leaves_nothing(broker, group_callbacks):
    middleware, group_id, callback = group_callbacks
    middleware.rate_limiter_backend.add(group_id, 2, 60_000)  # what group.run() does for two members
    first, second = _member(group_id, callback), _member(group_id, callback)
    recorder = _Recorder()

    middleware.after_process_message(recorder, first)
    assert recorder.enqueued == []
    middleware.after_process_message(recorder, second)

    assert [message.message_id for message in recorder.enqueued] == [callback.message_id]
    assert broker.client.exists(group_id, DistinctGroupCallbacks.members_key(group_id)) == 0


def test_a_member_completing_twice_counts_once(broker, group_callbacks):
    middleware, group_id, callback = group_callbacks
    middleware.rate_limiter_backend.add(group_id, 2, 60_000)
    member = _member(group_id, callback)
    recorder = _Recorder()

    middleware.after_process_message(recorder, member)
    middleware.after_process_message(recorder, member)  # redelivered after it completed

    assert recorder.enqueued == []
    assert 0 < broker.client.pttl(DistinctGroupCallbacks.members_key(group_id)) <= middleware.barrier_ttl


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


# --- riding out a Redis outage, or not ------------------------------------------------------

#: How long a test waits for a thread that should end soon (a deadlock guard, nothing measured).
_BOUND_S = 30


@pytest.fixture
def dead_redis_url(dead_port) -> str:
    """A Redis URL on which nothing listens."""
    return f"redis://127.0.0.1:{dead_port}/0"


@pytest.fixture
def silent_redis_url(silent_port) -> str:
    """A Redis URL whose server accepts connections and never answers (a hung Redis)."""
    return f"redis://127.0.0.1:{silent_port}/0"


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The outage budget's clock, moved by redis-py's waits between tries (which take no time)."""
    fake = fake_time_of(monkeypatch, broker_module)
    monkeypatch.setattr(redis.retry, "sleep", fake.sleep)
    return fake


def _outage_budget_of(client: redis.Redis) -> float:
    return client.get_retry().budget_s


def _seconds_tried(client: redis.Redis, clock: FakeClock, error: type[Exception]) -> float:
    """How long (on ``clock``) ``client`` kept trying to ping before it gave up with ``error``."""
    started = clock.now
    with pytest.raises(error):
        client.ping()
    return clock.now - started


def test_a_client_made_within_a_short_outage_budget_tries_again_until_it_runs_out(dead_redis_url, clock):
    with broker_module.outage_budget(1.0):
        client = connect_redis(dead_redis_url)

    tried = _seconds_tried(client, clock, redis.exceptions.ConnectionError)

    assert len(clock.slept) > 1  # refused, and tried again…
    assert 1.0 <= tried < 1.0 + max(clock.slept)  # …until the budget ran out, and no longer


def test_a_short_outage_budget_also_bounds_a_redis_that_never_answers(silent_redis_url, monkeypatch):
    # Real time here: what is bounded is the wait on a socket, which no fake clock sees.
    backoffs: list[float] = []
    monkeypatch.setattr(redis.retry, "sleep", backoffs.append)
    with broker_module.outage_budget(1.0):
        client = connect_redis(silent_redis_url)

    with pytest.raises(redis.exceptions.TimeoutError):
        client.ping()

    assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0  # no wait outlasts the budget
    assert len(backoffs) <= 1  # and the time waiting for an answer counts against it: no more tries


def test_the_outage_budget_applies_only_to_clients_made_inside_the_block(redis_url):
    with broker_module.outage_budget(2.0):
        inside = connect_redis(redis_url)
    after = connect_redis(redis_url)

    assert _outage_budget_of(inside) == 2.0
    assert _outage_budget_of(after) == REDIS_OUTAGE_BUDGET_S
    assert inside.ping() and after.ping()


def test_a_workers_client_rides_out_minutes_of_outage_and_the_commands_gives_up_within_seconds(
    dead_redis_url, clock
):
    workers = connect_redis(dead_redis_url)  # as every worker's, outside any budget block
    with broker_module.outage_budget(cli.OUTAGE_BUDGET_S):  # as ``image-crawler`` makes its clients
        commands = connect_redis(dead_redis_url)

    assert _seconds_tried(workers, clock, redis.exceptions.ConnectionError) >= 60
    assert 1 <= _seconds_tried(commands, clock, redis.exceptions.ConnectionError) <= 10


def test_a_workers_client_is_answered_once_redis_is_back(tmp_path, monkeypatch):
    # How long it would wait is test_a_workers_client_rides_out_minutes_of_outage_...; here, real
    # sockets: a ping that was refused gets its answer from a Redis that started meanwhile.
    port = free_port()
    client = connect_redis(f"redis://127.0.0.1:{port}/0")  # as every worker's, outside any budget block
    refused = threading.Event()

    def backoff(seconds: float) -> None:
        refused.set()
        time.sleep(seconds)

    monkeypatch.setattr(redis.retry, "sleep", backoff)
    replies: list[object] = []
    pinging = threading.Thread(target=lambda: replies.append(client.ping()), daemon=True)
    pinging.start()

    assert refused.wait(timeout=_BOUND_S)  # refused, and waiting to try again
    assert pinging.is_alive(), replies
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


def test_the_queue_names_of_the_broker_module_are_the_queues_the_actors_use():
    from image_crawler import actors
    from image_crawler.broker import QUEUE_NAMES

    used = {actor.queue_name for actor in actors.broker.actors.values()}
    assert set(QUEUE_NAMES) == used
    assert QUEUE_NAMES == (broker_module.ADMIT_QUEUE, broker_module.FETCH_QUEUE, broker_module.PROCESS_QUEUE)
