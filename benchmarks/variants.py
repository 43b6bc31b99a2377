"""Benchmark only: what the pipeline would cost with fewer messages per image than DESIGN §2.

``dramatiq benchmarks.variants`` loads the project's actors and then, by ``BENCH_VARIANT``,
replaces ``fetch`` with another actor of that name, so ``admit`` and ``image-crawler enqueue``
work unchanged:

- ``md5-in-fetch``: fetch hashes the body it downloaded and parks it; ``grayscale → collect``
  run as a Dramatiq pipeline (the size travels in the message): 3 messages per image, no group
  barrier, no result backend.
- ``two-tasks``: fetch parks the body; one ``process`` message hashes, converts and stores it:
  2 messages per image, downloads and pixel work still on separate queues.
- ``one-task``: fetch does all the work of the ceiling itself: 1 message per image.

Neither is the product: they measure the price of DESIGN §2's decomposition (``--actors``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import dramatiq

from image_crawler import actors, claims, imaging, outcomes, storage
from image_crawler.actors import broker, settings
from image_crawler.broker import FETCH_QUEUE, PROCESS_QUEUE
from image_crawler.context import get_context
from image_crawler.middleware import retry_transient
from image_crawler.outcomes import Job

VARIANT = os.environ.get("BENCH_VARIANT", "md5-in-fetch")
del broker.actors["fetch"]  # Dramatiq refuses a second actor of a name; this one replaces it
_FETCH_OPTIONS: dict[str, Any] = {
    "actor_name": "fetch",
    "queue_name": FETCH_QUEUE,
    "priority": 100,
    "retry_when": retry_transient(settings.fetch_retries),
    "time_limit": int(2 * settings.fetch_timeout * 1000) + 60_000,
}


def _record(png: bytes, meta: dict[str, Any], crawl_job: Job, digest: str, size: dict[str, int]) -> None:
    context = get_context()
    record = storage.ImageRecord(
        md5=digest,
        width=size["width"],
        height=size["height"],
        source_url=crawl_job.url,
        content_type=meta["content_type"],
        byte_size=meta["byte_size"],
    )
    stored_now = storage.store_image(context.db, record, png, job_id=crawl_job.id)
    outcome = outcomes.SUCCESS if stored_now else outcomes.DUPLICATE
    outcomes.record_outcome(context.db, crawl_job, outcome, md5=digest)


def _grayscale(body: bytes) -> imaging.GrayImage:
    settings = get_context().settings
    return imaging.to_grayscale(
        body, max_pixels=settings.max_image_pixels, compress_level=settings.png_compress_level
    )


@dramatiq.actor(queue_name=PROCESS_QUEUE, priority=0, retry_when=retry_transient(5))
def grayscale_size(job: dict[str, Any]) -> dict[str, int]:
    """``actors.grayscale`` without a stored result: the size goes to collect in the message."""
    return actors.grayscale.fn(job)


@dramatiq.actor(queue_name=PROCESS_QUEUE, priority=0, retry_when=retry_transient(10))
def collect_piped(job: dict[str, Any], meta: dict[str, Any], digest: str, size: dict[str, int]) -> None:
    """``actors.collect`` with md5 and size from the messages instead of the result backend."""
    context = get_context()
    crawl_job = Job.from_message(job)
    png = context.claims.get(claims.gray_key(crawl_job.id), "grayscale image")
    _record(png, meta, crawl_job, digest, size)
    context.claims.drop(crawl_job.id)


if VARIANT == "md5-in-fetch":

    @dramatiq.actor(**_FETCH_OPTIONS)
    def fetch(job: dict[str, Any]) -> None:
        context = get_context()
        crawl_job = Job.from_message(job)
        download = context.fetcher.fetch(crawl_job.url)
        digest = hashlib.md5(download.content).hexdigest()
        meta = {"content_type": download.content_type, "byte_size": len(download.content)}
        with broker.pipelined() as pipe:
            context.claims.put(claims.body_key(crawl_job.id), download.content, pipe=pipe)
            (grayscale_size.message(job) | collect_piped.message(job, meta, digest)).run()

elif VARIANT == "two-tasks":

    @dramatiq.actor(queue_name=PROCESS_QUEUE, priority=0, retry_when=retry_transient(10))
    def process(job: dict[str, Any], meta: dict[str, Any]) -> None:
        """md5, grayscale and collect in one message."""
        context = get_context()
        crawl_job = Job.from_message(job)
        body = context.claims.get(claims.body_key(crawl_job.id), "body")
        gray = _grayscale(body)
        size = {"width": gray.width, "height": gray.height}
        _record(gray.png, meta, crawl_job, hashlib.md5(body).hexdigest(), size)
        context.claims.drop(crawl_job.id)

    @dramatiq.actor(**_FETCH_OPTIONS)
    def fetch(job: dict[str, Any]) -> None:
        context = get_context()
        crawl_job = Job.from_message(job)
        download = context.fetcher.fetch(crawl_job.url)
        meta = {"content_type": download.content_type, "byte_size": len(download.content)}
        with broker.pipelined() as pipe:
            context.claims.put(claims.body_key(crawl_job.id), download.content, pipe=pipe)
            process.send(job, meta)

elif VARIANT == "one-task":

    @dramatiq.actor(**_FETCH_OPTIONS)
    def fetch(job: dict[str, Any]) -> None:
        context = get_context()
        crawl_job = Job.from_message(job)
        download = context.fetcher.fetch(crawl_job.url)
        digest = hashlib.md5(download.content).hexdigest()
        gray = _grayscale(download.content)
        meta = {"content_type": download.content_type, "byte_size": len(download.content)}
        _record(gray.png, meta, crawl_job, digest, {"width": gray.width, "height": gray.height})

else:
    raise SystemExit(f"BENCH_VARIANT={VARIANT!r}: use md5-in-fetch, two-tasks or one-task")
