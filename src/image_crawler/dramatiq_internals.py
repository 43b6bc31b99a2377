"""Every part of the pipeline that relies on Dramatiq's private details: checked against dramatiq 2.2.1.

Dramatiq is pinned to that minor version (``setup.cfg``: ``dramatiq[redis]~=2.2.1``). Before
moving to another, re-read each detail below in the new Dramatiq's source. Each is checked by
the test of ``tests/image_crawler/test_dramatiq_internals.py`` named with it, which fails with
"Dramatiq changed …" when it no longer holds; on any other minor version,
``test_dramatiq_is_the_version_this_module_was_checked_against`` fails first of all.

1. ``dramatiq.brokers.redis._RedisConsumer``, subclassed by :class:`OrphanRequeueingConsumer`.
   ``RedisBroker.consume`` builds ``broker.consumer_class(broker, queue_name, prefetch,
   timeout)`` (a property we override); the consumer keeps ``broker``, ``queue_name`` and
   ``message_cache`` (the encoded data of fetched messages not yet handed out, an entry may be
   ``None``); ``__next__()`` gives a ``MessageProxy`` or ``None``; ``ack(message)`` and
   ``nack(message)`` are what a worker calls.
   Test: ``test_the_redis_consumer_we_extend_has_the_parts_we_use``.
2. ``_RedisConsumer.ack``/``nack`` raise (``ConnectionClosed``) when Redis fails: the message
   stays held. Test: ``test_a_consumer_whose_ack_or_nack_fails_raises``.
3. A fetched message stays in the ack set until acked: handed out, or still in
   ``message_cache``. Test: ``test_a_consumers_ack_set_is_what_it_handed_out_and_what_it_prefetched``.
4. ``RedisBroker.scripts["dispatch"]``: the redis-py ``Script`` (it takes ``client=``) behind
   every ``do_<command>``, looked up anew at each command (``RedisBroker._dispatch``) and called
   as ``dispatch(keys=[namespace], args=[command, timestamp, queue_name, broker_id, ...])``.
   :class:`PipelinedRedisBroker` swaps it after ``__init__`` for :class:`PipelinableScript`.
   Test: ``test_every_broker_command_goes_through_the_dispatch_script_it_looks_up_at_each_call``.
5. The ack set ``<namespace>:__acks__.<broker_id>.<queue>`` (:func:`ack_set_key`): where the
   dispatch script's fetch puts the ids a broker (one per worker process) holds, and what
   ``do_requeue(queue, *ids)`` and ``do_ack(queue, id)`` take them out of (``do_*`` are made by
   ``RedisBroker.__getattr__``); ``do_fetch(queue, n)`` returns the messages' encoded data.
   Test: ``test_the_ack_set_holds_what_a_fetch_took_until_it_is_requeued_or_acked``.
6. The heartbeats ``<namespace>:__heartbeats__`` (:func:`heartbeats_key`): a sorted set of
   broker ids scored by the time (ms) of their latest command.
   Test: ``test_every_command_beats_the_brokers_heart``.
7. A queue's keys (:func:`queue_keys`): ``<namespace>:<queue>`` a list of waiting ids,
   ``….msgs`` a hash id → message of every message not yet acked, the same two for the delayed
   queue ``<queue>.DQ``, and the dead letters: ``<queue>.XQ`` a sorted set, ``<queue>.XQ.msgs``.
   Test: ``test_a_queues_keys_are_where_dramatiq_keeps_its_messages``.
8. The namespace is ``"dramatiq"`` (:data:`NAMESPACE`), ``RedisBroker``'s default, which our
   broker keeps. Test: ``test_dramatiqs_default_namespace_is_ours``.
9. ``message.options["redis_message_id"]`` (:func:`redis_message_id`): set by
   ``RedisBroker.enqueue`` anew at each send; the id in the queue's list, hash and ack set.
   Test: ``test_a_redis_message_id_names_a_message_in_redis``.
10. ``GroupCallbacks``, subclassed by :class:`DistinctGroupCallbacks`: ``__init__(
    rate_limiter_backend, *, barrier_ttl)`` keeps both as attributes, which ``group.run()``
    reads from the broker's first ``GroupCallbacks``.
    Test: ``test_group_callbacks_keep_what_group_run_reads``.
11. ``group.run()`` creates the barrier with ``rate_limiter_backend.add(<uuid>, <members>,
    barrier_ttl)`` and sends each member with the options ``group_completion_uuid`` (that
    uuid, :data:`GROUP_ID_OPTION`) and ``group_completion_callbacks`` (``Message.asdict()``
    of each callback, :data:`GROUP_CALLBACKS_OPTION`).
    Test: ``test_group_run_makes_the_barrier_our_script_reads``.
12. The rate limiter's ``RedisBackend`` keeps its Redis client as ``client`` (the barrier
    script runs there), and its ``add(key, value, ttl)`` is a ``SET key value PX ttl NX``.
    Test: ``test_the_rate_limiter_backend_keeps_its_client``.
13. The logger ``dramatiq.worker.WorkerThread`` (:data:`WORKER_LOGGER`) logs an actor's
    unhandled exception as an error with ``exc_info``: where
    :class:`~image_crawler.middleware.ExpectedFailures` is attached.
    Test: ``test_a_failing_actor_is_logged_on_the_worker_threads_logger``.
14. ``Broker.emit_before`` logs and swallows whatever a ``before_*`` hook raises, except a
    ``MiddlewareError``: the worker then treats that as the message's failure (its
    ``after_process_message`` hooks get it as ``exception``, so Retries retries it), or skips
    the message for a ``SkipMessage``. :class:`~image_crawler.middleware.CrashGuard` raises
    ``GuardUnavailable`` (a ``MiddlewareError``) so that a message it cannot mark is retried,
    never run unguarded; and runs a message whose ``on_crash`` handler failed as safely as it
    can, because Dramatiq would run it anyway.
    Test: ``test_a_before_hook_stops_a_message_only_with_a_middleware_error``.
15. A result's key (``ResultBackend.build_message_key``) is made of the backend's namespace and
    the message's queue, actor and id, nothing else (not its arguments or options), hashed to
    32 hex digits (``use_namespace_prefix_keys`` off, the default): :func:`result_message`
    rebuilds a group member's message from its actor and id alone, to read and delete its
    result; :func:`is_result_key` tells such keys apart.
    Test: ``test_a_result_is_found_by_the_queue_actor_and_id_of_its_message``.
16. The group ids ``group.run()`` makes (the barriers' keys) are ``str(uuid4())``:
    :func:`is_group_key` tells them, and the members sets
    (:meth:`DistinctGroupCallbacks.members_key`) next to them, apart.
    Test: ``test_group_run_makes_the_barrier_our_script_reads`` (with detail 11).
17. ``dramatiq.middleware.prometheus``: ``Prometheus.forks`` is ``[_run_exposition_server]``, the
    only way its exporter starts, so :class:`~image_crawler.middleware.WorkerMetrics` replaces
    that exporter by overriding ``forks``; ``Prometheus.after_process_boot`` points
    prometheus_client at ``DB_PATH`` (``$dramatiq_prom_db``, else
    ``<tmp>/dramatiq-prometheus``; :func:`prometheus_db_path`) before it first imports it, which
    is where every worker process keeps its metrics files and what our exporter reads.
    Test: ``test_prometheus_starts_its_exporter_by_its_forks_and_counts_in_db_path``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import dramatiq
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import prometheus
from dramatiq.middleware.group_callbacks import GroupCallbacks

# Its log lines keep the logger they had before these classes moved here (users grep for it).
logger = logging.getLogger("image_crawler.broker")

#: The Dramatiq release every detail above was checked against.
CHECKED_AGAINST = "2.2.1"

#: The key prefix of Dramatiq's RedisBroker: its default namespace, which the pipeline keeps.
NAMESPACE = "dramatiq"

#: The logger of Dramatiq's worker threads, on which an actor's exceptions are logged.
WORKER_LOGGER = "dramatiq.worker.WorkerThread"

#: The options ``group.run()`` gives each member of a group with completion callbacks.
GROUP_ID_OPTION = "group_completion_uuid"
GROUP_CALLBACKS_OPTION = "group_completion_callbacks"

#: How often a consumer looks for messages of its own that it lost track of (see below).
ORPHAN_SWEEP_S = 10.0


_HEX = frozenset("0123456789abcdef")


def result_message(actor: dramatiq.Actor, message_id: str) -> Message:
    """A message of ``actor`` with id ``message_id``: enough to read or delete the result of the
    message of that id (its key depends on nothing else), without carrying whole messages around."""
    return Message(
        queue_name=actor.queue_name,
        actor_name=actor.actor_name,
        args=(),
        kwargs={},
        options={},
        message_id=message_id,
    )


def is_result_key(key: str) -> bool:
    """Whether ``key`` has the shape of a key of Dramatiq's result backend (32 hex digits)."""
    return len(key) == 32 and set(key) <= _HEX


