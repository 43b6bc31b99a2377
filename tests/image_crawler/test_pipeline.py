"""The whole pipeline in one process: real Redis, a real dramatiq.Worker, mongomock for MongoDB."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from image_crawler import outcomes, storage
from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE
from image_crawler.dramatiq_internals import queue_keys
from support.http_server import LocalHttpServer, Response
from support.images import decode_png, encode, expected_gray, photo, png_bytes


@pytest.fixture
def server():
    with LocalHttpServer() as running:
        yield running


def _stored_png(db, md5: str) -> bytes:
    return storage.gray_files(db).get(md5).read()


@pytest.mark.parametrize(
    ("batch_size", "threads"),
    [(1, None), (8, 1)],
    ids=["one url per message", "batches of up to 6 urls"],
)
def test_mixed_list_gives_exact_counts_and_one_outcome_per_url(
    make_pipeline, server, monkeypatch, batch_size, threads
):
    from image_crawler import actors

    if threads is not None:  # as if the cluster had one thread: 21 lines in batches of ceil(21 / 4)
        monkeypatch.setattr(actors, "_worker_threads", lambda: threads)
    pipeline = make_pipeline(
        fetch_timeout=1.0, fetch_max_bytes=300_000, max_image_pixels=1_000_000, batch_size=batch_size
    )
    sizes = []
    original_fetch = actors.fetch.fn
    monkeypatch.setattr(
        actors.fetch, "fn", lambda batch: sizes.append(len(batch["lines"])) or original_fetch(batch)
    )
    good = {f"/img/{n}.png": png_bytes(64 + n, 48, seed=n) for n in range(6)}
    good["/img/photo.jpg"] = encode(photo(120, 80, seed=99), "JPEG", quality=90)
    good["/img/alpha.png"] = encode(photo(50, 40, seed=7, mode="RGBA"), "PNG")
    for path, body in good.items():
        server.add(path, body=body, content_type="image/png")
    server.add("/copy/0.png", body=good["/img/0.png"], content_type="image/png")  # same bytes, other URL
    server.add("/html", body=b"<html><body>not an image</body></html>", content_type="image/png")
    server.add("/empty", body=b"", content_type="image/png")
    server.add("/truncated.png", body=png_bytes(200, 200, seed=42)[:500], content_type="image/png")
    server.add("/huge-body", body=png_bytes(700, 700, seed=5), content_type="image/png")  # > 300 kB
    server.add("/too-many-pixels.png", body=encode(Image.new("L", (1100, 1000), 128), "PNG"))  # tiny file
    server.add("/missing", status=404)
    server.add("/bad-request", status=400, body=b"invalid size")
    server.add("/down", status=503)
    server.add_sequence("/flaky.png", [Response(status=503), Response(body=png_bytes(30, 30, seed=77))])
    server.add_redirect("/hop/1", "/hop/2")
    server.add_redirect("/hop/2", "/img/photo.jpg")
    for n in range(8):
        server.add_redirect(f"/loop/{n}", f"/loop/{n + 1}")

    lines = [
        "# a comment, then a blank line",
        "",
        *(server.url(path) for path in good),  # 8 success
        server.url("/img/1.png"),  # duplicate: same URL again
        server.url("/copy/0.png"),  # duplicate: same bytes elsewhere
        server.url("/hop/1"),  # duplicate: photo.jpg through two redirects
        server.url("/flaky.png"),  # success after a retry
        server.url("/html"),
        server.url("/empty"),
        server.url("/truncated.png"),
        server.url("/huge-body"),
        server.url("/too-many-pixels.png"),
        server.url("/missing"),
        server.url("/bad-request"),
        server.url("/down"),
        server.url("/loop/0"),
        "ftp://example.com/a.png",
        "not a url at all",
    ]
    report = pipeline.enqueue_text("\n".join(lines) + "\n")
    assert (report.enqueued, report.rejected, report.skipped) == (21, 2, 2)

    pipeline.wait_for(report.run, report.jobs, timeout=90)

    ledger = list(storage.ledger(pipeline.db).find({"run": report.run}))
    assert sorted(doc["line"] for doc in ledger) == list(range(3, 3 + 23))
    by_url = {doc["url"]: doc for doc in ledger}
    reasons = {
        url.rsplit("/", 1)[-1]: doc["reason"] for url, doc in by_url.items() if doc["outcome"] == "error"
    }
    assert reasons == {
        "html": "not an image",
        "empty": "empty body",
        "truncated.png": "truncated image",
        "huge-body": "too large",
        "too-many-pixels.png": "too many pixels: 1100x1000",
        "missing": "http 404",
        "bad-request": "http 400",
        "down": "http 503",
        "0": "too many redirects",
        "a.png": "not an http(s) url",
        "not a url at all": "not an http(s) url",
    }
    assert Counter(doc["outcome"] for doc in ledger) == {"success": 9, "duplicate": 3, "error": 11}
    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 9, "duplicate": 3, "error": 11}
    assert server.hits("/down") == 3  # first try and FETCH_RETRIES=2 retries
    assert max(sizes) == (1 if batch_size == 1 else 6)  # then the retries, each alone

    # Every distinct image is stored once, with a PNG equal to the formula.
    stored = {doc["_id"]: doc for doc in storage.images(pipeline.db).find()}
    bodies = [*good.values(), png_bytes(30, 30, seed=77)]
    assert set(stored) == {hashlib.md5(body).hexdigest() for body in bodies}
    assert pipeline.db["gray.files"].count_documents({}) == len(bodies)
    for body in bodies:
        digest = hashlib.md5(body).hexdigest()
        mode, pixels = decode_png(_stored_png(pipeline.db, digest))
        gray = pixels[..., 0] if mode == "LA" else pixels
        assert np.array_equal(gray, expected_gray(body)), digest
        assert (stored[digest]["width"], stored[digest]["height"]) == (gray.shape[1], gray.shape[0])
    alpha_md5 = hashlib.md5(good["/img/alpha.png"]).hexdigest()
    assert decode_png(_stored_png(pipeline.db, alpha_md5))[0] == "LA"
    first = stored[hashlib.md5(good["/img/0.png"]).hexdigest()]
    # Either URL of those bytes may win; the image names the job that stored it, and that job succeeded.
    assert first["source_url"] in (server.url("/img/0.png"), server.url("/copy/0.png"))
    winner = outcomes.get_outcome(pipeline.db, first["job"])
    assert (winner["outcome"], winner["url"]) == ("success", first["source_url"])
    assert first["content_type"] == "image/png"
    assert first["byte_size"] == len(good["/img/0.png"])
    assert first["inserted_at"].tzinfo is not None

    # Success and duplicate outcomes name the image; parked bytes are gone.
    assert all(doc["md5"] in stored for doc in ledger if doc["outcome"] != "error")
    assert not list(pipeline.context.claims.client.scan_iter("image-crawler:claim:*"))


def test_enqueuing_the_same_list_again_yields_only_duplicates(make_pipeline, server):
    pipeline = make_pipeline()
    for n in range(5):
        server.add(f"/{n}.png", body=png_bytes(40, 40, seed=100 + n))
    text = "\n".join(server.url(f"/{n}.png") for n in range(5))
    first = pipeline.enqueue_text(text)
    pipeline.wait_for(first.run, 5)
    second = pipeline.enqueue_text(text)
    pipeline.wait_for(second.run, 5)

    assert outcomes.count_outcomes(pipeline.db, first.run) == {"success": 5, "duplicate": 0, "error": 0}
    assert outcomes.count_outcomes(pipeline.db, second.run) == {"success": 0, "duplicate": 5, "error": 0}
    assert storage.images(pipeline.db).count_documents({}) == 5


def test_two_workers_racing_on_the_same_image_store_it_once(make_pipeline, server):
    pipeline = make_pipeline(threads=8)
    make_pipeline(threads=8)  # a second worker on the same broker and database
    body = png_bytes(300, 200, seed=1234)
    for n in range(40):
        server.add(f"/same/{n}.png", body=body)
    report = pipeline.enqueue_text("\n".join(server.url(f"/same/{n}.png") for n in range(40)))
    pipeline.wait_for(report.run, 40)

    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 1, "duplicate": 39, "error": 0}
    assert storage.images(pipeline.db).count_documents({}) == 1
    assert pipeline.db["gray.files"].count_documents({}) == 1
    digest = hashlib.md5(body).hexdigest()
    assert np.array_equal(decode_png(_stored_png(pipeline.db, digest))[1], expected_gray(body))


def test_mongodb_down_for_a_while_delays_outcomes_but_loses_none(make_pipeline, server, monkeypatch):
    import pymongo.errors

    from image_crawler import actors

    # MongoDB is the one part with no real server here, so its outage is injected where the
    # actors meet it: while `down`, every read and write of a worker thread raises what a lost
    # connection raises (the test's own thread, which enqueues and counts, still reaches it).
    down = True
    real_store, real_record, real_finished = (
        storage.store_new_images,
        outcomes.record_outcomes,
        outcomes.ended_jobs,
    )

    def unless_down(write):
        def call(*args, **kwargs):
            if down and threading.current_thread() is not threading.main_thread():
                raise pymongo.errors.AutoReconnect("connection refused (injected)")
            return write(*args, **kwargs)

        return call

    monkeypatch.setattr(actors.storage, "store_new_images", unless_down(real_store))
    monkeypatch.setattr(actors.outcomes, "record_outcomes", unless_down(real_record))
    monkeypatch.setattr(actors.outcomes, "ended_jobs", unless_down(real_finished))
    pipeline = make_pipeline()
    for n in range(12):
        server.add(f"/{n}.png", body=png_bytes(30, 30, seed=300 + n))
    report = pipeline.enqueue_text("\n".join(server.url(f"/{n}.png") for n in range(12)))

    time.sleep(4)  # collectors fail and back off meanwhile
    assert storage.ledger(pipeline.db).count_documents({}) == 0
    assert storage.images(pipeline.db).count_documents({}) == 0
    down = False
    pipeline.wait_for(report.run, 12, timeout=90)

    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 12, "duplicate": 0, "error": 0}
    ledger = storage.ledger(pipeline.db).find({"run": report.run})
    assert {doc["md5"] for doc in ledger} == set(storage.images(pipeline.db).distinct("_id"))


# --- admission: batches of lines become fetch messages, once ------------------------------


def _queued(broker, queue: str) -> int:
    return broker.client.hlen(queue_keys(queue, broker.namespace).messages)


@pytest.fixture
def idle_broker(redis_url):
    """The broker with nobody consuming."""
    from image_crawler import actors

    actors.broker.flush_all()
    yield actors.broker
    actors.broker.flush_all()


def _queued_fetches(broker) -> list[dict]:
    import dramatiq

    return [
        dramatiq.Message.decode(data).args[0]
        for data in broker.client.hvals(queue_keys(FETCH_QUEUE).messages)
    ]


def test_a_batch_becomes_fetch_messages_of_batch_size_lines(idle_broker, idle_context):
    from image_crawler import actors

    lines = [[n, f"http://example.com/{n}.png"] for n in range(1, 101)]

    actors.admit.fn({"run": "r1", "lines": lines})

    batches = sorted(_queued_fetches(idle_broker), key=lambda batch: batch["lines"][0][0])
    size = actors.settings.batch_size
    assert [len(batch["lines"]) for batch in batches] == [size] * (100 // size) + [100 % size] * bool(
        100 % size
    )
    assert [line for batch in batches for line in batch["lines"]] == [[n, url, 0] for n, url in lines]
    assert {batch["run"] for batch in batches} == {"r1"}


def test_the_last_batch_of_a_short_run_is_cut_so_every_thread_has_work():
    from image_crawler.actors import BATCHES_PER_THREAD, fetch_batch_size

    # 343 lines, 2 processes x 8 threads: 64 batches wanted, so 6 lines each (58 batches).
    assert fetch_batch_size(343, threads=16, batch_size=32) == 6
    assert fetch_batch_size(10, threads=16, batch_size=32) == 1
    assert fetch_batch_size(3_000, threads=16, batch_size=32) == 32  # long enough for full batches
    assert fetch_batch_size(None, threads=16, batch_size=32) == 32  # length not known: more follow
    assert fetch_batch_size(40, threads=1, batch_size=32) == 40 // BATCHES_PER_THREAD
    assert fetch_batch_size(343, threads=16, batch_size=1) == 1


def test_a_redelivered_batch_is_admitted_only_once(idle_broker, idle_context):
    from image_crawler import actors

    batch = {"run": "r2", "lines": [[n, f"http://example.com/{n}.png"] for n in range(1, 301)]}

    multis = idle_broker.client.info("commandstats").get("cmdstat_multi", {}).get("calls", 0)
    actors.admit.fn(batch)
    actors.admit.fn(batch)  # the same message again, as after a worker died before its ack

    assert idle_broker.client.info("commandstats")["cmdstat_multi"]["calls"] == multis + 1
    queued = sorted(line[0] for fetch in _queued_fetches(idle_broker) for line in fetch["lines"])
    assert queued == list(range(1, 301))
    assert idle_broker.client.ttl(actors.admitted_key(batch)) > 24 * 3600


def test_a_batch_admitted_meanwhile_by_another_worker_is_not_admitted_again(
    idle_broker, idle_context, monkeypatch
):
    from image_crawler import actors

    batch = {"run": "r5", "lines": [[n, f"http://example.com/{n}.png"] for n in range(1, 11)]}
    actors.admit.fn(batch)  # another worker's delivery of the same batch
    # This delivery looked before that one set the mark; the check under WATCH sees it.
    monkeypatch.setattr(idle_broker.client, "exists", lambda key: 0)

    actors.admit.fn(batch)

    assert sorted(line[0] for fetch in _queued_fetches(idle_broker) for line in fetch["lines"]) == list(
        range(1, 11)
    )


def test_a_batch_that_fails_midway_sends_no_fetch_at_all(idle_broker, idle_context, monkeypatch):
    from image_crawler import actors

    sent = []

    def send_then_fail(batch):
        if len(sent) == 3:
            raise RuntimeError("worker interrupted")
        sent.append(batch)
        return original(batch)

    original = actors.fetch.send
    monkeypatch.setattr(actors.fetch, "send", send_then_fail)
    batch = {"run": "r3", "lines": [[n, f"http://example.com/{n}.png"] for n in range(1, 301)]}

    with pytest.raises(RuntimeError):
        actors.admit.fn(batch)

    assert len(sent) == 3
    assert _queued(idle_broker, "fetch") == 0  # the three were queued on a pipeline never sent
    assert not idle_broker.client.exists(actors.admitted_key(batch))
    monkeypatch.undo()
    actors.admit.fn(batch)  # so a retry admits the whole batch
    assert sorted(line[0] for fetch in _queued_fetches(idle_broker) for line in fetch["lines"]) == list(
        range(1, 301)
    )


def test_a_batch_that_fails_for_good_ends_every_line_in_one_error(make_pipeline, monkeypatch):
    from image_crawler import actors

    def broken(job):
        raise RuntimeError("bug")

    monkeypatch.setattr(actors.fetch, "send", broken)  # admit fails at once (not a transient error)
    pipeline = make_pipeline(threads=2)
    lines = [[n, f"http://example.com/{n}.png"] for n in (1, 2, 4)]

    actors.admit.send({"run": "r4", "lines": lines})
    pipeline.wait_for("r4", 3, timeout=30)
    pipeline.broker.join("process", timeout=20_000)
    pipeline.worker.join()

    ledger = sorted(storage.ledger(pipeline.db).find({"run": "r4"}), key=lambda doc: doc["line"])
    assert [(doc["line"], doc["outcome"], doc["reason"]) for doc in ledger] == [
        (line, "error", "not admitted: internal error: RuntimeError") for line in (1, 2, 4)
    ]


def test_enqueue_sends_one_admit_message_per_thousand_lines(idle_broker, mongo_db):
    import io

    import dramatiq

    from image_crawler.cli import enqueue_lines

    text = "".join(f"http://example.com/{n}.png\n" if n % 7 else "# comment\n" for n in range(1, 2_601))

    report = enqueue_lines(io.BytesIO(text.encode()), mongo_db)

    queued = idle_broker.client.hvals(queue_keys(ADMIT_QUEUE).messages)
    batches = [dramatiq.Message.decode(data).args[0] for data in queued]
    lines = sorted(line for batch in batches for line, _ in batch["lines"])
    assert sorted(len(batch["lines"]) for batch in batches) == [514, 857, 858]  # 1,000 less comments
    assert lines == [n for n in range(1, 2_601) if n % 7]
    assert {batch["run"] for batch in batches} == {report.run}
    assert (report.enqueued, report.skipped) == (len(lines), 371)
    in_order = sorted(batches, key=lambda batch: batch["lines"][0][0])
    # The last one says how long the run is (what admission cuts a short run by).
    assert [batch.get("run_lines") for batch in in_order] == [None, None, len(lines)]


# --- after a worker died running a message ----------------------------------------------------


@pytest.fixture
def idle_context(idle_broker, mongo_db, redis_url):
    """The actors' context on mongomock, with nobody consuming the broker."""
    import dataclasses

    from image_crawler.claims import ClaimCheck
    from image_crawler.config import get_settings
    from image_crawler.context import Context, set_context
    from image_crawler.fetching import Fetcher

    settings = dataclasses.replace(get_settings(), redis_url=redis_url, max_deliveries=3)
    context = Context(settings, mongo_db, ClaimCheck(idle_broker.client, 600), Fetcher(settings))
    previous = set_context(context)
    yield context
    set_context(previous)
    context.close()


