"""One image or one outcome at a time: the tests' shorthands over the pipeline's batch writes and reads.

The pipeline stores images and records outcomes a batch at a time (``storage.images_to_store``,
``storage.store_new_images``, ``outcomes.record_outcomes``); a test often wants one, and to read
back one job's ledger entry. These are built on those functions only, so what they do is what
the pipeline does.
"""

from __future__ import annotations

from typing import Any

from pymongo.database import Database

from image_crawler import outcomes, storage
from image_crawler.outcomes import Job


def store_image(db: Database, record: storage.ImageRecord, png: bytes | None, *, job_id: str) -> bool:
    """Store one image once, as ``collect`` does; True when this job stored it, False when another had.

    ``png`` may be None only when the image is already stored. A retry or redelivery of the
    job that first stored the image still answers True.
    """
    first, stored_by = storage.images_to_store(db, [record.md5])
    if not first:
        return stored_by[record.md5] == job_id
    if png is None:
        raise ValueError("the PNG is needed to store a new image")
    return storage.store_new_images(db, [(record, png, job_id)])[record.md5] == job_id


def has_image(db: Database, md5: str) -> bool:
    """Whether an image with this MD5 is stored (its document, so its PNG too)."""
    return storage.images(db).count_documents({"_id": md5}, limit=1) > 0


def record_outcome(
    db: Database, job: Job, outcome: str, *, reason: str | None = None, md5: str | None = None
) -> bool:
    """Record the job's terminal outcome; False if it already had one (which is kept)."""
    document = outcomes.outcome_document(job, outcome, reason=reason, md5=md5)
    return outcomes.record_outcomes(db, [document]) == 1


def get_outcome(db: Database, job_id: str) -> dict[str, Any] | None:
    """The ledger entry of one job, or None while it is still running."""
    entry: dict[str, Any] | None = storage.ledger(db).find_one({"_id": job_id})
    return entry
