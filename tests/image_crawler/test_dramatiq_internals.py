"""Dramatiq's private details that image_crawler.dramatiq_internals relies on: one test each.

A test failing here after a Dramatiq upgrade means a detail listed in the docstring of
``src/image_crawler/dramatiq_internals.py`` changed: re-check that module against the new
Dramatiq's source before moving the pin in ``setup.cfg``. The pipeline's behaviour built on
these details is tested in test_broker.py, test_redelivery.py and test_reliability.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq import Message, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage, prometheus
from dramatiq.middleware.group_callbacks import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results.backends import RedisBackend as ResultBackend
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from image_crawler import dramatiq_internals
from image_crawler.broker import create_broker
from image_crawler.config import get_settings
from image_crawler.dramatiq_internals import (
    CHECKED_AGAINST,
    GROUP_CALLBACKS_OPTION,
    GROUP_ID_OPTION,
    NAMESPACE,
    WORKER_LOGGER,
    DistinctGroupCallbacks,
    OrphanRequeueingConsumer,
    PipelinedRedisBroker,
    ack_set_key,
    heartbeats_key,
    is_group_key,
    is_result_key,
    prometheus_db_path,
    queue_keys,
    redis_message_id,
    result_message,
)
from image_crawler.middleware import WorkerMetrics, serve_worker_metrics
from support.services import free_port


def _changed(what: str) -> str:
    return f"Dramatiq changed {what}: re-check dramatiq_internals.py (checked against {CHECKED_AGAINST})"


@pytest.fixture
def plain_broker(redis_client):
    """Dramatiq's own RedisBroker, none of ours: what the details are details of."""
    created = RedisBroker(client=redis_client, middleware=[])
    yield created
    created.close()


@pytest.fixture
def queue(plain_broker):
    name = f"internals-test-{uuid.uuid4().hex[:8]}"
    yield name
    plain_broker.flush(name)


def _message(queue: str, n: int) -> Message:
    return Message(queue_name=queue, actor_name="nothing", args=(n,), kwargs={}, options={})


def _ids(members) -> set[str]:
    return {member.decode() for member in members}


def test_dramatiq_is_the_version_this_module_was_checked_against():
    assert dramatiq.__version__.startswith("2.2."), (
        f"Dramatiq is {dramatiq.__version__}, not the 2.2.x that dramatiq_internals.py was checked against:"
        " re-verify every private detail its docstring lists, then update CHECKED_AGAINST, the docstring"
        " and the pin in setup.cfg"
    )
    assert CHECKED_AGAINST.startswith("2.2.")
    assert f"checked against dramatiq {CHECKED_AGAINST}" in (dramatiq_internals.__doc__ or "")
    setup_cfg = Path(__file__).resolve().parents[2] / "setup.cfg"
    assert f"dramatiq[redis]~={CHECKED_AGAINST}" in setup_cfg.read_text().split(), (
        "setup.cfg must pin Dramatiq to the version dramatiq_internals.py was checked against"
    )


def test_every_detail_the_module_lists_names_a_test_here_and_every_test_here_is_listed():
    listed = set(re.findall(r"``(test_\w+)``", dramatiq_internals.__doc__ or ""))
    here = {name for name in globals() if name.startswith("test_")}

    assert listed - here == set(), "dramatiq_internals.py names tests that do not exist"
    assert here - listed == {inspect.currentframe().f_code.co_name}, (  # type: ignore[union-attr]
        "a test of a private detail that dramatiq_internals.py does not list"
    )


def test_the_redis_consumer_we_extend_has_the_parts_we_use(plain_broker, queue, redis_client):
    what = "dramatiq.brokers.redis._RedisConsumer"
    assert issubclass(OrphanRequeueingConsumer, _RedisConsumer)
    assert list(inspect.signature(_RedisConsumer.__init__).parameters) == [
        "self",
        "broker",
        "queue_name",
        "prefetch",
        "timeout",
    ], _changed(f"the constructor of {what}")
    for method in ("ack", "nack"):
        parameters = list(inspect.signature(getattr(_RedisConsumer, method)).parameters)
        assert parameters == ["self", "message"], _changed(f"{what}.{method}")
    assert "__next__" in vars(_RedisConsumer), _changed(f"{what}.__next__")
    assert isinstance(vars(RedisBroker).get("consumer_class"), property), _changed(
        "RedisBroker.consumer_class"
    )

    consumer = plain_broker.consume(queue, prefetch=3, timeout=100)
    assert type(consumer) is _RedisConsumer, _changed("the consumer RedisBroker.consume makes")
    assert (consumer.broker, consumer.queue_name, consumer.message_cache) == (plain_broker, queue, []), (
        _changed(f"the attributes of {what} (broker, queue_name, message_cache)")
    )
    assert next(consumer) is None, _changed(f"what {what}.__next__ gives on an empty queue")
    ours = PipelinedRedisBroker(client=redis_client, middleware=[])
    assert type(ours.consume(queue)) is OrphanRequeueingConsumer, _changed(
        "how RedisBroker.consume picks its class"
    )