def _delivered(actor, batch):
    return actor.message(batch)


def test_a_first_delivery_runs_as_usual(idle_context):
    from image_crawler import actors
    from image_crawler.middleware import Verdict

    batch = {"run": "d0", "lines": [[1, "http://example.com/1.png", 0], [2, "http://example.com/2.png", 0]]}
    assert actors.after_worker_death(_delivered(actors.fetch, batch), 0) is Verdict.RUN


def test_a_batch_whose_worker_died_goes_on_line_by_line_skipping_finished_lines(idle_context, idle_broker):
    from image_crawler import actors
    from image_crawler.middleware import Verdict

    lines = [[n, f"http://example.com/{n}.png"] for n in range(1, 5)]
    outcomes.record_outcome(
        idle_context.db, outcomes.Job.new("d1", 2, lines[1][1]), outcomes.ERROR, reason="x"
    )
    parcel = {"run": "d1", "claim": "c", "lines": lines, "sizes": [1, 1, 1, 1]}

    verdict = actors.after_worker_death(_delivered(actors.grayscale, parcel), 1)

    assert verdict is Verdict.HANDLED
    singles = sorted(_queued_fetches(idle_broker), key=lambda batch: batch["lines"][0][0])
    assert singles == [{"run": "d1", "lines": [[n, f"http://example.com/{n}.png", 0]]} for n in (1, 3, 4)]


