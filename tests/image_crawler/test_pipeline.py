"""The whole pipeline in one process: real Redis, a real dramatiq.Worker, mongomock for MongoDB."""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from image_crawler import outcomes, storage
from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE
from image_crawler.dramatiq_internals import queue_keys
from support.http_server import Response
from support.images import decode_png, encode, expected_gray, photo, png_bytes
from support.stores import get_outcome, record_outcome
from support.waiting import wait_until


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
        monkeypatch.setattr(actors, "_cluster_threads", lambda: threads)
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
    winner = get_outcome(pipeline.db, first["job"])
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


class MongoOutage:
    """A MongoDB outage for the worker threads of an in-process pipeline, and a log of its writes.

    Installed on mongomock's ``Collection``: while the outage lasts, every write of a thread other
    than the test's own (which enqueues and counts) raises what a lost connection raises, and in
    ``"down"`` mode every read too. ``"down"`` begins with the first write of a worker (the first
    collect storing its first PNG: nothing is half written), ``"writes refused"`` at once, so that
    every collect gets as far as storing its images and is refused there.

    Every insert is logged on one clock: when an ``images`` or ``gray.files`` document was in
    (``stored``), and when an outcome was first tried (``tried``, refused or not), so the order of
    what collect wrote can be checked after the fact.
    """

    WRITES = (
        "insert_one",
        "insert_many",
        "update_one",
        "update_many",
        "replace_one",
        "delete_one",
        "delete_many",
        "bulk_write",
        "find_one_and_update",
        "find_one_and_replace",
        "find_one_and_delete",
    )
    READS = ("find", "find_one", "count_documents", "distinct", "aggregate", "estimated_document_count")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.clock = 0
        self.down = mode == "writes refused"
        self.began = self.down
        self.refused_reads: Counter[str] = Counter()
        self.refused_writes: Counter[str] = Counter()
        self.refused_md5s: set[str] = set()  # images whose PNG or document was refused
        self.stored: dict[str, dict[str, int]] = {"images": {}, "gray.files": {}}  # _id -> when it was in
        self.tried: dict[str, int] = {}  # outcome _id -> when it was first tried

    def install(self, monkeypatch) -> None:
        import mongomock

        for name in self.WRITES:
            monkeypatch.setattr(mongomock.Collection, name, self._write(getattr(mongomock.Collection, name)))
        for name in self.READS:
            monkeypatch.setattr(mongomock.Collection, name, self._read(getattr(mongomock.Collection, name)))

    def end(self) -> None:
        with self.lock:
            self.down = False

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    @staticmethod
    def _worker() -> bool:
        return threading.current_thread() is not threading.main_thread()

    def _refuse(self):
        import pymongo.errors

        return pymongo.errors.AutoReconnect("connection refused (injected outage)")

    def _read(self, method):
        def read(collection, *args, **kwargs):
            with self.lock:
                refused = self.down and self.mode == "down" and self._worker()
                if refused:
                    self.refused_reads[collection.name] += 1
            if refused:
                raise self._refuse()
            return method(collection, *args, **kwargs)

        return read

    def _write(self, method):
        from pymongo.errors import BulkWriteError

        def write(collection, *args, **kwargs):
            documents: list[dict] = []
            if method.__name__ == "insert_one":
                documents = [args[0] if args else kwargs["document"]]
            elif method.__name__ == "insert_many":
                documents = list(args[0] if args else kwargs.pop("documents"))
                args = (documents, *args[1:])
            with self.lock:
                if self._worker() and not self.began:
                    self.down = self.began = True  # MongoDB goes away just as this write arrives
                refused = self.down and self._worker()
                if refused:
                    self.refused_writes[collection.name] += 1
                    if collection.name in ("gray.chunks", "gray.files", "images"):
                        key = "files_id" if collection.name == "gray.chunks" else "_id"
                        self.refused_md5s.update(document[key] for document in documents)
                if collection.name == storage.OUTCOMES_COLLECTION:
                    now = self._tick()
                    for document in documents:
                        self.tried.setdefault(document["_id"], now)
            if refused:
                raise self._refuse()
            failed: set[int] = set()  # indexes of the documents that did not go in
            try:
                return method(collection, *args, **kwargs)
            except BulkWriteError as exc:
                failed = {error["index"] for error in exc.details.get("writeErrors", [])}
                raise
            except Exception:
                failed = set(range(len(documents)))
                raise
            finally:
                if collection.name in self.stored:
                    with self.lock:
                        now = self._tick()
                        for index, document in enumerate(documents):
                            if index not in failed:
                                self.stored[collection.name].setdefault(document["_id"], now)

        return write


