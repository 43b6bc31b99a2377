"""Exact under redelivery: a message delivered again must never mix bodies, fire a collector early,
or leave finished work behind in Redis.

Redelivery is made deterministic by a test middleware on the real broker: it re-enqueues a
message that already ran (same message id, as Redis redelivers it after a worker died before
its ack) and holds a member back until the interleaving under test has happened.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

import numpy as np
import pytest
from dramatiq.middleware import Middleware

from image_crawler import storage
from image_crawler.dramatiq_internals import ack_sets_prefix, heartbeats_key
from support.http_server import Response
from support.images import decode_png, expected_gray, png_bytes


class Choreography(Middleware):
    """Records which actors ran, and lets a test act before and after each message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: Counter[str] = Counter()
        self.failures: list[tuple[str, BaseException]] = []
        self.started: Counter[str] = Counter()
        self.messages: dict[str, list] = {}
        self.before: dict[str, object] = {}
        self.after: dict[str, object] = {}

    def before_process_message(self, broker, message):
        with self.lock:
            self.started[message.actor_name] += 1
            self.messages.setdefault(message.actor_name, []).append(message)
            count = self.started[message.actor_name]
        hook = self.before.get(message.actor_name)
        if hook is not None:
            hook(message, count)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        with self.lock:
            if exception is not None:
                self.failures.append((message.actor_name, exception))
            self.finished[message.actor_name] += 1
            count = self.finished[message.actor_name]
        hook = self.after.get(message.actor_name)
        if hook is not None:
            hook(message, count)


@pytest.fixture
def choreography(make_pipeline):
    pipeline = make_pipeline(threads=8)
    middleware = Choreography()
    pipeline.broker.middleware.append(middleware)
    yield pipeline, middleware
    pipeline.broker.middleware.remove(middleware)


def _crawl_to_the_end(pipeline, lines: list[str]):
    """Enqueue ``lines``, wait for their outcomes, then until the worker has nothing left to do."""
    report = pipeline.enqueue_text("\n".join(lines))
    pipeline.wait_for(report.run, len(lines), timeout=60)
    for queue in ("process", "fetch"):
        pipeline.broker.join(queue, timeout=30_000)
    pipeline.worker.join()
    return report


def _stored_images_match_their_md5(db, bodies: dict[str, bytes]) -> None:
    for document in storage.images(db).find():
        body = bodies[document["_id"]]  # the stored md5 is one the server sent
        png = storage.gray_files(db).get(document["_id"]).read()
        assert np.array_equal(decode_png(png)[1], expected_gray(body)), "PNG of other bytes than its md5"


def test_a_fetch_redelivered_after_its_group_was_sent_never_mixes_bodies(choreography, server):
    pipeline, middleware = choreography
    # A random-image service: different bytes on every request.
    variants = [png_bytes(40 + n, 30, seed=500 + n) for n in range(4)]
    server.add_sequence("/random.png", [Response(body=body, content_type="image/png") for body in variants])
    second_fetch_done = threading.Event()

    def redeliver_fetch(message, count):
        if count == 1:  # the first md5 read the first body: now the fetch comes back
            pipeline.broker.enqueue(middleware.messages["fetch"][0])

    def hold_first_grayscale(message, count):
        if count == 1:
            assert second_fetch_done.wait(20), "the redelivered fetch never ran"

    def note_fetch(message, count):
        if count == 2:
            second_fetch_done.set()

    middleware.after["md5"] = redeliver_fetch
    middleware.before["grayscale"] = hold_first_grayscale
    middleware.after["fetch"] = note_fetch

    report = _crawl_to_the_end(pipeline, [server.url("/random.png")])

    assert middleware.finished["fetch"] == 2
    outcome = storage.ledger(pipeline.db).find_one({"run": report.run})
    assert outcome["outcome"] == "success", outcome
    _stored_images_match_their_md5(pipeline.db, {hashlib.md5(body).hexdigest(): body for body in variants})
    assert outcome["md5"] in set(storage.images(pipeline.db).distinct("_id"))


def test_a_member_that_completes_twice_does_not_fire_the_collector_early(choreography, server):
    pipeline, middleware = choreography
    body = png_bytes(64, 48, seed=4242)
    server.add("/one.png", body=body, content_type="image/png")
    collector_started = threading.Event()

    def redeliver_md5(message, count):
        if count == 1:
            pipeline.broker.enqueue(message)  # the same md5 message again, as after a lost ack

    def hold_grayscale(message, count):
        # Held until a collector runs: with a barrier that counts completions it runs now,
        # before grayscale has a result. With one that counts members, it waits for us.
        collector_started.wait(5)

    middleware.after["md5"] = redeliver_md5
    middleware.before["grayscale"] = hold_grayscale
    middleware.before["collect"] = lambda message, count: collector_started.set()

    report = _crawl_to_the_end(pipeline, [server.url("/one.png")])

    assert middleware.finished["md5"] == 2
    outcome = storage.ledger(pipeline.db).find_one({"run": report.run})
    assert (outcome["outcome"], outcome["reason"]) == ("success", None)
    assert middleware.failures == []  # no collector ran without both results
    assert middleware.started["collect"] == 1


def test_redis_keeps_nothing_of_finished_work(make_pipeline, server):
    pipeline = make_pipeline(threads=8)
    client = pipeline.broker.client
    earlier = set(client.scan_iter())  # left by other tests (each expires with its TTL)
    for n in range(40):
        server.add(f"/{n}.png", body=png_bytes(20 + n, 20, seed=900 + n), content_type="image/png")
    server.add("/missing.png", status=404)
    lines = [server.url(f"/{n}.png") for n in range(40)] + [server.url("/missing.png")]
    lines += [server.url("/3.png")]  # a duplicate
    _crawl_to_the_end(pipeline, lines)

    # What may stay: Dramatiq's bookkeeping of live workers, and the per-batch admission mark.
    allowed = (heartbeats_key(), ack_sets_prefix(), "image-crawler:admitted:")
    left = sorted(
        key.decode() for key in set(client.scan_iter()) - earlier if not key.decode().startswith(allowed)
    )
    assert left == []
