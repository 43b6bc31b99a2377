"""Fault injection with real processes: killed and stopped workers lose nothing and count nothing twice."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
import uuid

import pymongo
import pytest
import redis

from image_crawler.dramatiq_internals import ack_set_key, heartbeats_key
from support.http_server import LocalHttpServer
from support.images import png_bytes
from support.processes import (
    END_TO_END_SETTINGS,
    crawl_environment,
    image_crawler_command,
    signal_workers,
    start_workers,
    stop_workers,
)
from support.services import database_uri, start_redis
from support.waiting import wait_until

pytestmark = pytest.mark.slow

DISTINCT, REPEATS = 900, 100


def _url_list(server: LocalHttpServer, tmp_path) -> tuple:
    bodies = {n: png_bytes(48 + n % 40, 32 + n % 24, seed=10_000 + n) for n in range(DISTINCT)}
    lines = []
    for n, body in bodies.items():
        # A little latency per image keeps the run going long enough to interrupt it.
        server.add(f"/img/{n}.png", body, content_type="image/png", delay=0.02)
        lines.append(server.url(f"/img/{n}.png"))
    lines += [server.url(f"/img/{n}.png") for n in range(0, 2 * REPEATS, 2)]
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    return urls, bodies


def _start_enqueue(env: dict[str, str], urls) -> subprocess.Popen:
    """`image-crawler enqueue URLS --wait` in the background, its output captured."""
    command = image_crawler_command("enqueue", str(urls), "--wait", "--timeout", "600")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _held_messages(client: redis.Redis, worker_ids: set[str]) -> int:
    """Messages fetched but not acknowledged by these broker ids (running and prefetched)."""
    keys = [key for wid in worker_ids for key in client.scan_iter(ack_set_key(wid, "*"))]
    return sum(client.scard(key) for key in keys)


def _assert_mid_run(fault: str, before: int, after: int) -> None:
    """The fault hit a run in progress: some lines had ended before it (``before``, counted when it
    was injected) and some had not when it was over (``after``, counted when the run could go on)."""
    total = DISTINCT + REPEATS
    assert 0 < before <= after < total, (
        f"{fault}: {before} outcomes when it was injected, {after} when it was over, of {total}: "
        "it did not hit the run mid-way, so the test proved nothing about it"
    )


def _assert_exact(db, bodies, enqueue: subprocess.Popen, output: str) -> None:
    total = DISTINCT + REPEATS
    assert enqueue.returncode == 0, output
    summary = f"done: {total} urls — {DISTINCT} success, {REPEATS} duplicate, 0 error"
    assert output.strip().splitlines()[-1] == summary
    assert db.outcomes.count_documents({}) == total
    assert sorted(doc["line"] for doc in db.outcomes.find({}, {"line": 1})) == list(range(1, total + 1))
    assert db.images.count_documents({}) == DISTINCT
    assert db["gray.files"].count_documents({}) == DISTINCT
    assert set(db.images.distinct("_id")) == {hashlib.md5(b).hexdigest() for b in bodies.values()}
    # The job named by each image is the one whose outcome says success.
    winners = {doc["job"] for doc in db.images.find({}, {"job": 1})}
    assert winners == {doc["_id"] for doc in db.outcomes.find({"outcome": "success"}, {"_id": 1})}


def test_a_killed_worker_loses_nothing_and_its_messages_come_back(crawl_env, tmp_path):
    env, db = crawl_env
    client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    with LocalHttpServer() as server:
        urls, bodies = _url_list(server, tmp_path)
        doomed = start_workers(env, processes=1, threads=4, log=tmp_path / "doomed.log")
        wait_until(
            lambda: client.zcard(heartbeats_key()) > 0, "the first worker to start", timeout=60, pause=0.1
        )
        doomed_ids = set(client.zrange(heartbeats_key(), 0, -1))
        survivor = start_workers(env, processes=1, threads=4, log=tmp_path / "survivor.log")
        enqueue = _start_enqueue(env, urls)
        replacement = None
        try:
            wait_until(
                lambda: db.outcomes.count_documents({}) >= 250,
                "a quarter of the outcomes",
                timeout=300,
                pause=0.1,
            )
            held = _held_messages(client, doomed_ids)
            at_kill = db.outcomes.count_documents({})
            signal_workers(doomed, signal.SIGKILL)
            killed_at = time.monotonic()
            doomed.wait()
            after_kill = db.outcomes.count_documents({})  # the survivor went on meanwhile
            replacement = start_workers(env, processes=1, threads=4, log=tmp_path / "replacement.log")
            wait_until(
                lambda: _held_messages(client, doomed_ids) == 0,
                "the dead worker's messages",
                timeout=300,
                pause=0.1,
            )
            redelivered_after = time.monotonic() - killed_at
            output, _ = enqueue.communicate(timeout=600)
        finally:
            enqueue.kill()
            for workers in (survivor, replacement):
                if workers is not None:
                    stop_workers(workers)
    print(
        f"\nSIGKILL at {at_kill} outcomes: {held} messages held by the killed worker,"
        f" requeued after {redelivered_after:.1f} s"
    )
    _assert_mid_run("SIGKILL", at_kill, after_kill)
    assert doomed.returncode == -signal.SIGKILL
    _assert_exact(db, bodies, enqueue, output)
    assert held > 0, "the killed worker held no messages: the test did not test redelivery"


def test_a_gracefully_stopped_worker_loses_nothing(crawl_env, tmp_path):
    env, db = crawl_env
    with LocalHttpServer() as server:
        urls, bodies = _url_list(server, tmp_path)
        workers = start_workers(env, processes=2, threads=4, log=tmp_path / "first.log")
        enqueue = _start_enqueue(env, urls)
        restarted = None
        try:
            wait_until(
                lambda: db.outcomes.count_documents({}) >= 250,
                "a quarter of the outcomes",
                timeout=300,
                pause=0.1,
            )
            at_sigterm = db.outcomes.count_documents({})
            stopping_at = time.monotonic()
            stop_workers(workers, timeout=120)
            stopped_after = time.monotonic() - stopping_at
            done_while_stopped = db.outcomes.count_documents({})
            restarted = start_workers(env, processes=2, threads=4, log=tmp_path / "restarted.log")
            output, _ = enqueue.communicate(timeout=600)
        finally:
            enqueue.kill()
            if restarted is not None:
                stop_workers(restarted)
    print(
        f"\nSIGTERM at {at_sigterm} outcomes: workers stopped in {stopped_after:.1f} s"
        f" with {done_while_stopped} outcomes recorded"
    )
    # They stopped on the SIGTERM itself, not killed once stop_workers' timeout ran out.
    assert workers.returncode == 0, f"workers exited with {workers.returncode} after SIGTERM"
    # The restarted workers had lines left: the stop interrupted the run.
    _assert_mid_run("SIGTERM", at_sigterm, done_while_stopped)
    _assert_exact(db, bodies, enqueue, output)


def test_a_redis_restart_mid_run_loses_nothing(mongo_uri, tmp_path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_process, redis_url = start_redis(redis_dir, appendonly=True)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    database = f"restart_{uuid.uuid4().hex[:8]}"
    env = crawl_environment(redis_url, database_uri(mongo_uri, database), **END_TO_END_SETTINGS)
    client = pymongo.MongoClient(mongo_uri, tz_aware=True)
    db = client[database]
    workers = None
    try:
        with LocalHttpServer() as server:
            urls, bodies = _url_list(server, tmp_path)
            workers = start_workers(env, processes=2, threads=4, log=tmp_path / "workers.log")
            enqueue = _start_enqueue(env, urls)
            try:
                wait_until(
                    lambda: db.outcomes.count_documents({}) >= 250,
                    "a quarter of the outcomes",
                    timeout=300,
                    pause=0.1,
                )
                down_at = db.outcomes.count_documents({})
                redis_process.terminate()  # SIGTERM: Redis writes its append-only file and exits
                redis_process.wait(timeout=30)
                time.sleep(3)
                # What was still to do when Redis came back lived through the restart in Redis.
                back_at = db.outcomes.count_documents({})
                redis_process, _ = start_redis(redis_dir, appendonly=True, port=port)
                restarted_at = time.monotonic()
                output, _ = enqueue.communicate(timeout=600)
                finished_after = time.monotonic() - restarted_at
            finally:
                enqueue.kill()
    finally:
        if workers is not None:
            stop_workers(workers)
        redis_process.terminate()
        redis_process.wait(timeout=30)
    print(
        f"\nRedis restart: down at {down_at} outcomes, back at {back_at},"
        f" run finished {finished_after:.1f} s after the restart"
    )
    try:
        _assert_mid_run("Redis restart", down_at, back_at)
        _assert_exact(db, bodies, enqueue, output)
    finally:
        client.drop_database(database)
        client.close()


def test_a_url_that_kills_its_worker_ends_in_error_and_its_batch_completes(crawl_env, tmp_path):
    """A body whose decoding kills the worker process, among good ones; workers are restarted
    whenever they die, as Compose's ``restart: unless-stopped`` does."""
    from support.poison import MARK

    env, db = crawl_env
    env = dict(env, BATCH_SIZE="16", MAX_DELIVERIES="3")
    good = {n: png_bytes(30 + n % 20, 20 + n % 10, seed=20_000 + n) for n in range(199)}
    with LocalHttpServer() as server:
        for n, body in good.items():
            server.add(f"/img/{n}.png", body, content_type="image/png")
        server.add("/poison.png", MARK + b" decodes to death", content_type="image/png")
        lines = [server.url(f"/img/{n}.png") for n in range(100)] + [server.url("/poison.png")]
        lines += [server.url(f"/img/{n}.png") for n in range(100, 199)]
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        starts = 0

        def start():
            nonlocal starts
            starts += 1
            log = tmp_path / f"workers-{starts}.log"
            return start_workers(env, processes=1, threads=4, log=log, modules=("support.poison",))

        workers = start()
        enqueue = _start_enqueue(env, urls)
        try:
            while enqueue.poll() is None:
                if workers.poll() is not None:  # died (or shut down after a child died): restart
                    workers = start()
                time.sleep(0.2)
            output, _ = enqueue.communicate(timeout=60)
        finally:
            enqueue.kill()
            stop_workers(workers)
    crashes = starts - 1
    errors = [(doc["line"], doc["reason"]) for doc in db.outcomes.find({"outcome": "error"})]
    print(f"\npoison: {crashes} worker crashes; {output.strip().splitlines()[-1]}; errors {errors}")
    assert enqueue.returncode == 0, output
    assert output.strip().splitlines()[-1] == "done: 200 urls — 199 success, 0 duplicate, 1 error"
    poisoned = db.outcomes.find_one({"line": 101})
    assert (poisoned["outcome"], poisoned["reason"]) == (
        "error",
        "worker crashed while processing it (3 times)",
    )
    assert db.outcomes.count_documents({"outcome": "success"}) == 199
    assert set(db.images.distinct("_id")) == {hashlib.md5(body).hexdigest() for body in good.values()}
    # Its batch once; then the URL on its own once among others, and twice alone.
    assert crashes == 4