@pytest.mark.parametrize("mode", ["down", "writes refused"])
def test_a_mongodb_outage_delays_outcomes_but_loses_none_and_none_comes_before_its_image(
    make_pipeline, server, monkeypatch, mode
):
    outage = MongoOutage(mode)
    outage.install(monkeypatch)
    pipeline = make_pipeline()
    bodies = [png_bytes(30, 30, seed=300 + n) for n in range(12)]
    md5s = {hashlib.md5(body).hexdigest() for body in bodies}
    for n, body in enumerate(bodies):
        server.add(f"/{n}.png", body=body)
    report = pipeline.enqueue_text("\n".join(server.url(f"/{n}.png") for n in range(12)))

    if mode == "down":  # from the first PNG write on, until collects were refused their reads too
        wait_until(
            lambda: outage.began and sum(outage.refused_reads.values()) >= 3, "the outage to bite", timeout=30
        )
    else:  # until every image's collect came to store it and was refused
        wait_until(lambda: outage.refused_md5s == md5s, "every image to be refused once", timeout=30)
    # Still down: nothing stored, nothing recorded.
    assert storage.ledger(pipeline.db).count_documents({"run": report.run}) == 0
    assert storage.images(pipeline.db).count_documents({}) == 0
    assert pipeline.db["gray.files"].count_documents({}) == 0
    outage.end()
    pipeline.wait_for(report.run, 12, timeout=90)
    print(
        f"\nMongoDB {mode}: refused writes {dict(outage.refused_writes)}, reads {dict(outage.refused_reads)},"
        f" {len(outage.refused_md5s)} of 12 images refused"
    )

    # The outage refused collects' writes of images (and in "down" mode their reads as well).
    assert outage.refused_writes["gray.chunks"] > 0, outage.refused_writes
    assert outage.refused_md5s <= md5s and outage.refused_md5s
    if mode == "down":
        assert sum(outage.refused_reads.values()) > 0
    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 12, "duplicate": 0, "error": 0}
    ledger = list(storage.ledger(pipeline.db).find({"run": report.run}))
    assert {doc["md5"] for doc in ledger} == set(storage.images(pipeline.db).distinct("_id")) == md5s
    # Invariant 2: each outcome was first tried after its image document was in, and each
    # document went in after its PNG was complete in GridFS.
    files, documents = outage.stored["gray.files"], outage.stored["images"]
    for doc in ledger:
        assert doc["md5"] in documents, (
            f"{doc['_id']} recorded {doc['outcome']}, but its image was never stored"
        )
        assert documents[doc["md5"]] < outage.tried[doc["_id"]], f"{doc['_id']} recorded before its image"
        assert files[doc["md5"]] < documents[doc["md5"]], f"image {doc['md5']} stored before its PNG"


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


def test_a_redelivered_batch_is_admitted_only_once(idle_broker, idle_context, redis_client):
    from image_crawler import actors

    batch = {"run": "r2", "lines": [[n, f"http://example.com/{n}.png"] for n in range(1, 301)]}

    # Read on a connection of its own: not through the broker's client, nor counted in it.
    multis = redis_client.info("commandstats").get("cmdstat_multi", {}).get("calls", 0)
    actors.admit.fn(batch)
    actors.admit.fn(batch)  # the same message again, as after a worker died before its ack

    assert redis_client.info("commandstats")["cmdstat_multi"]["calls"] == multis + 1
    queued = sorted(line[0] for fetch in _queued_fetches(idle_broker) for line in fetch["lines"])
    assert queued == list(range(1, 301))
    assert idle_broker.client.ttl(actors.admitted_key(batch)) > 24 * 3600