def is_group_key(key: str) -> bool:
    """Whether ``key`` has the shape of a group's barrier (its completion uuid) or of its members set."""
    bare = key.removesuffix(DistinctGroupCallbacks.MEMBERS_SUFFIX)
    return len(bare) == 36 and bare.count("-") == 4 and set(bare.replace("-", "")) <= _HEX


def prometheus_db_path() -> str:
    """Where the worker processes of Dramatiq's Prometheus middleware keep their metrics files."""
    return prometheus.DB_PATH


def redis_message_id(message: Message) -> str:
    """The id under which Redis keeps this delivery of ``message`` (new at each send)."""
    return message.options["redis_message_id"]


def ack_sets_prefix(namespace: str = NAMESPACE) -> str:
    """What the key of every ack set begins with."""
    return f"{namespace}:__acks__."


def ack_set_key(worker_id: str, queue_name: str, namespace: str = NAMESPACE) -> str:
    """The set of ids of ``queue_name`` fetched by broker ``worker_id`` and not yet acked.

    ``worker_id`` is the broker's ``broker_id`` (one per worker process); ``"*"`` for either
    makes a pattern for ``SCAN``.
    """
    return f"{ack_sets_prefix(namespace)}{worker_id}.{queue_name}"


def heartbeats_key(namespace: str = NAMESPACE) -> str:
    """The sorted set of broker ids, scored by the time (ms) of their latest command."""
    return f"{namespace}:__heartbeats__"


