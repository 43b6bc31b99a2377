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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymongo
import pytest
import redis

from support.http_server import LocalHttpServer
from support.pipeline import Pipeline
from support.processes import END_TO_END_SETTINGS, crawl_environment
from support.services import database_uri, free_port, silent_listener, start_redis
from support.skips import unavailable

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
        unavailable(str(_redis.get("missing", "no redis-server")))
    return str(_redis["url"])


@pytest.fixture
def redis_client(redis_url):
    """A connection to the suite's Redis, closed after the test."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def download_counters(redis_client):
    """The suite's Redis, without the workers' download counters before and after (tests share it)."""
    from image_crawler.context import DOWNLOADED_BODIES_KEY, DOWNLOADED_BYTES_KEY

    redis_client.delete(DOWNLOADED_BYTES_KEY, DOWNLOADED_BODIES_KEY)
    yield redis_client
    redis_client.delete(DOWNLOADED_BYTES_KEY, DOWNLOADED_BODIES_KEY)


@pytest.fixture
def server() -> Iterator[LocalHttpServer]:
    """A local HTTP server of the test's own (modules that need another kind define their own)."""
    with LocalHttpServer() as running:
        yield running


@pytest.fixture
def dead_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens."""
    return free_port()


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never answers (a hung server)."""
    with silent_listener() as port:
        yield port


@pytest.fixture
def mongo_db():
    """A fresh in-memory MongoDB database (mongomock), for tests that run in this process."""
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
        unavailable("MONGO_URI is not set: multi-process tests need a MongoDB endpoint (.ci/run starts one)")
    return uri


@contextmanager
def closing_pipelines(new: Callable[..., Pipeline]) -> Iterator[Callable[..., Pipeline]]:
    """``make_pipeline``'s factory: pipelines made by ``new``, closed at the end in reverse order.

    Each pipeline puts back the context that was current when it started: closing them in
    reverse order leaves the one from before the first, whatever the test did in between, and
    that one is put back in any case (tests/test_services.py checks both).
    """
    from image_crawler import context

    started: list[Pipeline] = []

    def make(*args: Any, **kwargs: Any) -> Pipeline:
        started.append(new(*args, **kwargs))
        return started[-1]

    before = context.set_context(None)  # whatever was current, put back below
    context.set_context(before)
    try:
        yield make
    finally:
        for pipeline in reversed(started):
            pipeline.close()
        context.set_context(before)


@pytest.fixture
def make_pipeline(redis_url, mongo_db):
    """Start in-process pipelines on ``mongo_db`` with settings overridden by keyword."""
    import dataclasses

    from image_crawler.config import get_settings

    def new(threads: int = 8, **overrides) -> Pipeline:
        settings = dataclasses.replace(get_settings(), redis_url=redis_url, **overrides)
        return Pipeline(mongo_db, settings, threads)

    _forget_hosts(redis_url)
    with closing_pipelines(new) as make:
        yield make
    _forget_hosts(redis_url)


def _forget_hosts(redis_url: str) -> None:
    """Drop what the suite's Redis knows of hosts (turns, pauses after a 429): tests share it."""
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
    database = f"e2e_{uuid.uuid4().hex[:8]}"
    env = crawl_environment(redis_url, database_uri(mongo_uri, database), **END_TO_END_SETTINGS)
    client = pymongo.MongoClient(mongo_uri, tz_aware=True)
    yield env, client[database]
    client.drop_database(database)
    client.close()
    redis_process.terminate()
    redis_process.wait(timeout=10)
