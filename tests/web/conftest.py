"""Fixtures for the web app: the app on mongomock and the suite's Redis, a client, and a data seeder."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from dataclasses import dataclass, field

import pytest
from pymongo.database import Database

from image_crawler import outcomes, storage
from image_crawler.imaging import to_grayscale
from image_crawler.outcomes import Job
from image_crawler.storage import this_minute
from support.images import png_bytes
from support.stores import store_image
from web import create_app


@dataclass
class Seeder:
    """Puts images and outcomes into the database as the pipeline would."""

    db: Database
    #: The minute outcomes are placed relative to (the clock may turn while a test runs).
    now: dt.datetime = field(default_factory=this_minute)
    lines: itertools.count = field(default_factory=lambda: itertools.count(1))

    def image(self, seed: int, *, width: int = 48, height: int = 32, url: str | None = None) -> str:
        """Store a distinct image (PNG in GridFS, then its document); returns its MD5."""
        original = png_bytes(width, height, seed)
        md5 = hashlib.md5(original).hexdigest()
        gray = to_grayscale(original, max_pixels=10**8)
        record = storage.ImageRecord(
            md5=md5,
            width=gray.width,
            height=gray.height,
            source_url=url or f"http://images.test/{seed}.png",
            content_type="image/png",
            byte_size=len(original),
        )
        store_image(self.db, record, gray.png, job_id=f"seed:{seed}")
        return md5

    def outcome(
        self,
        outcome: str,
        *,
        minutes_ago: int = 0,
        url: str | None = None,
        reason: str | None = None,
        count: int = 1,
    ) -> None:
        """Record ``count`` outcomes that ended ``minutes_ago`` minutes before :attr:`now`."""
        at = self.now - dt.timedelta(minutes=minutes_ago) + dt.timedelta(seconds=30)
        documents = []
        for _ in range(count):
            line = next(self.lines)
            job = Job.new("seed", line, url or f"http://images.test/{line}.png")
            documents.append(outcomes.outcome_document(job, outcome, reason=reason, at=at))
        outcomes.record_outcomes(self.db, documents)


@pytest.fixture
def app(mongo_db, redis_url):
    """The app on a fresh mongomock database (with the pipeline's indexes) and the suite's Redis."""
    storage.ensure_indexes(mongo_db)
    return create_app({"TESTING": True, "MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url})


@pytest.fixture
def client(app):
    """A Flask test client of ``app``."""
    return app.test_client()


@pytest.fixture
def seed(mongo_db) -> Seeder:
    """Adds images and outcomes to the app's database."""
    return Seeder(mongo_db)


@pytest.fixture
def app_with_stores_down(dead_port):
    """An app whose MongoDB and Redis (both with a password in their URL) do not answer."""
    return create_app(
        {
            "MONGO_URI": f"mongodb://crawler:mongo-secret@127.0.0.1:{dead_port}/image_crawler",
            "REDIS_URL": f"redis://:redis-secret@127.0.0.1:{dead_port}/0",
            "SERVICE_TIMEOUT": 0.3,
        }
    )