def test_a_consumers_ack_set_is_what_it_handed_out_and_what_it_prefetched(plain_broker, queue, redis_client):
    sent = {redis_message_id(plain_broker.enqueue(_message(queue, n))) for n in range(3)}
    consumer = plain_broker.consume(queue, prefetch=10, timeout=100)

    handed = next(consumer)

    assert isinstance(handed, MessageProxy), _changed("what _RedisConsumer.__next__ hands out")
    cached = {redis_message_id(Message.decode(data)) for data in consumer.message_cache if data}
    acks = ack_set_key(plain_broker.broker_id, queue, plain_broker.namespace)
    assert _ids(redis_client.smembers(acks)) == sent == cached | {redis_message_id(handed)}, _changed(
        "_RedisConsumer.message_cache (the fetched messages not yet handed out)"
    )
    consumer.ack(handed)
    assert _ids(redis_client.smembers(acks)) == cached, _changed("_RedisConsumer.ack")


def test_a_consumer_whose_ack_or_nack_fails_raises(queue):
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    consumer = RedisBroker(client=unreachable, middleware=[]).consume(queue)
    message = MessageProxy(_message(queue, 1).copy(options={"redis_message_id": str(uuid.uuid4())}))

    for method in (consumer.ack, consumer.nack):
        try:  # not swallowed: the message stays held, and the ack is tried again
            method(message)
        except ConnectionClosed:
            continue
        pytest.fail(_changed(f"_RedisConsumer.{method.__name__} when Redis fails (it raised nothing)"))


def test_every_broker_command_goes_through_the_dispatch_script_it_looks_up_at_each_call(plain_broker, queue):
    original = plain_broker.scripts.get("dispatch")
    assert isinstance(original, Script), _changed('RedisBroker.scripts["dispatch"] (the Lua dispatch script)')
    assert "client" in inspect.signature(original.__call__).parameters, (
        "redis-py's Script no longer takes client="
    )
    calls: list[tuple[list, list]] = []

    def recording(keys=None, args=None, client=None):
        calls.append((list(keys or []), list(args or [])))
        return original(keys=keys, args=args, client=client)

    plain_broker.scripts["dispatch"] = recording  # after __init__, as PipelinedRedisBroker swaps it
    plain_broker.enqueue(_message(queue, 1))
    plain_broker.do_qsize(queue)

    seen = [(keys, args[0], args[2], args[3]) for keys, args in calls]
    ns, broker_id = plain_broker.namespace, plain_broker.broker_id
    assert seen == [([ns], "enqueue", queue, broker_id), ([ns], "qsize", queue, broker_id)], _changed(
        'how RedisBroker calls scripts["dispatch"] (looked up at each command, as (keys=[namespace],'
        " args=[command, timestamp, queue, broker_id, ...]))"
    )


def test_the_ack_set_holds_what_a_fetch_took_until_it_is_requeued_or_acked(plain_broker, queue, redis_client):
    first, second = (redis_message_id(plain_broker.enqueue(_message(queue, n))) for n in range(2))

    fetched = plain_broker.do_fetch(queue, 2)

    assert [redis_message_id(Message.decode(data)) for data in fetched] == [first, second], _changed(
        "RedisBroker.do_fetch"
    )
    acks = ack_set_key(plain_broker.broker_id, queue, plain_broker.namespace)
    assert _ids(redis_client.smembers(acks)) == {first, second}, _changed(
        "where the dispatch script's fetch puts message ids (the ack set key)"
    )
    pattern = ack_set_key(plain_broker.broker_id, "*", plain_broker.namespace)
    assert redis_client.keys(pattern) == [acks.encode()], _changed("the ack set key")
    plain_broker.do_requeue(queue, first)
    assert _ids(redis_client.smembers(acks)) == {second}, _changed("RedisBroker.do_requeue")
    assert _ids(redis_client.lrange(queue_keys(queue, plain_broker.namespace).waiting, 0, -1)) == {first}, (
        _changed("RedisBroker.do_requeue")
    )
    plain_broker.do_ack(queue, second)
    assert redis_client.exists(acks) == 0, _changed("RedisBroker.do_ack")