def test_a_single_line_whose_worker_died_runs_alone_until_it_killed_max_deliveries(idle_context):
    from image_crawler import actors
    from image_crawler.middleware import Verdict

    single = {"run": "d2", "claim": "c", "lines": [[7, "http://example.com/7.png"]], "sizes": [1]}

    assert actors.after_worker_death(_delivered(actors.grayscale, single), 0) is Verdict.RUN
    assert actors.after_worker_death(_delivered(actors.grayscale, single), 1) is Verdict.RUN_ALONE
    assert actors.after_worker_death(_delivered(actors.grayscale, single), 2) is Verdict.RUN_ALONE
    assert outcomes.get_outcome(idle_context.db, "d2:7") is None
    assert actors.after_worker_death(_delivered(actors.grayscale, single), 3) is Verdict.HANDLED

    entry = outcomes.get_outcome(idle_context.db, "d2:7")
    assert (entry["outcome"], entry["reason"]) == ("error", "worker crashed while processing it (3 times)")


def test_lines_split_twice_after_the_same_death_are_sent_on_once_with_their_attempts(
    idle_context, idle_broker
):
    from image_crawler import actors
    from image_crawler.middleware import Verdict

    # A fetch that died after sending its group, and that group's grayscale, both come back.
    batch = {"run": "d3", "lines": [[n, f"http://example.com/{n}.png", 2] for n in range(1, 4)]}
    parcel = {"run": "d3", "claim": "c", "lines": [line[:2] for line in batch["lines"]], "sizes": [1] * 3}

    assert actors.after_worker_death(_delivered(actors.fetch, batch), 1) is Verdict.HANDLED
    assert actors.after_worker_death(_delivered(actors.grayscale, parcel), 1) is Verdict.HANDLED

    singles = sorted(_queued_fetches(idle_broker), key=lambda batch: batch["lines"][0][0])
    assert [single["lines"] for single in singles] == [
        [[n, f"http://example.com/{n}.png", 2]] for n in (1, 2, 3)
    ]


