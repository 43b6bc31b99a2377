"""MongoDB layout: each distinct image stored once, with its grayscale PNG in GridFS."""

from __future__ import annotations

import datetime as dt
import types

import pymongo
import pytest
from bson import ObjectId
from pymongo.errors import BulkWriteError, OperationFailure

from image_crawler import storage
from image_crawler.config import Settings
from image_crawler.errors import StoreBusy
from image_crawler.storage import ImageRecord
from support.stores import has_image, store_image

MD5 = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
PNG = b"\x89PNG\r\n\x1a\n grayscale pixels"


@pytest.fixture
def db(mongo_db):
    storage.ensure_indexes(mongo_db)
    return mongo_db


def _record(md5: str = MD5, url: str = "http://example.com/cat.png") -> ImageRecord:
    return ImageRecord(md5=md5, width=64, height=48, source_url=url, content_type="image/png", byte_size=1234)


def _orphan_chunk(db, md5: str, age: dt.timedelta, n: int = 0) -> None:
    """A chunk as a writer that died before its file document would have left it."""
    written = dt.datetime.now(dt.UTC) - age
    chunk = {"_id": ObjectId.from_datetime(written), "files_id": md5, "n": n, "data": b"half a png"}
    db[f"{storage.GRAY_BUCKET}.chunks"].insert_one(chunk)


def test_ensure_indexes_can_run_any_number_of_times(db):
    def all_indexes():
        names = [
            storage.IMAGES_COLLECTION,
            storage.OUTCOMES_COLLECTION,
            storage.MINUTE_COUNTS_COLLECTION,
            storage.RUNS_COLLECTION,
            "gray.files",
        ]
        names.append("gray.chunks")
        return {name: db[name].index_information() for name in names}

    before = all_indexes()
    storage.ensure_indexes(db)
    storage.ensure_indexes(db)

    assert all_indexes() == before

    def leading_fields(collection):
        return {index["key"][0][0] for index in before[collection].values()}

    assert "inserted_at" in leading_fields(storage.IMAGES_COLLECTION)  # the gallery: newest images first
    assert {"run", "minute"} <= leading_fields(
        storage.OUTCOMES_COLLECTION
    )  # enqueue --wait, recounting minutes
    assert {"run", "minute"} <= leading_fields(storage.MINUTE_COUNTS_COLLECTION)  # runs, the histogram
    assert "started_at" in leading_fields(storage.RUNS_COLLECTION)  # image-crawler runs: newest first
    chunks = [index for index in before["gray.chunks"].values() if index.get("unique")]
    assert [[field for field, _ in index["key"]] for index in chunks] == [["files_id", "n"]]


def test_indexes_an_earlier_version_made_are_replaced_by_the_ones_that_cover_them(mongo_db):
    import pymongo

    ledger = storage.ledger(mongo_db)
    ledger.create_index([("run", pymongo.ASCENDING), ("outcome", pymongo.ASCENDING)], name="run_outcome")
    ledger.create_index(
        [("minute", pymongo.ASCENDING), ("outcome", pymongo.ASCENDING)], name="minute_outcome"
    )
    ledger.create_index(
        [("minute", pymongo.ASCENDING), ("run", pymongo.ASCENDING), ("outcome", pymongo.ASCENDING)],
        name="minute_run_outcome",
    )

    storage.ensure_indexes(mongo_db)
    storage.ensure_indexes(mongo_db)

    keys = {name: [field for field, _ in index["key"]] for name, index in ledger.index_information().items()}
    assert not {"run_outcome", "minute_outcome", "minute_run_outcome"} & set(keys)
    assert ["run", "outcome", "line"] in keys.values()  # image-crawler failed: a run's errors in line order
    # Recounting a minute, its outcomes and its error reasons, from the index alone.
    assert ["minute", "run", "outcome", "reason"] in keys.values()