@pytest.mark.parametrize("window", ["after its first look", "between WATCH and EXEC"])
def test_a_batch_delivered_twice_at_once_is_admitted_once(idle_broker, idle_context, monkeypatch, window):
    """Two deliveries of one batch, the second admitting it on a connection of its own while the
    first is (a) past its look at the mark but not yet WATCHing it, or (b) WATCHing it, its fetch
    messages queued in MULTI, not yet EXECuted."""
    import redis

    from image_crawler import actors

    run = f"r5-{uuid.uuid4().hex[:8]}"  # admission marks outlive the broker's flush
    batch = {"run": run, "lines": [[n, f"http://example.com/{n}.png"] for n in range(1, 101)]}
    key = actors.admitted_key(batch)
    seen: dict[str, object] = {}

    def second_delivery() -> None:
        # Another worker thread: its own thread-local pipeline, its own connection from the pool.
        worker = threading.Thread(target=actors.admit.fn, args=(batch,))
        worker.start()
        worker.join(30)
        seen["mark after the second"] = bool(idle_broker.client.exists(key))

    if window == "after its first look":
        real_exists = idle_broker.client.exists

        def exists(*keys):
            answer = real_exists(*keys)
            if not seen:
                seen["first looked"] = answer
                second_delivery()
            return answer

        monkeypatch.setattr(idle_broker.client, "exists", exists)
    else:
        real_execute = redis.client.Pipeline.execute

        def execute(pipe, *args, **kwargs):
            if not seen and pipe.transaction and pipe.command_stack:  # the first's MULTI, before EXEC
                seen["first was watching"] = pipe.watching
                seen["first had queued"] = len(pipe.command_stack)
                second_delivery()
            return real_execute(pipe, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", execute)

    try:
        actors.admit.fn(batch)
        raced = None
    except redis.exceptions.WatchError as exc:  # retried as a message (a transient error) …
        raced = exc
        actors.admit.fn(batch)  # … which finds the mark

    # The second delivery ran inside the window, and admitted the batch there.
    assert seen.get("mark after the second") is True, seen
    queued = sorted(line[0] for fetch in _queued_fetches(idle_broker) for line in fetch["lines"])
    assert queued == list(range(1, 101)), (
        "the batch's fetch messages were queued more than once, or not at all"
    )
    assert len(_queued_fetches(idle_broker)) == math.ceil(100 / idle_context.settings.batch_size)
    if window == "between WATCH and EXEC":
        assert seen["first was watching"] and seen["first had queued"] > 1  # its messages and mark
        assert isinstance(raced, redis.exceptions.WatchError)  # its EXEC was refused
    else:
        assert seen["first looked"] == 0 and raced is None  # the look under WATCH saw the mark
    assert idle_broker.client.ttl(key) > 24 * 3600


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
    record_outcome(idle_context.db, outcomes.Job.new("d1", 2, lines[1][1]), outcomes.ERROR, reason="x")
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
    assert get_outcome(idle_context.db, "d2:7") is None
    assert actors.after_worker_death(_delivered(actors.grayscale, single), 3) is Verdict.HANDLED

    entry = get_outcome(idle_context.db, "d2:7")
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


@pytest.mark.parametrize(
    "command",
    ["shares the worker's broker", "has a broker of its own"],
)
def test_a_short_run_is_cut_for_the_worker_threads_there_are_not_for_the_enqueue_command(
    make_pipeline, server, redis_client, monkeypatch, command
):
    from image_crawler import actors
    from image_crawler.broker import create_broker
    from image_crawler.dramatiq_internals import heartbeats_key

    # One worker process of 4 threads; no host limit: a line waiting for its host would be sent
    # again in a fetch message of its own and counted twice below.
    pipeline = make_pipeline(threads=4, host_concurrency=0)
    # Brokers of earlier tests beat for 20 s after their last command; this worker beats again as
    # it fetches the admit message.
    redis_client.delete(heartbeats_key())
    sizes: list[int] = []
    original_fetch = actors.fetch.fn
    monkeypatch.setattr(
        actors.fetch, "fn", lambda batch: sizes.append(len(batch["lines"])) or original_fetch(batch)
    )
    # `image-crawler enqueue` runs in a process of its own, with a broker (a broker id) of its own;
    # sharing the worker's, as in-process tests do, is the control: then it cannot be counted.
    command_broker = create_broker(pipeline.settings) if command == "has a broker of its own" else None
    if command_broker is not None:
        monkeypatch.setattr(actors.admit, "broker", command_broker)
    try:
        report = pipeline.enqueue_text("".join(server.url(f"/gone/{n}.png") + "\n" for n in range(343)))
        pipeline.wait_for(report.run, 343, timeout=120)
    finally:
        if command_broker is not None:
            command_broker.client.close()

    assert report.enqueued == 343
    # 4 threads x BATCHES_PER_THREAD = 16 batches: 22 lines each (counting the command too: 11).
    assert max(sizes) == math.ceil(343 / (4 * actors.BATCHES_PER_THREAD)) == 22
    assert sum(sizes) == 343


def test_the_cluster_count_drops_workers_killed_outright_and_keeps_one_just_booted(
    make_pipeline, redis_client
):
    from image_crawler import actors
    from image_crawler.dramatiq_internals import heartbeats_key
    from image_crawler.middleware import WORKERS_KEY

    make_pipeline(threads=4)  # this process: a worker of 4 threads
    now_ms = int(time.time() * 1000)
    long_ago = now_ms - 10 * 60 * 1000
    redis_client.hset(
        WORKERS_KEY,
        mapping={
            "beating": f"8:{long_ago}",  # another live worker process of 8 threads
            "killed": f"8:{long_ago}",  # booted long ago, beats no more: SIGKILLed
            "booting": f"8:{now_ms}",  # booted a moment ago, has not beaten yet
        },
    )
    redis_client.zadd(heartbeats_key(), {"beating": now_ms})

    assert actors._cluster_threads() == 4 + 8
    assert set(redis_client.hkeys(WORKERS_KEY)) >= {b"beating", b"booting"}
    assert b"killed" not in redis_client.hkeys(WORKERS_KEY)