def test_every_command_beats_the_brokers_heart(plain_broker, queue, redis_client):
    before_ms = time.time() * 1000

    plain_broker.do_qsize(queue)

    score = redis_client.zscore(heartbeats_key(plain_broker.namespace), plain_broker.broker_id)
    assert score is not None, _changed("the heartbeats key (a sorted set of broker ids)")
    assert before_ms - 1_000 <= score <= time.time() * 1000 + 1_000, _changed("the heartbeats' scores (ms)")


def test_a_queues_keys_are_where_dramatiq_keeps_its_messages(plain_broker, queue, redis_client):
    keys = queue_keys(queue, plain_broker.namespace)
    waiting = redis_message_id(plain_broker.enqueue(_message(queue, 1)))
    delayed = redis_message_id(plain_broker.enqueue(_message(queue, 2), delay=60_000))
    doomed = redis_message_id(plain_broker.enqueue(_message(queue, 3)))

    assert _ids(redis_client.lrange(keys.waiting, 0, -1)) == {waiting, doomed}, _changed("a queue's list")
    assert _ids(redis_client.hkeys(keys.messages)) == {waiting, doomed}, _changed("a queue's .msgs hash")
    assert _ids(redis_client.lrange(keys.delayed, 0, -1)) == {delayed}, _changed("a delayed queue's list")
    assert _ids(redis_client.hkeys(keys.delayed_messages)) == {delayed}, _changed(
        "a delayed queue's .msgs hash"
    )

    plain_broker.do_fetch(queue, 2)
    plain_broker.do_nack(queue, doomed)

    assert _ids(redis_client.zrange(keys.dead, 0, -1)) == {doomed}, _changed("a queue's dead letters (.XQ)")
    assert _ids(redis_client.hkeys(keys.dead_messages)) == {doomed}, _changed(
        "a queue's dead letters (.XQ.msgs)"
    )
    assert _ids(redis_client.hkeys(keys.messages)) == {waiting}, _changed(
        "what nack leaves in a queue's .msgs hash"
    )


def test_dramatiqs_default_namespace_is_ours(redis_url):
    default = inspect.signature(RedisBroker.__init__).parameters["namespace"].default
    assert default == NAMESPACE, _changed("RedisBroker's default namespace")
    broker = create_broker(dataclasses.replace(get_settings(), redis_url=redis_url))
    try:
        assert broker.namespace == NAMESPACE, (
            "the pipeline's broker must keep the namespace queue_keys() assumes"
        )
    finally:
        broker.close()


def test_a_redis_message_id_names_a_message_in_redis(plain_broker, queue, redis_client):
    message = _message(queue, 1)

    sent, again = plain_broker.enqueue(message), plain_broker.enqueue(message)

    assert "redis_message_id" in sent.options, _changed('message.options["redis_message_id"]')
    assert "redis_message_id" not in message.options
    assert redis_message_id(sent) != redis_message_id(again), _changed("redis_message_id (new at each send)")
    ids = [redis_message_id(sent), redis_message_id(again)]
    keys = queue_keys(queue, plain_broker.namespace)
    assert [member.decode() for member in redis_client.lrange(keys.waiting, 0, -1)] == ids, _changed(
        "redis_message_id"
    )
    assert _ids(redis_client.hkeys(keys.messages)) == set(ids), _changed("redis_message_id")
    received = next(plain_broker.consume(queue, prefetch=1, timeout=100))
    assert redis_message_id(received) == ids[0], _changed("the redis_message_id of a consumed message")


def test_group_callbacks_keep_what_group_run_reads(redis_client):
    parameters = inspect.signature(GroupCallbacks.__init__).parameters
    assert list(parameters) == ["self", "rate_limiter_backend", "barrier_ttl"], _changed(
        "GroupCallbacks.__init__"
    )
    assert parameters["barrier_ttl"].kind is inspect.Parameter.KEYWORD_ONLY, _changed(
        "GroupCallbacks.__init__"
    )
    backend = RateLimiterBackend(client=redis_client)

    middleware = DistinctGroupCallbacks(backend, barrier_ttl=12_345)

    assert isinstance(middleware, GroupCallbacks)
    assert middleware.rate_limiter_backend is backend, _changed("GroupCallbacks.rate_limiter_backend")
    assert middleware.barrier_ttl == 12_345, _changed("GroupCallbacks.barrier_ttl")