def test_the_first_job_stores_the_image(db):
    assert store_image(db, _record(), PNG, job_id="run:1") is True

    document = storage.images(db).find_one({"_id": MD5})
    assert document["width"] == 64
    assert document["height"] == 48
    assert document["source_url"] == "http://example.com/cat.png"
    assert document["content_type"] == "image/png"
    assert document["byte_size"] == 1234
    assert document["gray_size"] == len(PNG)
    assert document["job"] == "run:1"
    assert document["inserted_at"].tzinfo is not None
    assert abs(document["inserted_at"] - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
    assert has_image(db, MD5)


def test_another_job_with_the_same_md5_is_a_duplicate_and_stores_nothing(db):
    store_image(db, _record(), PNG, job_id="run:1")

    other = _record(url="http://mirror.example.com/cat.png")
    assert store_image(db, other, b"another png", job_id="run:2") is False
    assert store_image(db, other, None, job_id="run:3") is False

    assert storage.images(db).count_documents({}) == 1
    assert storage.images(db).find_one({"_id": MD5})["source_url"] == "http://example.com/cat.png"
    assert db["gray.files"].count_documents({}) == 1
    assert storage.gray_files(db).get(MD5).read() == PNG


def test_a_retry_of_the_job_that_stored_the_image_still_succeeds(db):
    assert store_image(db, _record(), PNG, job_id="run:1") is True
    assert store_image(db, _record(), PNG, job_id="run:2") is False

    assert store_image(db, _record(), PNG, job_id="run:1") is True
    assert store_image(db, _record(), None, job_id="run:1") is True
    assert storage.images(db).count_documents({}) == 1
    assert db["gray.files"].count_documents({}) == 1


def test_the_gray_file_is_named_by_md5_and_typed_png(db):
    store_image(db, _record(), PNG, job_id="run:1")

    stored = storage.gray_files(db).get(MD5)
    assert stored._id == MD5
    assert stored.filename == f"{MD5}.png"
    assert db["gray.files"].find_one({"_id": MD5})["contentType"] == "image/png"
    assert stored.read() == PNG


def test_a_png_over_one_chunk_is_stored_whole(db):
    big = bytes(range(256)) * 3000  # 768 kB: several GridFS chunks

    storage.store_gray_png(db, MD5, big)

    assert db["gray.chunks"].count_documents({"files_id": MD5}) > 1
    assert storage.gray_files(db).get(MD5).read() == big


def test_store_gray_png_skips_a_complete_file(db):
    storage.store_gray_png(db, MD5, PNG)
    storage.store_gray_png(db, MD5, b"a different encoding of the same pixels")

    assert db["gray.files"].count_documents({}) == 1
    assert db["gray.chunks"].count_documents({"files_id": MD5}) == 1
    assert storage.gray_files(db).get(MD5).read() == PNG


def test_old_orphan_chunks_of_a_dead_writer_are_cleared_and_the_file_rewritten(db):
    _orphan_chunk(db, MD5, storage.ORPHAN_CHUNK_AGE + dt.timedelta(seconds=30))

    storage.store_gray_png(db, MD5, PNG)

    assert storage.gray_files(db).get(MD5).read() == PNG
    chunks = list(db["gray.chunks"].find({"files_id": MD5}))
    assert [chunk["data"] for chunk in chunks] == [PNG]


def test_old_orphan_chunks_do_not_block_store_image(db):
    _orphan_chunk(db, MD5, dt.timedelta(hours=1))

    assert store_image(db, _record(), PNG, job_id="run:1") is True
    assert storage.gray_files(db).get(MD5).read() == PNG


def test_fresh_chunks_without_a_file_mean_another_writer_is_busy(db):
    _orphan_chunk(db, MD5, dt.timedelta(seconds=5))

    with pytest.raises(StoreBusy) as caught:
        storage.store_gray_png(db, MD5, PNG)

    assert caught.value.transient is True
    assert db["gray.chunks"].find_one({"files_id": MD5})["data"] == b"half a png"
    assert not storage.gray_files(db).exists(MD5)


def test_a_busy_gray_file_leaves_no_image_document(db):
    _orphan_chunk(db, MD5, dt.timedelta(seconds=5))

    with pytest.raises(StoreBusy):
        store_image(db, _record(), PNG, job_id="run:1")

    assert not has_image(db, MD5)


def test_the_newest_orphan_chunk_decides_whether_the_writer_is_alive(db):
    _orphan_chunk(db, MD5, dt.timedelta(hours=1), n=0)
    _orphan_chunk(db, MD5, dt.timedelta(seconds=5), n=1)

    with pytest.raises(StoreBusy):
        storage.store_gray_png(db, MD5, PNG)


def test_utcnow_is_aware_and_at_millisecond_precision():
    now = storage.utcnow()

    assert now.tzinfo is dt.UTC
    assert now.microsecond % 1000 == 0


# --- the layout's rules one by one (indexes, clients, writer races, readers) -----------


# --- indexes ------------------------------------------------------------------------------

UP, DOWN = pymongo.ASCENDING, pymongo.DESCENDING

#: Every index the pipeline and the web app read through, by collection: name, keys, unique.
INDEXES = {
    storage.IMAGES_COLLECTION: {"inserted_at": ([("inserted_at", DOWN)], False)},
    storage.OUTCOMES_COLLECTION: {
        "run_outcome_line": ([("run", UP), ("outcome", UP), ("line", UP)], False),
        "minute_run_outcome_reason": ([("minute", UP), ("run", UP), ("outcome", UP), ("reason", UP)], False),
        "outcome_ended": ([("outcome", UP), ("ended_at", DOWN)], False),
    },
    storage.MINUTE_COUNTS_COLLECTION: {
        "minute": ([("minute", UP)], False),
        "run_minute": ([("run", UP), ("minute", UP)], False),
    },
    storage.REASON_COUNTS_COLLECTION: {
        "minute": ([("minute", UP)], False),
        "run_minute": ([("run", UP), ("minute", UP)], False),
    },
    storage.RUNS_COLLECTION: {
        "started_at": ([("started_at", DOWN)], False),
        "finished_at": ([("finished_at", UP)], False),
        "retry_of": ([("retry_of", UP)], False),
    },
    f"{storage.GRAY_BUCKET}.chunks": {"files_id_1_n_1": ([("files_id", UP), ("n", UP)], True)},
    f"{storage.GRAY_BUCKET}.files": {
        "filename_1_uploadDate_1": ([("filename", UP), ("uploadDate", UP)], False)
    },
}


def _made(db, collection: str) -> dict[str, tuple[list[tuple[str, int]], bool]]:
    """The indexes of ``collection`` but ``_id_``: name -> (keys, unique)."""
    return {
        name: ([(field, int(direction)) for field, direction in index["key"]], bool(index.get("unique")))
        for name, index in db[collection].index_information().items()
        if name != "_id_"
    }


def test_every_index_is_made_with_its_name_keys_and_directions(db):
    for collection, expected in INDEXES.items():
        assert _made(db, collection) == expected, collection


def test_an_index_another_process_dropped_first_is_no_error(mongo_db, monkeypatch: pytest.MonkeyPatch):
    ledger = storage.ledger(mongo_db)
    ledger.create_index([("run", UP), ("outcome", UP)], name="run_outcome")  # superseded
    real_drop = type(ledger).drop_index
    asked = []

    def dropped_meanwhile(self, name):
        asked.append(name)
        real_drop(self, name)  # another process gets there first, and ours finds nothing to drop
        raise OperationFailure(f"index not found with name [{name}]", code=27)

    monkeypatch.setattr(type(ledger), "drop_index", dropped_meanwhile)
    storage.ensure_indexes(mongo_db)

    assert asked == ["run_outcome"]
    # The superseded index is gone, and every index made after the failed drop exists too.
    for collection, expected in INDEXES.items():
        assert _made(mongo_db, collection) == expected, collection


# --- clients ------------------------------------------------------------------------------


def test_a_client_waits_for_a_server_as_long_as_asked_and_connects_within_half_of_it():
    db = storage.connect(Settings(mongo_uri="mongodb://db.invalid:27017/crawl"), timeout_s=4)
    try:
        options = db.client.options
        assert db.name == "crawl"
        assert set(db.client.topology_description.server_descriptions()) == {("db.invalid", 27017)}
        assert options.server_selection_timeout == 4.0
        assert options.pool_options.connect_timeout == 2.0
        assert options.pool_options.metadata["application"]["name"] == "image-crawler"
        assert options.codec_options.tz_aware is True
    finally:
        db.client.close()


def test_the_default_wait_for_a_server_is_ten_seconds():
    db = storage.connect(Settings(mongo_uri="mongodb://db.invalid:27017/crawl"))
    try:
        assert db.client.options.server_selection_timeout == 10.0
        assert db.client.options.pool_options.connect_timeout == 5.0
    finally:
        db.client.close()


def test_a_process_has_one_database_handle_per_settings():
    settings = Settings(mongo_uri="mongodb://db.invalid:27017/once")
    first = storage.get_database(settings)
    assert first.name == "once"
    assert storage.get_database(settings) is first


# --- time ---------------------------------------------------------------------------------


def test_utcnow_drops_what_mongodb_cannot_keep(monkeypatch: pytest.MonkeyPatch):
    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 5, 4, 3, 2, 1, 5_001, tzinfo=tz)

    monkeypatch.setattr(storage, "dt", types.SimpleNamespace(datetime=Clock, UTC=dt.UTC))
    assert storage.utcnow() == dt.datetime(2026, 5, 4, 3, 2, 1, 5_000, tzinfo=dt.UTC)