class QueueKeys(NamedTuple):
    """Where Dramatiq's RedisBroker keeps the messages of one queue."""

    #: A list: the ids waiting for a worker.
    waiting: str
    #: A hash id → message: every message of the queue not yet acked (waiting or fetched).
    messages: str
    #: The list of the delayed queue (retries waiting for their backoff, messages due later).
    delayed: str
    #: The hash of the delayed queue.
    delayed_messages: str
    #: A sorted set: the ids dead-lettered, by when.
    dead: str
    #: The hash of the dead-lettered messages.
    dead_messages: str


def queue_keys(queue_name: str, namespace: str = NAMESPACE) -> QueueKeys:
    """The Redis keys of queue ``queue_name`` (its canonical name, as actors declare it)."""
    waiting, delayed, dead = (
        f"{namespace}:{name}" for name in (queue_name, dq_name(queue_name), xq_name(queue_name))
    )
    return QueueKeys(waiting, f"{waiting}.msgs", delayed, f"{delayed}.msgs", dead, f"{dead}.msgs")


class PipelinableScript:
    """The broker's Lua dispatch script, sent on the calling thread's pipeline when it has one."""

    def __init__(self, script: Callable[..., Any]) -> None:
        self.script = script
        self.local = threading.local()

    def __call__(self, keys=None, args=None, client=None):
        return self.script(keys=keys, args=args, client=client or getattr(self.local, "pipe", None))


