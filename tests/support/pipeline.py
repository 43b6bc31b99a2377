"""An in-process pipeline for tests: the real broker on the suite's Redis, a real dramatiq.Worker, mongomock.

``make_pipeline`` (tests/conftest.py) builds them with the suite's settings and closes them.
``image_crawler`` is imported only when a pipeline is made: ``image_crawler.actors`` binds the
actors to a broker at import time, which must be the suite's Redis (set in ``pytest_configure``).
"""

from __future__ import annotations

import io

from .waiting import wait_until


class Pipeline:
    """An in-process pipeline: the real broker on the suite's Redis, a real dramatiq.Worker, mongomock."""

    def __init__(self, db, settings, threads: int = 8) -> None:
        import dramatiq
        import redis

        from image_crawler import actors, storage
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
        storage.ensure_indexes(db)
        self._previous = set_context(self.context)
        self.worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=50)
        self.worker.start()

    def enqueue_text(self, text: str | bytes, **kwargs):
        """Enqueue the lines of ``text`` as ``image-crawler enqueue`` would."""
        from image_crawler.cli import enqueue_lines

        data = text.encode() if isinstance(text, str) else text
        return enqueue_lines(io.BytesIO(data), self.db, **kwargs)

    def wait_for(self, run: str, jobs: int, timeout: float = 60.0) -> None:
        """Block until every job of ``run`` has an outcome (fails the test after ``timeout``)."""
        from image_crawler import outcomes

        wait_until(
            lambda: outcomes.count_ended(self.db, run) >= jobs,
            f"the {jobs} jobs of run {run} to end",
            timeout=timeout,
            details=lambda: f"{outcomes.count_ended(self.db, run)} of them ended",
        )

    def close(self) -> None:
        from image_crawler.context import set_context

        self.worker.stop()
        set_context(self._previous)
        self.context.close()
        self.broker.flush_all()