def test_a_naive_moment_is_taken_as_utc_and_an_aware_one_converted():
    naive = dt.datetime(2026, 5, 4, 3, 2, 1)
    assert storage.as_utc(naive) == naive.replace(tzinfo=dt.UTC)
    assert storage.as_utc(naive).tzinfo is dt.UTC
    paris = dt.timezone(dt.timedelta(hours=2))
    converted = storage.as_utc(dt.datetime(2026, 5, 4, 5, 2, 1, tzinfo=paris))
    assert converted == naive.replace(tzinfo=dt.UTC)
    assert converted.tzinfo is dt.UTC


# --- writers racing for one image ---------------------------------------------------------


def test_an_image_another_job_stored_meanwhile_is_its_and_the_rest_of_the_batch_is_stored(db):
    # The other job inserted its document between our check and our insert.
    storage.images(db).insert_one({"_id": MD5, "job": "run:9"})

    winners = storage.store_new_images(db, [(_record(MD5), PNG, "run:1"), (_record(OTHER), PNG, "run:2")])

    assert winners == {MD5: "run:9", OTHER: "run:2"}
    assert storage.images(db).find_one({"_id": MD5})["job"] == "run:9"
    assert storage.images(db).find_one({"_id": OTHER})["job"] == "run:2"


def test_an_insert_that_fails_for_another_reason_than_a_race_is_raised(db, monkeypatch: pytest.MonkeyPatch):
    refused = BulkWriteError({"writeErrors": [{"index": 0, "code": 121, "errmsg": "validation failed"}]})

    class Refusing:
        """The images collection, refusing every insert for a reason of its own."""

        def __init__(self, collection):
            self._collection = collection

        def insert_many(self, documents, **options):
            raise refused

        def __getattr__(self, name):
            return getattr(self._collection, name)

    real = storage.images
    monkeypatch.setattr(storage, "images", lambda database: Refusing(real(database)))
    with pytest.raises(BulkWriteError):
        storage.store_new_images(db, [(_record(), PNG, "run:1")])


