"""MongoDB layout: each distinct image stored once, with its grayscale PNG in GridFS."""

from __future__ import annotations

import datetime as dt

import pytest
from bson import ObjectId

from image_crawler import storage
from image_crawler.errors import StoreBusy
from image_crawler.storage import ImageRecord

MD5 = "0123456789abcdef0123456789abcdef"
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
    assert storage.store_image(db, _record(), PNG, job_id="run:1") is True

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
    assert storage.has_image(db, MD5)


def test_another_job_with_the_same_md5_is_a_duplicate_and_stores_nothing(db):
    storage.store_image(db, _record(), PNG, job_id="run:1")

    other = _record(url="http://mirror.example.com/cat.png")
    assert storage.store_image(db, other, b"another png", job_id="run:2") is False
    assert storage.store_image(db, other, None, job_id="run:3") is False

    assert storage.images(db).count_documents({}) == 1
    assert storage.images(db).find_one({"_id": MD5})["source_url"] == "http://example.com/cat.png"
    assert db["gray.files"].count_documents({}) == 1
    assert storage.gray_files(db).get(MD5).read() == PNG


def test_a_retry_of_the_job_that_stored_the_image_still_succeeds(db):
    assert storage.store_image(db, _record(), PNG, job_id="run:1") is True
    assert storage.store_image(db, _record(), PNG, job_id="run:2") is False

    assert storage.store_image(db, _record(), PNG, job_id="run:1") is True
    assert storage.store_image(db, _record(), None, job_id="run:1") is True
    assert storage.images(db).count_documents({}) == 1
    assert db["gray.files"].count_documents({}) == 1


def test_a_new_image_needs_its_png(db):
    with pytest.raises(ValueError, match="PNG is needed"):
        storage.store_image(db, _record(), None, job_id="run:1")

    assert not storage.has_image(db, MD5)


def test_the_gray_file_is_named_by_md5_and_typed_png(db):
    storage.store_image(db, _record(), PNG, job_id="run:1")

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

    assert storage.store_image(db, _record(), PNG, job_id="run:1") is True
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
        storage.store_image(db, _record(), PNG, job_id="run:1")

    assert not storage.has_image(db, MD5)


def test_the_newest_orphan_chunk_decides_whether_the_writer_is_alive(db):
    _orphan_chunk(db, MD5, dt.timedelta(hours=1), n=0)
    _orphan_chunk(db, MD5, dt.timedelta(seconds=5), n=1)

    with pytest.raises(StoreBusy):
        storage.store_gray_png(db, MD5, PNG)


def test_utcnow_is_aware_and_at_millisecond_precision():
    now = storage.utcnow()

    assert now.tzinfo is dt.UTC
    assert now.microsecond % 1000 == 0
