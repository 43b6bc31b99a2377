"""A crawl the size of the shipped ``urls.txt`` (343 lines: 315 images, 28 repeated), timed.

Short lists must not crawl slower with batches than with one image per message: this runs
``enqueue --wait`` against 2 × 8 workers of the code under ``--src`` (default: this checkout),
so two checkouts can be compared on one machine, alternating:

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do
        python -m benchmarks.small_list --src /tmp/before/src --label before
        python -m benchmarks.small_list --label after
    done

Prints the wall time from launching ``enqueue`` to its summary (CLI start-up included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.services import REPO, database_uri, mongo_endpoint, start_redis

from benchmarks import images, services


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the src/ of the code to run")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--distinct", type=int, default=315)
    parser.add_argument("--repeats", type=int, default=28)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="image-crawler-small-"))
    bench_images = images.image_set(args.distinct)
    started: list[subprocess.Popen] = []
    try:
        server, port = services.start_image_server(bench_images[0].path.parent)
        started.append(server)
        redis_process, redis_url = start_redis(work, new_session=True)
        started.append(redis_process)
        shim, mongo_uri = mongo_endpoint(work)
        if shim is not None:
            started.append(shim)
            mongo_uri = database_uri(mongo_uri, "small_list")
        lines = [f"http://127.0.0.1:{port}/{image.path.name}" for image in bench_images]
        lines += lines[: args.repeats]
        urls = work / "urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        env = services.crawl_env(redis_url, mongo_uri)
        env["PYTHONPATH"] = str(args.src)
        log = open(work / "workers.log", "wb")  # noqa: SIM115 - closed with the workers
        workers = services.start_workers("image_crawler.actors", env, processes=2, threads=8, output=log)
        started.append(workers)
        time.sleep(6)  # the workers' start-up is not the crawl's
        begin = time.perf_counter()
        enqueue = subprocess.run(
            [sys.executable, "-m", "image_crawler", "enqueue", str(urls), "--wait"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - begin
        print(f"{args.label}: {seconds:.2f} s — {enqueue.stdout.strip().splitlines()[-1]}")
    finally:
        for process in reversed(started):
            services.stop_group(process)


if __name__ == "__main__":
    main()