def test_nothing_to_store_stores_nothing(db):
    assert storage.store_new_images(db, []) == {}
    assert storage.image_jobs(db, []) == {}


def test_of_a_batch_the_first_job_of_each_md5_not_stored_stores_it_and_the_others_find_it(db):
    store_image(db, _record(MD5), PNG, job_id="run:1")
    batch = [MD5, OTHER, OTHER, MD5]  # the digests of run:2, run:3, run:4 and run:5

    first, stored_by = storage.images_to_store(db, batch)

    assert first == [1]  # run:3 stores OTHER; run:4 will find it stored, as run:2 and run:5 find MD5
    assert stored_by == {MD5: "run:1"}
    assert storage.images_to_store(db, []) == ([], {})


def test_image_jobs_answers_for_the_md5s_asked_only(db):
    store_image(db, _record(MD5), PNG, job_id="run:1")
    store_image(db, _record(OTHER), PNG, job_id="run:2")

    assert storage.image_jobs(db, [MD5, MD5, "0" * 32]) == {MD5: "run:1"}


def test_a_png_rewritten_over_a_dead_writers_chunks_is_named_and_typed(db):
    old = dt.datetime.now(dt.UTC) - storage.ORPHAN_CHUNK_AGE - dt.timedelta(minutes=1)
    chunk = {"_id": ObjectId.from_datetime(old), "files_id": MD5, "n": 0, "data": b"half a png"}
    db[f"{storage.GRAY_BUCKET}.chunks"].insert_one(chunk)

    storage.store_gray_png(db, MD5, PNG)

    stored = db[f"{storage.GRAY_BUCKET}.files"].find_one({"_id": MD5})
    assert (stored["filename"], stored["contentType"]) == (f"{MD5}.png", "image/png")
    assert storage.open_gray_png(db, MD5).read() == PNG