class OrphanRequeueingConsumer(_RedisConsumer):
    """A Redis consumer that puts back messages it fetched but never received.

    Dramatiq's fetch script moves message ids to this worker's ack set and returns the
    messages. When Redis runs that and then goes away before the reply arrives (a restart),
    the client retries and gets the next messages: the first ones stay in the ack set of a
    worker that is alive, so maintenance never requeues them, and their jobs never end.
    Every ``ORPHAN_SWEEP_S`` the consumer compares its ack set with the messages it holds
    (prefetched, or handed to a worker thread and not yet acked); ids it did not hold in two
    sweeps in a row are requeued.

    When Dramatiq replaces a consumer (after a connection error it could not ride out), the new
    one does not know what the old one handed out: those messages may run a second time, which
    every actor of the pipeline tolerates; the ones the old consumer had prefetched or was
    holding for a delay come back instead of staying stuck.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out: set[str] = set()  # redis message ids given to worker threads, not yet acked
        self._lock = threading.Lock()  # worker threads ack; the consumer thread sweeps
        self._unheld: set[str] = set()
        self._next_sweep = time.monotonic() + ORPHAN_SWEEP_S

    def __next__(self):
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_SWEEP_S
            self._requeue_orphans()
        message = super().__next__()
        if message is not None:
            with self._lock:
                self._handed_out.add(redis_message_id(message))
        return message

    def ack(self, message):
        super().ack(message)  # a failed ack raises and is tried again: the message stays held
        self._release(message)

    def nack(self, message):
        super().nack(message)
        self._release(message)

    def _release(self, message) -> None:
        with self._lock:
            self._handed_out.discard(redis_message_id(message))

    def _requeue_orphans(self) -> None:
        # Take what is held *before* reading the ack set: an id acked in between is simply absent.
        with self._lock:
            held = set(self._handed_out)
        held.update(redis_message_id(dramatiq.Message.decode(data)) for data in self.message_cache if data)
        acks = ack_set_key(self.broker.broker_id, self.queue_name, self.broker.namespace)
        try:
            unheld = {member.decode() for member in self.broker.client.smembers(acks)} - held
            orphans, self._unheld = unheld & self._unheld, unheld
            if orphans:
                logger.warning(
                    "Requeueing %d message(s) of queue %r whose fetch reply was lost.",
                    len(orphans),
                    self.queue_name,
                )
                self.broker.do_requeue(self.queue_name, *orphans)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._unheld = set()  # Redis is away: look again at the next sweep


class PipelinedRedisBroker(RedisBroker):
    """A :class:`RedisBroker` that can send a batch of messages in one Redis pipeline,
    and whose consumers recover messages whose fetch reply was lost.

    Every message still goes through Dramatiq's own ``enqueue`` (middleware hooks, ids, the
    Lua dispatch script); inside :meth:`pipelined` the calling thread's script calls are
    queued on a Redis pipeline instead of being sent one by one. Other threads (a worker's
    consumers in the same process) are not affected.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._dispatch_script = PipelinableScript(self.scripts["dispatch"])
        self.scripts["dispatch"] = self._dispatch_script

    @property
    def consumer_class(self):
        return OrphanRequeueingConsumer

    @contextmanager
    def pipelined(self, *, transaction: bool = False) -> Iterator[redis.client.Pipeline]:
        """Buffer this thread's ``enqueue`` calls made in the block and send them at its end.

        Yields the pipeline, so other commands can ride along; with ``transaction=True`` the
        block is sent as one MULTI/EXEC, which no other client sees half done (Redis does not
        roll back a command that fails inside it). A pipeline that loses its connection is sent
        again, unless it WATCHes a key: then it raises ``WatchError``.
        """
        local = self._dispatch_script.local
        with self.client.pipeline(transaction=transaction) as pipe:
            local.pipe = pipe
            try:
                yield pipe
            finally:
                local.pipe = None
            pipe.execute()


class DistinctGroupCallbacks(GroupCallbacks):
    """Group completion callbacks whose barrier counts distinct members, and goes when it fires.

    Dramatiq's barrier is a counter that each member completion decrements: a member
    redelivered after it completed (its worker died before the ack) counts twice, and the
    callback fires while another member is still running. Here a completion adds the member's
    message id to a set next to the barrier; the callbacks fire once the set holds as many
    ids as the group has members, and both keys are deleted then, so Redis keeps nothing of
    a finished group. A member that completes after its barrier is gone (fired, or expired)
    fires the callbacks again: callbacks must be idempotent, as ``collect`` is.

    ``group.run()`` still creates the barrier through this middleware's rate-limiter backend
    (a ``SET NX`` of the member count under the group's completion id).

    Parameters:
      rate_limiter_backend(RedisBackend): Dramatiq's Redis rate-limiter backend; its client runs the script.
      barrier_ttl(int): Milliseconds a barrier lives if its group never completes.
    """

    #: What the key of a group's members set adds to the group's id (its barrier's key).
    MEMBERS_SUFFIX = "@members"

    _ARRIVE = """
    local parties = redis.call("get", KEYS[1])
    if not parties then
        return 1
    end
    redis.call("sadd", KEYS[2], ARGV[1])
    if redis.call("scard", KEYS[2]) >= tonumber(parties) then
        redis.call("del", KEYS[1], KEYS[2])
        return 1
    end
    redis.call("pexpire", KEYS[2], ARGV[2])
    return 0
    """

    def __init__(self, rate_limiter_backend, *, barrier_ttl: int) -> None:
        super().__init__(rate_limiter_backend, barrier_ttl=barrier_ttl)
        self._arrive = rate_limiter_backend.client.register_script(self._ARRIVE)

    @classmethod
    def members_key(cls, group_id: str) -> str:
        """The set of the ids of a group's members that completed, next to its barrier."""
        return f"{group_id}{cls.MEMBERS_SUFFIX}"

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is not None:
            return
        group_id = message.options.get(GROUP_ID_OPTION)
        callbacks = message.options.get(GROUP_CALLBACKS_OPTION)
        if not (group_id and callbacks):
            return
        keys = [group_id, self.members_key(group_id)]
        if self._arrive(keys=keys, args=[message.message_id, self.barrier_ttl]):
            for callback in callbacks:
                broker.enqueue(Message(**callback))
