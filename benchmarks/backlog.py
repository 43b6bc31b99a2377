"""How many fetch messages wait in Redis while a list is crawled, by ``--max-in-flight``.

    .venv/bin/python -m benchmarks.backlog --lines 20000 --max-in-flight 0
    .venv/bin/python -m benchmarks.backlog --lines 20000 --max-in-flight 5000

Crawls ``--lines`` distinct 16×16 PNGs (fixed costs only) with ``dramatiq image_crawler.actors``
and ``image-crawler enqueue --wait --max-in-flight N``, sampling Redis (not MongoDB, which would
slow the run) every second: fetch messages stored, admit batches queued, Redis memory. Prints
the samples and the peaks; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from tests.support.services import database_uri, mongo_endpoint, start_redis

from benchmarks.images import tiny_set
from benchmarks.services import crawl_env, start_image_server, start_workers, stop_group
from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE
from image_crawler.dramatiq_internals import queue_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--max-in-flight", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    images = tiny_set(args.lines)
    with tempfile.TemporaryDirectory(prefix="image-crawler-backlog-") as tmp:
        work = Path(tmp)
        served = work / "images"
        served.mkdir()
        for image in images:
            (served / image.path.name).symlink_to(image.path)
        started = []
        try:
            redis_process, redis_url = start_redis(work, new_session=True)
            started.append(redis_process)
            shim, mongo_uri = mongo_endpoint(work)
            if shim is not None:
                started.append(shim)
                mongo_uri = database_uri(mongo_uri, f"backlog_{uuid.uuid4().hex[:8]}")
            server, port = start_image_server(served)
            started.append(server)
            urls = work / "urls.txt"
            urls.write_text("".join(f"http://127.0.0.1:{port}/{image.path.name}\n" for image in images))
            env = crawl_env(redis_url, mongo_uri)
            workers = start_workers(
                "image_crawler.actors", env, processes=args.processes, threads=args.threads
            )
            started.append(workers)
            time.sleep(5)  # workers boot
            client = redis.Redis.from_url(redis_url)
            enqueue = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "image_crawler",
                    "enqueue",
                    str(urls),
                    "--wait",
                    "--max-in-flight",
                    str(args.max_in_flight),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            began, samples = time.monotonic(), []
            while enqueue.poll() is None:
                samples.append(
                    (
                        time.monotonic() - began,
                        client.hlen(queue_keys(FETCH_QUEUE).messages),
                        client.llen(queue_keys(ADMIT_QUEUE).waiting),
                        client.info("memory")["used_memory"] / 2**20,
                    )
                )
                time.sleep(1)
            summary = enqueue.stdout.read().strip().splitlines()[-1] if enqueue.stdout else ""
        finally:
            for process in reversed(started):
                stop_group(process)
    print(
        f"{args.lines} lines, --max-in-flight {args.max_in_flight}, "
        f"{args.processes} × {args.threads} workers: "
        f"{summary} in {samples[-1][0]:.0f} s"
        if samples
        else summary
    )
    print(
        f"peak fetch messages in Redis {max(s[1] for s in samples)}, peak Redis memory "
        f"{max(s[3] for s in samples):.0f} MB"
    )
    print(" seconds  fetch messages  admit batches queued  Redis MB")
    for seconds, fetches, batches, memory in samples[:: max(1, len(samples) // 12)]:
        print(f"{seconds:8.0f}  {fetches:14d}  {batches:20d}  {memory:8.0f}")


if __name__ == "__main__":
    main()