def test_md5_and_collect_of_a_parcel_run_alone_after_a_death_rather_than_fetch_again(
    idle_context, idle_broker
):
    from image_crawler import actors
    from image_crawler.middleware import Verdict

    parcel = {
        "run": "d4",
        "claim": "c",
        "lines": [[1, "http://example.com/1.png"], [2, "x"]],
        "sizes": [1, 1],
    }

    assert actors.after_worker_death(_delivered(actors.md5, parcel), 1) is Verdict.RUN_ALONE
    assert actors.after_worker_death(actors.collect.message(parcel, [], {}), 2) is Verdict.RUN_ALONE
    assert _queued_fetches(idle_broker) == []
    assert actors.after_worker_death(actors.collect.message(parcel, [], {}), 3) is Verdict.HANDLED
    reasons = {doc["line"]: doc["reason"] for doc in storage.ledger(idle_context.db).find({"run": "d4"})}
    assert reasons == dict.fromkeys((1, 2), "worker crashed while processing it (3 times)")


def test_a_short_run_says_its_length_even_when_comments_follow_its_last_urls(idle_broker, mongo_db):
    import io

    import dramatiq

    from image_crawler.cli import enqueue_lines

    text = "".join(f"http://example.com/{n}.png\n" for n in range(5)) + "# the end\n" * 1_500

    enqueue_lines(io.BytesIO(text.encode()), mongo_db)

    batches = [
        dramatiq.Message.decode(data).args[0]
        for data in idle_broker.client.hvals(queue_keys(ADMIT_QUEUE).messages)
    ]
    assert [(len(batch["lines"]), batch.get("run_lines")) for batch in batches] == [(5, 5)]