def test_group_run_makes_the_barrier_our_script_reads(redis_client):
    queue = f"internals-test-{uuid.uuid4().hex[:8]}"
    middleware = DistinctGroupCallbacks(RateLimiterBackend(client=redis_client), barrier_ttl=60_000)
    stub = StubBroker(middleware=[middleware])
    member = dramatiq.actor(lambda n: None, broker=stub, queue_name=queue, actor_name="member")
    callback = dramatiq.actor(lambda: None, broker=stub, queue_name=queue, actor_name="callback").message()
    group = dramatiq.group([member.message(1), member.message(2)], broker=stub)
    group.add_completion_callback(callback)

    group.run()

    sent = []
    while not stub.queues[queue].empty():
        sent.append(Message.decode(stub.queues[queue].get_nowait()))
    group_ids = {message.options.get(GROUP_ID_OPTION) for message in sent}
    assert len(sent) == 2 and len(group_ids) == 1 and None not in group_ids, _changed(
        f"the {GROUP_ID_OPTION!r} option group.run() gives members"
    )
    (group_id,) = group_ids
    members = DistinctGroupCallbacks.members_key(group_id)
    assert is_group_key(group_id) and is_group_key(members), _changed(
        f"the group ids group.run() makes ({group_id!r}: a uuid4 no more)"
    )
    assert not is_group_key(uuid.uuid4().hex) and not is_result_key(group_id)
    try:
        assert redis_client.get(group_id) == b"2", _changed(
            "the barrier group.run() creates (its key, its count)"
        )
        assert 0 < redis_client.pttl(group_id) <= 60_000, _changed(
            "the barrier's TTL (GroupCallbacks.barrier_ttl)"
        )
        callbacks = [message.options.get(GROUP_CALLBACKS_OPTION) for message in sent]
        assert all(
            [Message(**each).message_id for each in one or []] == [callback.message_id] for one in callbacks
        ), _changed(f"the {GROUP_CALLBACKS_OPTION!r} option group.run() gives members (Message.asdict()s)")
        for message in sent:  # and our barrier fires on them, once
            middleware.after_process_message(stub, message)
        fired = [Message.decode(data) for data in stub.queues[queue].queue]
        assert [message.message_id for message in fired] == [callback.message_id]
    finally:
        redis_client.delete(group_id, members)


def test_the_rate_limiter_backend_keeps_its_client(redis_client):
    backend = RateLimiterBackend(client=redis_client)
    key = f"internals-test:{uuid.uuid4().hex}"

    assert backend.client is redis_client, _changed("the rate limiter RedisBackend's client attribute")
    try:
        assert backend.add(key, 3, 60_000) is True
        assert backend.add(key, 5, 60_000) is False, _changed("RedisBackend.add (a SET NX)")
        assert redis_client.get(key) == b"3", _changed("RedisBackend.add (the value under the key)")
        assert 0 < redis_client.pttl(key) <= 60_000, _changed("RedisBackend.add (a TTL in ms)")
    finally:
        redis_client.delete(key)


class _Boom(Exception):
    pass


def test_a_failing_actor_is_logged_on_the_worker_threads_logger():
    stub = StubBroker(middleware=[])
    queue = f"internals-test-{uuid.uuid4().hex[:8]}"

    def fails():
        raise _Boom("expected")

    actor = dramatiq.actor(fails, broker=stub, queue_name=queue, actor_name="fails")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    worker_logger = logging.getLogger(WORKER_LOGGER)
    worker_logger.addHandler(handler)
    worker = Worker(stub, worker_timeout=100, worker_threads=1)
    worker.start()
    try:
        actor.send()
        stub.join(queue, fail_fast=False, timeout=30_000)
    finally:
        worker.stop()
        worker_logger.removeHandler(handler)

    failures = [record for record in records if record.exc_info and isinstance(record.exc_info[1], _Boom)]
    assert len(failures) == 1, _changed(
        f"where an actor's exception is logged (the {WORKER_LOGGER!r} logger)"
    )
    assert failures[0].levelno == logging.ERROR, _changed("the level at which an actor's exception is logged")


