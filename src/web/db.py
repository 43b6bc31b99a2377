"""The app's connections (MongoDB through Flask-PyMongo, Redis) and the reads the views need.

Collections are reached only through :mod:`image_crawler.storage`'s accessors, so this module
never spells a collection name. Every query here is served by an index that
:func:`image_crawler.storage.ensure_indexes` creates, and none grows with the ledger:

* per-minute counts and outcome totals — the per-minute counters (``minute_counts``; the window's
  counters through the ``minute`` index, grouped in MongoDB), never the ledger;
* the latest errors — ``outcome_ended``, ``limit`` of them; the latest minute — ``minute_run_outcome``,
  one key;
* the gallery — ``inserted_at``;
* one image — ``_id``.

The writes: :func:`settle_counters`, which the chart and dashboard views call, recounts the
counters of settled minutes from the ledger now and then (:func:`image_crawler.outcomes.reconcile`);
and reading the runs still going marks those found finished (:func:`image_crawler.outcomes.unfinished_runs`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import gridfs
import redis
from flask import Flask, current_app
from flask_pymongo import PyMongo
from gridfs.grid_file import GridOut
from pymongo import DESCENDING
from pymongo.database import Database

from image_crawler import outcomes, storage
from image_crawler.config import Settings
from image_crawler.redaction import redact_url
from image_crawler.storage import as_utc

_DB = "image_crawler.db"
_REDIS = "image_crawler.redis"
_RECONCILE = "image_crawler.reconcile"


def init_app(app: Flask) -> None:
    """Give ``app`` its MongoDB database and Redis client (neither connects before first use).

    ``MONGO_DATABASE`` in the config, when set, is used as the database as is (tests and
    embedding pass any ready ``Database`` object); otherwise Flask-PyMongo opens
    ``MONGO_URI`` and the database is the URI's path, as for the pipeline.
    """
    timeout = float(app.config["SERVICE_TIMEOUT"])
    database = app.config.get("MONGO_DATABASE")
    if database is None:
        uri = app.config["MONGO_URI"]
        mongo = PyMongo(
            app,
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=int(timeout * 1000),
            appname="image-crawler-web",
        )
        assert mongo.cx is not None
        database = mongo.cx[Settings(mongo_uri=uri).mongo_database]
    app.extensions[_DB] = database
    app.extensions[_RECONCILE] = outcomes.Schedule(outcomes.RECONCILE_EVERY_S)
    app.extensions[_REDIS] = redis.Redis.from_url(
        app.config["REDIS_URL"], socket_connect_timeout=timeout, socket_timeout=timeout
    )


def get_db() -> Database:
    """The current app's MongoDB database."""
    database: Database = current_app.extensions[_DB]
    return database


def get_redis() -> redis.Redis:
    """The current app's Redis client (the pipeline's broker)."""
    client: redis.Redis = current_app.extensions[_REDIS]
    return client


def settle_counters(db: Database) -> None:
    """Recount settled minutes into the counters, at most once every ``RECONCILE_EVERY_S`` per app.

    So a worker that died between an outcome and its counter is made up for within minutes even
    when no worker records any more. A pass that fails is logged and tried again later.
    """
    outcomes.reconcile_if_due(db, current_app.extensions[_RECONCILE])


def count_by_minute(
    db: Database, since: dt.datetime | None = None, *, run: str | None = None
) -> dict[dt.datetime, dict[str, int]]:
    """How many jobs ended in each outcome, per UTC minute from ``since`` (default: ever), of ``run`` or all.

    Read from the per-minute counters in the window (one document per run and minute), grouped
    in MongoDB: the cost follows the minutes and runs shown, not the outcomes they hold.
    """
    return outcomes.counts_per_minute(db, since, run=run)


def outcome_totals(db: Database) -> dict[str, int]:
    """How many jobs ended in each outcome so far, summed from the per-minute counters."""
    return outcomes.counted_totals(db)


def latest_minute(db: Database, until: dt.datetime | None = None) -> dt.datetime | None:
    """The UTC minute of the most recent outcome (at ``until`` or before, if given), or None."""
    query = {} if until is None else {"minute": {"$lte": until}}
    row = storage.outcomes(db).find_one(query, projection={"minute": 1}, sort=[("minute", DESCENDING)])
    minute = None if row is None else row.get("minute")
    return as_utc(minute) if isinstance(minute, dt.datetime) else None


def latest_errors(db: Database, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most recent error outcomes: ``url``, ``reason``, ``ended_at``."""
    cursor = storage.outcomes(db).find(
        {"outcome": outcomes.ERROR},
        projection={"_id": 0, "url": 1, "reason": 1, "ended_at": 1},
        sort=[("ended_at", DESCENDING)],
        limit=limit,
    )
    return [_shown(document, "url") for document in cursor]


def recent_error_reasons(db: Database, since: dt.datetime, limit: int) -> list[str]:
    """The reasons of at most the ``limit`` most recent error outcomes that ended at ``since`` or later."""
    cursor = storage.outcomes(db).find(
        {"outcome": outcomes.ERROR, "ended_at": {"$gte": since}},
        projection={"_id": 0, "reason": 1},
        sort=[("ended_at", DESCENDING)],
        limit=limit,
    )
    return [str(document.get("reason")) for document in cursor]


def count_images(db: Database) -> int:
    """How many distinct images are stored (from collection metadata: no scan)."""
    return storage.images(db).estimated_document_count()


def latest_images(db: Database, *, skip: int, limit: int) -> list[dict[str, Any]]:
    """Image documents, most recently inserted first, ``limit`` of them after ``skip``."""
    cursor = storage.images(db).find(
        {},
        projection={"width": 1, "height": 1, "inserted_at": 1, "source_url": 1},
        sort=[("inserted_at", DESCENDING)],
        skip=skip,
        limit=limit,
    )
    return [_shown(document, "source_url") for document in cursor]


def find_image(db: Database, md5: str) -> dict[str, Any] | None:
    """The ``images`` document of ``md5``, or None."""
    document: dict[str, Any] | None = storage.images(db).find_one({"_id": md5})
    return None if document is None else _shown(document, "source_url")


def _shown(document: dict[str, Any], field: str) -> dict[str, Any]:
    """``document`` with the URL in ``field`` shown without credentials.

    The pipeline stores URLs redacted; this also covers documents stored before it did
    (docs/architecture.md, "Credentials").
    """
    if isinstance(document.get(field), str):
        document[field] = redact_url(document[field])
    return document


def open_gray_png(db: Database, md5: str) -> GridOut | None:
    """The stored grayscale PNG of ``md5`` as a file to stream (chunks are read lazily), or None."""
    try:
        return storage.gray_files(db).get(md5)
    except gridfs.NoFile:
        return None