def test_a_line_that_cannot_start_goes_again_untried_until_the_limit_then_counts_an_attempt(idle_context):
    from image_crawler import actors

    batch = {"run": "p1", "lines": [[1, "http://example.com/1.png", 1, actors.POSTPONE_LIMIT - 2]]}
    sorting = actors._Sorting(idle_context, batch)
    (job,) = sorting.jobs

    sorting.postpone(job)
    assert sorting.again == [([1, "http://example.com/1.png", 1, actors.POSTPONE_LIMIT - 1], 5_000)]

    batch["lines"][0][3] = actors.POSTPONE_LIMIT - 1
    sorting = actors._Sorting(idle_context, batch)
    sorting.postpone(job)
    ((line, delay),) = sorting.again
    assert line == [1, "http://example.com/1.png", 2] and delay > 0  # one attempt used, backoff

    batch["lines"][0][2] = idle_context.settings.fetch_retries
    sorting = actors._Sorting(idle_context, batch)
    sorting.postpone(job)
    assert sorting.again == [] and [doc["reason"] for doc in sorting.failed] == ["timeout"]


def test_credentials_in_a_url_are_sent_but_never_stored_or_logged(make_pipeline, server, caplog):
    import base64
    import logging

    pipeline = make_pipeline(fetch_retries=0)
    server.add("/private/cat.png", body=png_bytes(30, 20, seed=77))
    server.add("/private/missing.png", status=404)
    authority = f"alice:s3cr%40t@127.0.0.1:{server.port}"
    urls = [f"http://{authority}/private/cat.png", f"http://{authority}/private/missing.png"]
    # An unexpected failure logs its whole message, URLs included.
    caplog.set_level(logging.INFO)
    logging.getLogger("image_crawler.test").warning("fetching %s", urls[0])

    report = pipeline.enqueue_text("\n".join(urls))
    pipeline.wait_for(report.run, 2)

    sent = base64.b64encode(b"alice:s3cr@t").decode()
    assert server.authorizations("/private/cat.png") == [f"Basic {sent}"]  # used for the request
    ledger = {doc["line"]: doc for doc in storage.ledger(pipeline.db).find({"run": report.run})}
    shown = f"http://***@127.0.0.1:{server.port}"
    assert ledger[1]["url"] == f"{shown}/private/cat.png"
    assert ledger[2]["url"] == f"{shown}/private/missing.png"
    assert storage.images(pipeline.db).find_one({})["source_url"] == f"{shown}/private/cat.png"
    everything = repr([*storage.ledger(pipeline.db).find(), *storage.images(pipeline.db).find()])
    assert "s3cr" not in everything and "alice" not in everything
    assert "s3cr" not in caplog.text and "alice" not in caplog.text


def test_a_fetch_in_a_process_shutting_down_goes_again_rather_than_failing_its_lines(idle_context):
    from image_crawler import actors, errors
    from image_crawler.middleware import is_transient

    idle_context.downloads.shutdown()  # as the interpreter does when a worker process exits
    batch = {"run": "s1", "lines": [[1, "http://example.com/1.png", 0]]}

    with pytest.raises(errors.CrawlError) as raised:
        actors.fetch.fn(batch)

    assert is_transient(raised.value)
    assert storage.ledger(idle_context.db).count_documents({"run": "s1"}) == 0
