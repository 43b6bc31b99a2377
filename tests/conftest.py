"""Services for the whole suite: a private redis-server, MongoDB (mongomock or MONGO_URI), env.

The Redis server is started in ``pytest_configure`` — before any test module imports
``image_crawler.actors``, which binds the actors to a broker at import time — on a free
port in a temporary directory, so runs are hermetic and can go in parallel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pymongo
import pytest

from support.services import start_redis

_redis: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Tests fetch from a local server on 127.0.0.1 and must not wait for long timeouts.
    os.environ["FETCH_ALLOW_PRIVATE"] = "1"
    os.environ.setdefault("FETCH_TIMEOUT", "5")
    os.environ.setdefault("FETCH_RETRIES", "2")
    if shutil.which("redis-server") is None:
        _redis["missing"] = "redis-server is not on PATH (apt-get install redis-server)"
        return
    directory = Path(tempfile.mkdtemp(prefix="image-crawler-redis-"))
    process, url = start_redis(directory)
    _redis.update(process=process, url=url, directory=directory)
    os.environ["REDIS_URL"] = url


def pytest_unconfigure(config: pytest.Config) -> None:
    process = _redis.get("process")
    if isinstance(process, subprocess.Popen):
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(str(_redis["directory"]), ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the suite's own redis-server (the test is skipped without redis-server)."""
    if "url" not in _redis:
        pytest.skip(str(_redis.get("missing", "no redis-server")))
    return str(_redis["url"])


@pytest.fixture
def mongo_db():
    """A fresh in-memory MongoDB database (mongomock: no MongoDB server can run here)."""
    mongomock = pytest.importorskip("mongomock")
    from mongomock.gridfs import enable_gridfs_integration

    enable_gridfs_integration()
    client = mongomock.MongoClient(tz_aware=True)
    return client["image_crawler"]


@pytest.fixture(scope="session")
def mongo_uri() -> str:
    """A real MongoDB wire endpoint for multi-process tests (skipped when MONGO_URI is unset)."""
    uri = os.environ.get("MONGO_URI")
    if not uri:
        pytest.skip("MONGO_URI is not set: multi-process tests need a MongoDB endpoint (.ci/run starts one)")
    return uri


class Pipeline:
    """An in-process pipeline: the real broker on the suite's Redis, a real dramatiq.Worker, mongomock."""

    def __init__(self, db, settings, threads: int = 8) -> None:
        import dramatiq
        import redis

        from image_crawler import actors
        from image_crawler.claims import ClaimCheck
        from image_crawler.context import Context, set_context
        from image_crawler.fetching import Fetcher

        self.db = db
        self.settings = settings
        self.broker = actors.broker
        self.broker.flush_all()
        self.context = Context(
            settings,
            db,
            ClaimCheck(redis.Redis.from_url(settings.redis_url), settings.claim_ttl),
            Fetcher(settings),
        )
        from image_crawler import storage

        storage.ensure_indexes(db)
        self._previous = set_context(self.context)
        self.worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=50)
        self.worker.start()

    def enqueue_text(self, text: str | bytes, **kwargs):
        """Enqueue the lines of ``text`` as ``image-crawler enqueue`` would."""
        import io

        from image_crawler.cli import enqueue_lines

        data = text.encode() if isinstance(text, str) else text
        return enqueue_lines(io.BytesIO(data), self.db, **kwargs)

    def wait_for(self, run: str, jobs: int, timeout: float = 60.0) -> None:
        """Block until every job of ``run`` has an outcome (fails the test after ``timeout``)."""
        from image_crawler import storage

        deadline = time.monotonic() + timeout
        while (done := storage.outcomes(self.db).count_documents({"run": run})) < jobs:
            if time.monotonic() > deadline:
                pytest.fail(f"only {done} of {jobs} jobs of run {run} ended within {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        from image_crawler.context import set_context

        self.worker.stop()
        set_context(self._previous)
        self.context.close()
        self.broker.flush_all()


@pytest.fixture
def make_pipeline(redis_url, mongo_db):
    """Start in-process pipelines on ``mongo_db`` with settings overridden by keyword."""
    import dataclasses

    from image_crawler.config import get_settings

    started: list[Pipeline] = []

    def make(threads: int = 8, **overrides) -> Pipeline:
        settings = dataclasses.replace(get_settings(), redis_url=redis_url, **overrides)
        started.append(Pipeline(mongo_db, settings, threads))
        return started[-1]

    _forget_hosts(redis_url)
    yield make
    for pipeline in started:
        pipeline.close()
    _forget_hosts(redis_url)


def _forget_hosts(redis_url: str) -> None:
    """Drop what the suite's Redis knows of hosts (turns, pauses after a 429): tests share it."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter("image-crawler:host:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def crawl_env(mongo_uri, tmp_path):
    """Environment for worker and CLI processes: a private Redis and a fresh database at MONGO_URI."""
    redis_process, redis_url = start_redis(tmp_path)
    parts = urlsplit(mongo_uri)
    database = f"e2e_{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, REDIS_URL=redis_url, MONGO_URI=urlunsplit(parts._replace(path=f"/{database}")))
    env.update(FETCH_ALLOW_PRIVATE="1", FETCH_RETRIES="1", FETCH_TIMEOUT="5", PYTHONUNBUFFERED="1")
    client = pymongo.MongoClient(mongo_uri, tz_aware=True)
    yield env, client[database]
    client.drop_database(database)
    client.close()
    redis_process.terminate()
    redis_process.wait(timeout=10)
