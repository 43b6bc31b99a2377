"""The ceiling: the pipeline's work done by a plain loop, with no queue, no Redis and no messages.

One such process per core, each with a keep-alive httpx client, one MongoDB client and a pool
of threads that hide the latency of the downloads and of the database. For every URL it
downloads the body, computes its MD5 and its grayscale PNG with ``image_crawler.imaging`` at
the configured settings, and stores the image and its outcome with ``image_crawler.storage``
and ``image_crawler.outcomes``, into the same MongoDB as the pipeline (a fresh database).

    python -m benchmarks.ceiling URLS --shard I --shards N --threads T --run RUN

It reads the settings from the environment like the workers do, prints ``ready`` once
connected, starts when a line arrives on stdin, and prints one JSON line of timings at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from image_crawler import outcomes, storage
from image_crawler.config import get_settings
from image_crawler.imaging import to_grayscale

STAGES = ("http download", "md5", "to_grayscale", "mongo store_image", "mongo record_outcome")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", type=Path)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--run", default="ceiling")
    args = parser.parse_args(argv)

    settings = get_settings()
    lines = args.urls.read_text().splitlines()
    mine = [(number, url) for number, url in enumerate(lines, start=1) if number % args.shards == args.shard]
    db = storage.get_database(settings)
    db.command("ping")
    client = httpx.Client(
        timeout=httpx.Timeout(settings.fetch_timeout),
        limits=httpx.Limits(max_connections=args.threads, max_keepalive_connections=args.threads),
        trust_env=False,
    )

    def ingest(item: tuple[int, str]) -> dict[str, Any]:
        try:
            return _ingest(item)
        except Exception as exc:  # counted and shown: the ceiling must not die of one bad image
            return {"error": f"{type(exc).__name__}: {exc}", "ended_at": time.time()}

    def _ingest(item: tuple[int, str]) -> dict[str, Any]:
        number, url = item
        times: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[stage] = now - clock
            clock = now

        response = client.get(url)
        response.raise_for_status()
        body = response.content
        lap("http download")
        digest = hashlib.md5(body).hexdigest()
        lap("md5")
        gray = to_grayscale(
            body, max_pixels=settings.max_image_pixels, compress_level=settings.png_compress_level
        )
        lap("to_grayscale")
        record = storage.ImageRecord(
            md5=digest,
            width=gray.width,
            height=gray.height,
            source_url=url,
            content_type=response.headers.get("content-type"),
            byte_size=len(body),
        )
        job = outcomes.Job.new(args.run, number, url)
        stored = storage.store_image(db, record, gray.png, job_id=job.id)
        lap("mongo store_image")
        outcomes.record_outcome(db, job, outcomes.SUCCESS if stored else outcomes.DUPLICATE, md5=digest)
        lap("mongo record_outcome")
        return {"stored": stored, "times": times, "ended_at": time.time()}

    print("ready", flush=True)
    sys.stdin.readline()
    started_at, cpu_start = time.time(), time.process_time()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = list(pool.map(ingest, mine))
    ended_at, cpu_end = time.time(), time.process_time()
    client.close()
    done = [r for r in results if "error" not in r]
    totals = {stage: sum(r["times"][stage] for r in done) for stage in STAGES}
    print(
        json.dumps(
            {
                "started_at": started_at,
                "ended_at": ended_at,
                "cpu_start": cpu_start,
                "cpu_end": cpu_end,
                "images": len(results),
                "stored": sum(r["stored"] for r in done),
                "errors": [r["error"] for r in results if "error" in r],
                "last_ended_at": max((r["ended_at"] for r in results), default=ended_at),
                "stage_seconds": totals,
                "stage_lists": {stage: [r["times"][stage] for r in done] for stage in STAGES},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
