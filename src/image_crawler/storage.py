"""MongoDB layout: the only module that knows collection and bucket names.

* ``images``   — one document per distinct image, ``_id`` = MD5 hex of the downloaded bytes.
* ``gray``     — GridFS bucket with the grayscale PNGs, file ``_id`` = the same MD5.
* ``outcomes`` — the job ledger (see :mod:`image_crawler.outcomes`), ``_id`` = job id.
* ``minute_counts`` — one document per run and UTC minute, ``run``, ``minute``, ``success``,
  ``duplicate``, ``error``: the ledger counted as it is written, and recounted from it once a
  minute has settled (:func:`image_crawler.outcomes.reconcile`). Charts and totals read these.
* ``reason_counts`` — one document per run, UTC minute and counted error reason
  (:func:`image_crawler.outcomes.counted_reason`), ``_id`` = ``{minute, run, reason}``, ``n``:
  the errors counted by reason, kept and recounted as ``minute_counts`` is.
* ``reconciled`` — one document, ``_id`` = ``minute_counts``, ``through``: every minute before
  it has been recounted from the ledger (both counter collections).
* ``runs``     — one document per ``enqueue``, ``_id`` = run id: ``started_at``, ``retry_of``
  (the run it retries, or None), ``jobs`` (lines sent so far, each gets one outcome),
  ``enqueued``, ``rejected``, ``skipped``, ``updated_at`` (its last progress), ``sent_at`` once
  the whole file was read (just before its last batch is sent), ``interrupted_at`` if
  ``enqueue`` stopped before it sent everything, ``finished_at`` once a reader saw it finished.

The GridFS file is written before the ``images`` document, so a document always
points at a complete PNG; the document insert is the commit point that decides
which job stored an image first (success) and which found it already there (duplicate).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import gridfs
import pymongo
from bson import ObjectId
from gridfs.errors import FileExists
from gridfs.grid_file import GridOut
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

from .config import Settings
from .errors import StoreBusy
from .redaction import redact_url, redact_url_field

IMAGES_COLLECTION = "images"
OUTCOMES_COLLECTION = "outcomes"
MINUTE_COUNTS_COLLECTION = "minute_counts"
REASON_COUNTS_COLLECTION = "reason_counts"
RECONCILED_COLLECTION = "reconciled"
RUNS_COLLECTION = "runs"
GRAY_BUCKET = "gray"

#: A writer finishes a GridFS file within seconds; chunks without a file document that are
#: older than this were left by a worker that died mid-write and may be cleared.
ORPHAN_CHUNK_AGE = dt.timedelta(seconds=120)


def utcnow() -> dt.datetime:
    """The current time, UTC, at MongoDB's millisecond precision."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(moment: dt.datetime) -> dt.datetime:
    """``moment`` in UTC; a naive datetime (a client without ``tz_aware``) is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def minute_of(moment: dt.datetime) -> dt.datetime:
    """The UTC minute ``moment`` falls in (outcomes are counted and charted per minute)."""
    return as_utc(moment).replace(second=0, microsecond=0)


def this_minute() -> dt.datetime:
    """The current UTC minute."""
    return minute_of(utcnow())


def connect(settings: Settings, *, timeout_s: float = 10.0) -> Database:
    """A database handle for ``MONGO_URI`` (one client, and so one pool, per call).

    An operation waits at most ``timeout_s`` for a server to answer (connecting takes at most
    half of it, so that a server that never answers is reported as such).
    """
    timeout_ms = int(timeout_s * 1000)
    client: pymongo.MongoClient = pymongo.MongoClient(
        settings.mongo_uri,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms // 2,
        appname="image-crawler",
    )
    return client[settings.mongo_database]


@cache
def _connect_once(settings: Settings) -> Database:
    return connect(settings)


def get_database(settings: Settings) -> Database:
    """The process-wide database handle for these settings."""
    return _connect_once(settings)


def images(db: Database) -> Collection:
    """The ``images`` collection."""
    return db[IMAGES_COLLECTION]


def ledger(db: Database) -> Collection:
    """The ``outcomes`` collection: the job ledger (:mod:`image_crawler.outcomes` reads and writes it)."""
    return db[OUTCOMES_COLLECTION]


def minute_counts(db: Database) -> Collection:
    """The ``minute_counts`` collection (outcomes per run and minute)."""
    return db[MINUTE_COUNTS_COLLECTION]


def reason_counts(db: Database) -> Collection:
    """The ``reason_counts`` collection (errors per run, minute and reason)."""
    return db[REASON_COUNTS_COLLECTION]


def reconciled(db: Database) -> Collection:
    """The ``reconciled`` collection (how far the counters have been recounted)."""
    return db[RECONCILED_COLLECTION]


def runs(db: Database) -> Collection:
    """The ``runs`` collection (one document per ``enqueue``)."""
    return db[RUNS_COLLECTION]


def gray_files(db: Database) -> gridfs.GridFS:
    """The GridFS bucket holding grayscale PNGs."""
    return gridfs.GridFS(db, collection=GRAY_BUCKET)


def ensure_indexes(db: Database) -> None:
    """Create every index the pipeline and the web app rely on; safe to call any number of times."""
    images(db).create_index([("inserted_at", pymongo.DESCENDING)], name="inserted_at")
    outcome_ledger = ledger(db)
    # A run's outcomes (enqueue --wait counts them) and its errors in line order (image-crawler failed).
    outcome_ledger.create_index(
        [("run", pymongo.ASCENDING), ("outcome", pymongo.ASCENDING), ("line", pymongo.ASCENDING)],
        name="run_outcome_line",
    )
    # Recounting a minute: $match on minute, $group on run, outcome and reason, from the index alone.
    outcome_ledger.create_index(
        [
            ("minute", pymongo.ASCENDING),
            ("run", pymongo.ASCENDING),
            ("outcome", pymongo.ASCENDING),
            ("reason", pymongo.ASCENDING),
        ],
        name="minute_run_outcome_reason",
    )
    outcome_ledger.create_index(
        [("outcome", pymongo.ASCENDING), ("ended_at", pymongo.DESCENDING)], name="outcome_ended"
    )
    # Prefixes of the two above.
    _drop_superseded(outcome_ledger, "run_outcome", "minute_outcome", "minute_run_outcome")
    counts = minute_counts(db)
    counts.create_index([("minute", pymongo.ASCENDING)], name="minute")  # the histogram's window
    counts.create_index([("run", pymongo.ASCENDING), ("minute", pymongo.ASCENDING)], name="run_minute")
    reasons = reason_counts(db)
    reasons.create_index([("minute", pymongo.ASCENDING)], name="minute")
    reasons.create_index([("run", pymongo.ASCENDING), ("minute", pymongo.ASCENDING)], name="run_minute")
    runs(db).create_index([("started_at", pymongo.DESCENDING)], name="started_at")
    runs(db).create_index([("finished_at", pymongo.ASCENDING)], name="finished_at")  # runs still going
    runs(db).create_index([("retry_of", pymongo.ASCENDING)], name="retry_of")
    # GridFS creates these lazily on the first write of an empty bucket; racing writers need the
    # unique chunk index to exist before either starts, so it is made here.
    db[f"{GRAY_BUCKET}.chunks"].create_index(
        [("files_id", pymongo.ASCENDING), ("n", pymongo.ASCENDING)], unique=True, name="files_id_1_n_1"
    )
    db[f"{GRAY_BUCKET}.files"].create_index(
        [("filename", pymongo.ASCENDING), ("uploadDate", pymongo.ASCENDING)], name="filename_1_uploadDate_1"
    )


def _drop_superseded(collection: Collection, *names: str) -> None:
    """Drop indexes an earlier version created that another index now covers."""
    present = collection.index_information()
    for name in names:
        if name in present:
            # Another process may be dropping it at the same moment.
            with contextlib.suppress(OperationFailure):
                collection.drop_index(name)


@dataclass(frozen=True)
class ImageRecord:
    """What is stored about one distinct image besides its PNG."""

    md5: str
    width: int
    height: int
    source_url: str
    content_type: str | None
    byte_size: int


def store_gray_png(db: Database, md5: str, png: bytes) -> None:
    """Write the grayscale PNG to GridFS under ``_id = md5`` unless it is already complete there.

    Raises :class:`StoreBusy` while another worker is writing the same file.
    """
    files = gray_files(db)
    try:
        # No existence check first: callers come here for images not stored yet, and a file
        # that is there already makes put() fail on its first chunk, before writing anything.
        files.put(png, _id=md5, filename=f"{md5}.png", contentType="image/png")
        return
    except FileExists:
        if files.exists(md5):
            return
    # Chunks but no file document: someone is writing it now, or died while writing it.
    if not _clear_orphan_chunks(db, md5):
        raise StoreBusy("grayscale file being written by another worker")
    files.put(png, _id=md5, filename=f"{md5}.png", contentType="image/png")


def _clear_orphan_chunks(db: Database, md5: str) -> bool:
    chunks = db[f"{GRAY_BUCKET}.chunks"]
    newest = chunks.find_one({"files_id": md5}, projection={"_id": 1}, sort=[("_id", pymongo.DESCENDING)])
    if newest is None:
        return True
    chunk_id = newest["_id"]
    if isinstance(chunk_id, ObjectId) and utcnow() - chunk_id.generation_time < ORPHAN_CHUNK_AGE:
        return False
    chunks.delete_many({"files_id": md5})
    return True


def image_jobs(db: Database, md5s: Iterable[str]) -> dict[str, str | None]:
    """For each of ``md5s`` already stored, the job that stored it (one query)."""
    wanted = sorted(set(md5s))
    if not wanted:
        return {}
    found = images(db).find({"_id": {"$in": wanted}}, projection={"job": 1})
    return {document["_id"]: document.get("job") for document in found}


def images_to_store(db: Database, md5s: Sequence[str]) -> tuple[list[int], dict[str, str | None]]:
    """Which of a batch's images to store: ``md5s`` are the batch's digests, in order.

    Returns the indexes into ``md5s`` that store an image, the first of each MD5 not stored yet
    (in order), and, for every MD5 already stored, the job that stored it (one query). Once
    :func:`store_new_images` has stored the first ones, its answer completes the second.
    """
    stored_by = image_jobs(db, list(md5s))
    first: dict[str, int] = {}
    for index, md5 in enumerate(md5s):
        if md5 not in stored_by:
            first.setdefault(md5, index)
    return list(first.values()), stored_by


def _image_document(record: ImageRecord, png: bytes, job_id: str) -> dict:
    return {
        "_id": record.md5,
        "width": record.width,
        "height": record.height,
        "inserted_at": utcnow(),
        "source_url": redact_url(record.source_url),
        "content_type": record.content_type,
        "byte_size": record.byte_size,
        "gray_size": len(png),
        "job": job_id,
    }


def store_new_images(db: Database, new: Sequence[tuple[ImageRecord, bytes, str]]) -> dict[str, str | None]:
    """Store images not stored yet, given as ``(record, png, job id)`` with distinct MD5s.

    Each PNG goes to GridFS first, then all documents in one unordered ``insert_many``: a
    document always points at a complete PNG, and its insert is the commit point. Returns,
    for every MD5, the job that stored it: the given job, or another that won a race.
    """
    if not new:
        return {}
    for record, png, _ in new:
        store_gray_png(db, record.md5, png)
    documents = [_image_document(record, png, job_id) for record, png, job_id in new]
    winners: dict[str, str | None] = {record.md5: job_id for record, _, job_id in new}
    try:
        images(db).insert_many(documents, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != 11000 for error in errors):
            raise
        raced = [documents[error["index"]]["_id"] for error in errors]
        winners.update(image_jobs(db, raced))
    return winners


# --- reads of the web app ----------------------------------------------------------------


def count_images(db: Database) -> int:
    """How many distinct images are stored (from collection metadata: no scan)."""
    return images(db).estimated_document_count()


def latest_images(db: Database, *, skip: int, limit: int) -> list[dict[str, Any]]:
    """Image documents, newest first (index ``inserted_at``), ``limit`` of them after ``skip``."""
    cursor = images(db).find(
        {},
        projection={"width": 1, "height": 1, "inserted_at": 1, "source_url": 1},
        sort=[("inserted_at", pymongo.DESCENDING)],
        skip=skip,
        limit=limit,
    )
    return [redact_url_field(document, "source_url") for document in cursor]


def find_image(db: Database, md5: str) -> dict[str, Any] | None:
    """The ``images`` document of ``md5``, or None."""
    document: dict[str, Any] | None = images(db).find_one({"_id": md5})
    return None if document is None else redact_url_field(document, "source_url")


def open_gray_png(db: Database, md5: str) -> GridOut | None:
    """The stored grayscale PNG of ``md5`` as a file to stream (chunks are read lazily), or None."""
    try:
        return gray_files(db).get(md5)
    except gridfs.NoFile:
        return None
