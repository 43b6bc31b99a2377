"""The ceiling: the pipeline's work done by a plain loop, with no queue, no Redis and no messages.

One such process per core, each with a keep-alive httpx client, one MongoDB client and a pool
of threads that hide the latency of the downloads and of the database. A thread takes its URLs
``--batch`` at a time (default ``BATCH_SIZE``, as a fetch message carries them; ``make bench``
passes the default BATCH_SIZE, whatever the pipeline runs at): for each it
downloads the body, computes its MD5 and its grayscale PNG with ``image_crawler.imaging`` at the
configured settings; then it writes the batch as ``collect`` does, with the same calls of
``image_crawler.storage`` and ``image_crawler.outcomes`` (``images_to_store``: one lookup of the
MD5s; ``store_new_images``; ``image_outcome`` and ``record_outcomes``: the outcomes in one
insert), into the same MongoDB as the pipeline (a fresh database). What it
leaves out is what the queue adds: messages, claim checks, results, redelivery checks.

    python -m benchmarks.ceiling URLS --shard I --shards N --threads T --run RUN [--batch B]

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

STAGES = ("http download", "md5", "to_grayscale", "mongo store images", "mongo record outcomes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", type=Path)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--run", default="ceiling")
    parser.add_argument("--batch", type=int, default=None, help="URLs per write batch (default: BATCH_SIZE)")
    args = parser.parse_args(argv)

    settings = get_settings()
    args.batch = args.batch or settings.batch_size
    lines = args.urls.read_text().splitlines()
    mine = [(number, url) for number, url in enumerate(lines, start=1) if number % args.shards == args.shard]
    db = storage.get_database(settings)
    db.command("ping")
    client = httpx.Client(
        timeout=httpx.Timeout(settings.fetch_timeout),
        limits=httpx.Limits(max_connections=args.threads, max_keepalive_connections=args.threads),
        trust_env=False,
    )

    def ingest(chunk: list[tuple[int, str]]) -> list[dict[str, Any]]:
        try:
            return _ingest(chunk)
        except Exception as exc:  # counted and shown: the ceiling must not die of one bad image
            return [{"error": f"{type(exc).__name__}: {exc}", "ended_at": time.time()} for _ in chunk]

    def _ingest(chunk: list[tuple[int, str]]) -> list[dict[str, Any]]:
        converted: list[tuple[outcomes.Job, storage.ImageRecord, bytes, dict[str, float]]] = []
        for number, url in chunk:
            times: dict[str, float] = {}
            clock = time.perf_counter()
            response = client.get(url)
            response.raise_for_status()
            body = response.content
            times["http download"] = (now := time.perf_counter()) - clock
            digest = hashlib.md5(body).hexdigest()
            times["md5"] = (clock := time.perf_counter()) - now
            gray = to_grayscale(
                body, max_pixels=settings.max_image_pixels, compress_level=settings.png_compress_level
            )
            times["to_grayscale"] = time.perf_counter() - clock
            record = storage.ImageRecord(
                md5=digest,
                width=gray.width,
                height=gray.height,
                source_url=url,
                content_type=response.headers.get("content-type"),
                byte_size=len(body),
            )
            converted.append((outcomes.Job.new(args.run, number, url), record, gray.png, times))
        # The chunk's writes, with collect's calls: one lookup, the new images, the outcomes.
        clock = time.perf_counter()
        first, winners = storage.images_to_store(db, [record.md5 for _, record, _, _ in converted])
        new = [(converted[i][1], converted[i][2], converted[i][0].id) for i in first]
        winners.update(storage.store_new_images(db, new))
        stored_at = time.perf_counter()
        documents = [outcomes.image_outcome(job, record.md5, winners) for job, record, _, _ in converted]
        outcomes.record_outcomes(db, documents)
        ended = time.perf_counter()
        results = []
        for job, record, _, times in converted:
            times["mongo store images"] = (stored_at - clock) / len(converted)
            times["mongo record outcomes"] = (ended - stored_at) / len(converted)
            stored = winners.get(record.md5) == job.id
            results.append({"stored": stored, "times": times, "ended_at": time.time()})
        return results

    print("ready", flush=True)
    sys.stdin.readline()
    started_at, cpu_start = time.time(), time.process_time()
    chunks = [mine[start : start + args.batch] for start in range(0, len(mine), args.batch)]
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = [result for chunk in pool.map(ingest, chunks) for result in chunk]
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
