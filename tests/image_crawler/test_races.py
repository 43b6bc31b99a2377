"""Races forced, not hoped for: two writers of one image, made to meet where it matters.

The commit point of storage is the ``images`` insert (``storage`` docstring): the GridFS file
goes first, and whichever document goes in first decides which job stored the image. A
:class:`CommitGate` holds the first two inserts there until both writers have arrived, so both
have looked, found no image, and written (or found) its PNG before either commits; a held
GridFS write puts the second writer between the first one's chunks and its file document.

On mongomock the gate also lets the held inserts go in one at a time: mongomock looks for a
duplicate ``_id`` and then stores, without a lock, so two threads can both pass the look, where
a server's unique index admits one. Through the mongo shim (``MONGO_URI``) the server decides.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid

import numpy as np
import pymongo
import pytest

from image_crawler import outcomes, storage
from image_crawler.errors import StoreBusy
from image_crawler.storage import ImageRecord
from support.http_server import LocalHttpServer
from support.images import decode_png, expected_gray, png_bytes
from support.services import database_uri
from support.stores import has_image, store_image

MD5 = "0123456789abcdef0123456789abcdef"
#: Bytes for a PNG of three GridFS chunks (255 KiB each), so a half-written file is possible.
PNG = bytes(range(256)) * 2_500


class CommitGate:
    """Holds the first ``parties`` inserts into ``images`` until all of them are there.

    Installed over :func:`storage.images` (every read passes through). ``met`` counts the
    inserts released by the barrier with all parties waiting: each of them was at the commit
    point before any of them committed. Later inserts go straight on.
    """

    def __init__(self, *, serialize: bool, parties: int = 2, timeout: float = 30) -> None:
        self.parties = parties
        self.barrier = threading.Barrier(parties, timeout=timeout)
        self.serialize = serialize
        self.lock = threading.Lock()
        self.commit = threading.Lock()
        self.arrivals: list[str] = []  # the job of each insert, in the order they came
        self.met = 0

    def install(self, monkeypatch) -> None:
        real_images = storage.images
        gate = self

        class Gated:
            def __init__(self, collection) -> None:
                self._collection = collection

            def __getattr__(self, name: str):
                return getattr(self._collection, name)

            def insert_many(self, documents, *args, **kwargs):
                documents = list(documents)
                with gate.lock:
                    arrival = len(gate.arrivals)
                    gate.arrivals.extend(document["job"] for document in documents)
                if arrival < gate.parties:
                    gate.barrier.wait()  # BrokenBarrierError if the other writer never comes
                    with gate.lock:
                        gate.met += 1
                if not gate.serialize:
                    return self._collection.insert_many(documents, *args, **kwargs)
                with gate.commit:
                    return self._collection.insert_many(documents, *args, **kwargs)

        monkeypatch.setattr(storage, "images", lambda db: Gated(real_images(db)))

    def wait_for_arrivals(self, n: int, writer: threading.Thread, timeout: float = 30) -> None:
        """Until ``n`` inserts wait at the barrier (fails if ``writer`` ends first, or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.barrier.n_waiting < n:
            assert writer.is_alive(), "the writer ended before it reached the commit point"
            assert time.monotonic() < deadline, f"{n} writer(s) never reached the commit point"
            time.sleep(0.01)


@pytest.fixture(params=["mongomock", "mongodb wire"])
def any_db(request):
    """A fresh database, in process (mongomock) or through MONGO_URI; and whether the gate must
    serialize commits for it."""
    if request.param == "mongomock":
        db = request.getfixturevalue("mongo_db")
        storage.ensure_indexes(db)
        yield db, True
        return
    uri = request.getfixturevalue("mongo_uri")
    name = f"races_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(database_uri(uri, name), tz_aware=True)
    db = client[name]
    storage.ensure_indexes(db)
    yield db, False
    client.drop_database(name)
    client.close()


def _record(url: str) -> ImageRecord:
    return ImageRecord(md5=MD5, width=64, height=48, source_url=url, content_type="image/png", byte_size=9)


def _thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    """A thread, not started, to run ``target(*args, **kwargs)``; the list gets its result or exception."""
    answer: list = []

    def run() -> None:
        try:
            answer.append(target(*args, **kwargs))
        except BaseException as exc:
            answer.append(exc)

    return threading.Thread(target=run), answer


def _run(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    """:func:`_thread`, started."""
    thread, answer = _thread(target, *args, **kwargs)
    thread.start()
    return thread, answer


def _assert_one_complete_file(db, md5: str, png: bytes) -> None:
    """One GridFS file for ``md5``, its chunks numbered 0…n-1 once each, reading back as ``png``."""
    assert db["gray.files"].count_documents({}) == 1
    file = db["gray.files"].find_one({"_id": md5})
    chunks = sorted(chunk["n"] for chunk in db["gray.chunks"].find({"files_id": md5}, {"n": 1}))
    assert chunks == list(range(math.ceil(file["length"] / file["chunkSize"])))
    assert db["gray.chunks"].count_documents({}) == len(chunks)
    assert storage.gray_files(db).get(md5).read() == png


def test_two_writers_of_one_image_meeting_at_the_commit_point_store_it_once(any_db, monkeypatch):
    db, serialize = any_db
    gate = CommitGate(serialize=serialize)
    gate.install(monkeypatch)

    first, first_stored = _run(store_image, db, _record("http://a.example/cat.png"), PNG, job_id="run:1")
    gate.wait_for_arrivals(1, first)
    # The first writer holds at its commit point: its PNG complete, no document yet.
    assert storage.gray_files(db).exists(MD5) and not has_image(db, MD5)
    second, second_stored = _run(store_image, db, _record("http://b.example/cat.png"), PNG, job_id="run:2")
    first.join(60)
    second.join(60)

    assert gate.met == 2, "the second writer did not reach the commit point while the first waited there"
    assert sorted(gate.arrivals) == ["run:1", "run:2"]
    stored = {"run:1": first_stored[0], "run:2": second_stored[0]}
    assert sorted(stored.values()) == [False, True], stored  # one success, one duplicate
    (winner,) = (job for job, won in stored.items() if won is True)
    assert storage.images(db).count_documents({}) == 1
    document = storage.images(db).find_one({"_id": MD5})
    assert document["job"] == winner
    assert (
        document["source_url"]
        == {"run:1": "http://a.example/cat.png", "run:2": "http://b.example/cat.png"}[winner]
    )
    _assert_one_complete_file(db, MD5, PNG)


def test_a_writer_that_finds_the_png_half_written_backs_off_and_stores_nothing(any_db, monkeypatch):
    db, _ = any_db
    first, first_stored = _thread(store_image, db, _record("http://a.example/cat.png"), PNG, job_id="run:1")
    collection_class = type(db["gray.files"])  # mongomock's or pymongo's
    real_insert_one = collection_class.insert_one
    first_has_chunks, second_tried = threading.Event(), threading.Event()

    def insert_one(collection, document, *args, **kwargs):
        # The file document completes a GridFS file: the first writer's waits for the second's try.
        if collection.name == "gray.files" and threading.current_thread() is first:
            first_has_chunks.set()
            assert second_tried.wait(30), "the second writer never tried"
        return real_insert_one(collection, document, *args, **kwargs)

    monkeypatch.setattr(collection_class, "insert_one", insert_one)
    first.start()
    assert first_has_chunks.wait(30), "the first writer never wrote its chunks"
    written = sorted(chunk["_id"] for chunk in db["gray.chunks"].find({"files_id": MD5}, {"_id": 1}))
    assert len(written) == 3 and not storage.gray_files(db).exists(MD5)

    try:
        with pytest.raises(StoreBusy) as busy:  # its collect goes again later (a transient error)
            store_image(db, _record("http://b.example/cat.png"), PNG, job_id="run:2")
    finally:
        second_tried.set()
        first.join(60)

    assert busy.value.transient
    assert first_stored == [True]
    # The second writer neither cleared nor added chunks, nor wrote a document.
    assert sorted(chunk["_id"] for chunk in db["gray.chunks"].find({"files_id": MD5}, {"_id": 1})) == written
    assert storage.images(db).find_one({"_id": MD5})["job"] == "run:1"
    # Tried again, it finds the image: a duplicate.
    assert store_image(db, _record("http://b.example/cat.png"), PNG, job_id="run:2") is False
    assert storage.images(db).count_documents({}) == 1
    _assert_one_complete_file(db, MD5, PNG)


# --- the same race through the whole pipeline ---------------------------------------------------


@pytest.fixture
def server():
    with LocalHttpServer() as running:
        yield running


def test_two_workers_racing_on_the_same_image_store_it_once(make_pipeline, server, monkeypatch):
    gate = CommitGate(serialize=True)  # mongomock
    gate.install(monkeypatch)
    pipeline = make_pipeline(threads=8)
    make_pipeline(threads=8)  # a second worker on the same broker and database
    body = png_bytes(300, 200, seed=1234)
    for n in range(40):
        server.add(f"/same/{n}.png", body=body)
    report = pipeline.enqueue_text("\n".join(server.url(f"/same/{n}.png") for n in range(40)))
    pipeline.wait_for(report.run, 40)

    # Two collects were at the commit point at once: both had found the image new.
    assert gate.met == 2
    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 1, "duplicate": 39, "error": 0}
    assert storage.images(pipeline.db).count_documents({}) == 1
    digest = hashlib.md5(body).hexdigest()
    (success,) = storage.ledger(pipeline.db).find({"run": report.run, "outcome": "success"})
    assert storage.images(pipeline.db).find_one({"_id": digest})["job"] == success["_id"]
    png = storage.gray_files(pipeline.db).get(digest).read()
    _assert_one_complete_file(pipeline.db, digest, png)
    assert np.array_equal(decode_png(png)[1], expected_gray(body))