class _Stop(MiddlewareError):
    pass


def test_a_before_hook_stops_a_message_only_with_a_middleware_error():
    stub = StubBroker(middleware=[])
    queue = f"internals-test-{uuid.uuid4().hex[:8]}"
    ran: list[str] = []
    ended: list[tuple[str, str | None]] = []

    class Refusing(Middleware):
        def before_process_message(self, broker, message):
            raise {"plain": RuntimeError, "middleware": _Stop, "skip": SkipMessage}[message.args[0]](
                "refused"
            )

        def after_process_message(self, broker, message, *, result=None, exception=None):
            ended.append((message.args[0], None if exception is None else type(exception).__name__))

        def after_skip_message(self, broker, message):
            ended.append((message.args[0], "skipped"))

    stub.add_middleware(Refusing())
    actor = dramatiq.actor(ran.append, broker=stub, queue_name=queue, actor_name="runs")
    worker = Worker(stub, worker_timeout=100, worker_threads=1)
    worker.start()
    try:
        for kind in ("plain", "middleware", "skip"):
            actor.send(kind)
        stub.join(queue, fail_fast=False, timeout=30_000)
    finally:
        worker.stop()

    assert ran == ["plain"], _changed("which exceptions of a before-hook stop a message (Broker.emit_before)")
    assert sorted(ended) == [("middleware", "_Stop"), ("plain", None), ("skip", "skipped")], _changed(
        "what the worker does with a message whose before-hook raised a MiddlewareError"
    )


def test_a_result_is_found_by_the_queue_actor_and_id_of_its_message(redis_client):
    default = inspect.signature(ResultBackend.__init__).parameters["use_namespace_prefix_keys"].default
    assert default is False, _changed("the result backend's keys (use_namespace_prefix_keys)")
    backend = ResultBackend(client=redis_client)
    stub = StubBroker(middleware=[])
    queue = f"internals-test-{uuid.uuid4().hex[:8]}"
    actor = dramatiq.actor(lambda parcel: None, broker=stub, queue_name=queue, actor_name="member")
    sent = actor.message({"run": "r", "lines": [[1, "http://images.test/1.png", 0]]}).copy(
        options={"redis_message_id": str(uuid.uuid4()), "retries": 2}
    )
    key = backend.build_message_key(sent)
    try:
        backend.store_result(sent, ["d41d8cd98f00b204e9800998ecf8427e"], 60_000)

        found = result_message(actor, sent.message_id)
        assert backend.build_message_key(found) == key, _changed(
            "what a result's key is made of (ResultBackend.build_message_key)"
        )
        assert is_result_key(key) and redis_client.exists(key), _changed("the result backend's keys")
        assert found.get_result(backend=backend) == ["d41d8cd98f00b204e9800998ecf8427e"]
        assert backend.build_message_key(result_message(actor, "another id")) != key
    finally:
        redis_client.delete(key)


def test_prometheus_starts_its_exporter_by_its_forks_and_counts_in_db_path(tmp_path):
    what = "dramatiq.middleware.prometheus"
    assert isinstance(vars(prometheus.Prometheus).get("forks"), property), _changed(
        f"{what}.Prometheus.forks"
    )
    assert prometheus.Prometheus().forks == [prometheus._run_exposition_server], _changed(
        f"how {what} starts its exporter (Prometheus.forks)"
    )
    assert WorkerMetrics().forks == [serve_worker_metrics]
    assert prometheus_db_path() == prometheus.DB_PATH
    # After boot, in a process of its own: the hook points that process's prometheus_client at the files.
    probe = (
        "import os; from dramatiq.middleware import prometheus; "
        "from image_crawler import dramatiq_internals; "
        "middleware = prometheus.Prometheus(); middleware.after_process_boot(None); "
        "middleware.total_messages.labels('queue', 'actor').inc(); "
        "print(dramatiq_internals.prometheus_db_path()); print(os.environ['PROMETHEUS_MULTIPROC_DIR'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(("dramatiq_prom", "prometheus"))}

    booted = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "dramatiq_prom_db": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert booted.returncode == 0, booted.stderr
    assert booted.stdout.split() == [str(tmp_path)] * 2, _changed(f"{what}.DB_PATH ($dramatiq_prom_db)")
    assert list(tmp_path.glob("*.db")), _changed(f"where {what} counts a worker process's messages")
