"""The app's connections: MongoDB through Flask-PyMongo, and Redis (the pipeline's broker).

The views read through :mod:`image_crawler.outcomes` (the ledger, its counters, the runs) and
:mod:`image_crawler.storage` (the images), whose reads are each served by an index that
:func:`image_crawler.storage.ensure_indexes` creates and none of which grows with the ledger
(the outcome counts come from the per-minute counters, never the ledger).

The writes: :func:`settle_counters`, which the pages call, recounts the counters of settled
minutes from the ledger now and then (:func:`image_crawler.outcomes.reconcile`); and reading the
runs still going marks those found finished (:func:`image_crawler.outcomes.unfinished_runs`).
"""

from __future__ import annotations

import redis
from flask import Flask, current_app
from flask_pymongo import PyMongo
from pymongo.database import Database

from image_crawler import outcomes
from image_crawler.config import database_name

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
        database = mongo.cx[database_name(uri)]
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