def test_another_images_fresh_file_does_not_make_a_dead_writers_chunks_look_alive(db):
    storage.store_gray_png(db, OTHER, b"written just now")
    old = dt.datetime.now(dt.UTC) - storage.ORPHAN_CHUNK_AGE - dt.timedelta(minutes=1)
    chunk = {"_id": ObjectId.from_datetime(old), "files_id": MD5, "n": 0, "data": b"half a png"}
    db[f"{storage.GRAY_BUCKET}.chunks"].insert_one(chunk)

    storage.store_gray_png(db, MD5, PNG)

    assert storage.open_gray_png(db, MD5).read() == PNG
    assert storage.open_gray_png(db, OTHER).read() == b"written just now"


def test_the_busy_error_says_another_worker_writes_the_file(db):
    fresh = {"_id": ObjectId(), "files_id": MD5, "n": 0, "data": b"being written"}
    db[f"{storage.GRAY_BUCKET}.chunks"].insert_one(fresh)

    with pytest.raises(storage.StoreBusy) as caught:
        storage.store_gray_png(db, MD5, PNG)
    assert caught.value.reason == "grayscale file being written by another worker"


# --- reads of the web app -----------------------------------------------------------------


def _stored(db, md5: str, url: str, at: dt.datetime) -> None:
    """An image document as an earlier version may have left it (its URL not yet redacted)."""
    storage.images(db).insert_one(
        {
            "_id": md5,
            "width": 4,
            "height": 3,
            "inserted_at": at,
            "source_url": url,
            "job": "run:1",
            "byte_size": 9,
        }
    )


def test_the_gallery_reads_newest_first_a_page_at_a_time_without_credentials(db):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for n in range(5):
        _stored(db, f"{n:032x}", f"http://user:pw@example.com/{n}.png", start + dt.timedelta(minutes=n))

    page = storage.latest_images(db, skip=1, limit=2)

    assert [document["_id"] for document in page] == [f"{3:032x}", f"{2:032x}"]
    assert page[0] == {
        "_id": f"{3:032x}",
        "width": 4,
        "height": 3,
        "inserted_at": start + dt.timedelta(minutes=3),
        "source_url": "http://***@example.com/3.png",
    }
    assert storage.count_images(db) == 5


def test_one_image_is_read_without_credentials_and_a_missing_one_is_none(db):
    _stored(db, MD5, "http://user:pw@example.com/cat.png", dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    found = storage.find_image(db, MD5)

    assert found is not None and found["source_url"] == "http://***@example.com/cat.png"
    assert found["job"] == "run:1"
    assert storage.find_image(db, OTHER) is None
    assert has_image(db, MD5) and not has_image(db, OTHER)


def test_a_stored_png_is_opened_and_a_missing_one_is_none(db):
    storage.store_gray_png(db, MD5, PNG)

    assert storage.open_gray_png(db, MD5).read() == PNG
    assert storage.open_gray_png(db, OTHER) is None
