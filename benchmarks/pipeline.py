"""``make bench``: the pipeline end to end against the machine's ceiling, on the same cores.

1. Serves a few thousand distinct photo-like images (benchmarks/images.py, cached) from a local
   HTTP server (benchmarks/server.py) and starts a private redis-server; MongoDB is ``MONGO_URI``,
   or else the MongoDB stand-in ``$MONGO_SHIM`` (tests/support/services.py), started for the run.
2. **Pipeline**: ``dramatiq benchmarks.instrumented_actors`` workers (the project's actors plus
   timing middleware) and ``image-crawler enqueue URLS --wait``, at the settings of the
   environment (``BATCH_SIZE``, ``FETCH_CONCURRENCY``, ``PNG_COMPRESS_LEVEL``…: the defaults
   users get unless set).
3. **Ceiling**: the same work in a plain loop with no queue (benchmarks/ceiling.py), one process
   per core, writing the same documents and GridFS files, batch by batch as ``collect`` does, to a
   fresh database of the same MongoDB.
4. ``to_grayscale`` alone: the PNG compression levels on the image set, and a 4000×3000 photo.

Prints tables, the pipeline's performance targets among them (CPU efficiency ≥ 0.90, wall-clock
ratio ≥ 0.85, redis-server ≤ 0.25 ms of CPU per image; benchmarks/README.md), and whether each run
met them; asserts nothing about time. ``--help`` lists the knobs. Run it from the repository root:

    python -m benchmarks.pipeline [options]

This module runs the two sides and measures them; benchmarks/pipeline_report.py prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import redis
from tests.support.services import database_uri, mongo_endpoint, start_redis

from benchmarks import images as image_sets
from benchmarks import imaging_bench
from benchmarks.ceiling import STAGES as CEILING_STAGES
from benchmarks.pipeline_report import OTHERS, RunResult, report
from benchmarks.services import (
    REPO,
    Sampler,
    children_of,
    crawl_env,
    is_mongo_shim,
    just,
    listening_pid,
    start_group,
    start_image_server,
    start_workers,
    stop_group,
)
from image_crawler import outcomes, storage
from image_crawler.broker import QUEUE_NAMES
from image_crawler.config import Settings, load_settings
from image_crawler.dramatiq_internals import NAMESPACE, is_group_key, is_result_key, queue_keys

#: The ceiling writes as many images at a time as a fetch message carries by default, whatever
#: BATCH_SIZE the pipeline runs at: a sweep of BATCH_SIZE compares the pipeline to one ceiling.
CEILING_BATCH = Settings().batch_size
#: How long to wait, after the last outcome, for the pipeline to finish (collect deletes what it
#: parked in Redis after recording the outcomes).
IDLE_TIMEOUT_S = 60


def _wait_for_workers(ready: Callable[[], bool], process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"the workers exited with code {process.returncode} (see their log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not start within {timeout:g} s (see their log)")
        time.sleep(0.1)


def _roles(
    sampler: Sampler, exact: dict[str, float]
) -> tuple[dict[str, float], dict[str, list[int]], dict[str, float]]:
    """CPU seconds, peak RSS and system (kernel) CPU seconds per role; ``exact`` CPU figures
    replace sampled ones (not the system share, which is always sampled)."""
    cpu: dict[str, float] = {}
    rss: dict[str, list[int]] = {}
    system: dict[str, float] = {}
    for role, stats in sampler.by_role().items():
        cpu[role] = sum(stat.cpu for stat in stats)
        system[role] = sum(stat.system for stat in stats)
        rss[role] = sorted((stat.peak_rss for stat in stats), reverse=True)
    cpu.update(exact)
    # Whatever else ran on the machine meanwhile (other test runs, say) took cores from both sides.
    cpu[OTHERS] = max(0.0, sampler.system_cpu - sum(cpu.values()))
    return cpu, rss, system


def run_pipeline(
    args: argparse.Namespace, env: dict[str, str], urls: Path, work: Path, services: dict[str, int]
) -> RunResult:
    """The workers + ``enqueue --wait``; the clock runs from the first batch sent to the last outcome.

    CPU is measured from launching ``enqueue`` until no message is left in Redis (``collect``
    deletes what it parked after recording the outcomes), Redis traffic over the same span.
    """
    database = f"bench_pipeline_{uuid.uuid4().hex[:8]}"
    work.mkdir()
    stage_dir = work / "stages"
    env = dict(env, MONGO_URI=database_uri(env["MONGO_URI"], database), BENCH_STAGE_DIR=str(stage_dir))
    module = "image_crawler.actors" if args.plain else "benchmarks.instrumented_actors"
    log_path = work / "workers.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    workers = start_workers(module, env, processes=args.processes, threads=args.threads, output=log)
    enqueue_pid: list[int] = []
    watch = {
        "workers": children_of(workers.pid),
        "dramatiq parent": just(workers.pid),
        "enqueue CLI": lambda: list(enqueue_pid),
        **{role: just(pid) for role, pid in services.items()},
    }
    redis_client = redis.Redis.from_url(env["REDIS_URL"])
    redis_client.flushall()  # nothing left from an earlier repetition
    try:
        if args.plain:
            booted = lambda: log_path.read_bytes().count(b"Worker process is ready") >= args.processes  # noqa: E731
        else:
            booted = lambda: len(list(stage_dir.glob("ready-*"))) >= args.processes  # noqa: E731
        _wait_for_workers(booted, workers, timeout=180)
        redis_before = _redis_stats(redis_client)
        memory = _RedisMemory(env["REDIS_URL"])
        with Sampler(watch) as sampler, memory:
            sampler.mark_start()
            launched = time.time()
            out = open(work / "enqueue.out", "w+")  # noqa: SIM115 - closed below
            cli_args = ["enqueue", str(urls)] if args.no_wait else ["enqueue", str(urls), "--wait"]
            cli = subprocess.Popen(
                [sys.executable, "-m", "image_crawler", *cli_args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
            enqueue_pid.append(cli.pid)
            _, status, usage = os.wait4(cli.pid, 0)
            cli.returncode = os.waitstatus_to_exitcode(status)
            if args.no_wait and cli.returncode == 0:
                _wait_for_outcomes(env, urls)
            exited = time.time()
            memory_at_exit = _used_memory(redis_client)
            idle_after = _wait_for_idle(redis_client) if cli.returncode == 0 else None
            sampler.mark_end()
        redis_after = _redis_stats(redis_client)
        memory_after = _used_memory(redis_client)
        left = _keys_by_kind(redis_client)
        out.seek(0)
        output = out.read()
        out.close()
        if cli.returncode != 0:
            raise RuntimeError(f"image-crawler enqueue failed ({cli.returncode}):\n{output}")
    finally:
        stop_group(workers, timeout=60)
        log.close()
        redis_client.close()
    run = output.split("run ", 1)[1].split(":", 1)[0]
    settings = load_settings(env)
    db = storage.connect(settings)
    try:
        counts = outcomes.count_outcomes(db, run)
        last = outcomes.last_ended_at(db, run)
        stored = storage.count_images(db)
        png_mean = next(
            storage.images(db).aggregate([{"$group": {"_id": None, "mean": {"$avg": "$gray_size"}}}]), {}
        ).get("mean", 0.0)
        reasons = outcomes.top_error_reasons(db, run=run, limit=0)
    finally:
        db.client.drop_database(database)
        db.client.close()
    records = [
        r for path in sorted(stage_dir.glob("stages-*.json")) for r in json.loads(path.read_text())["records"]
    ]
    # The clock starts when `enqueue` sends its first batch (admit messages are sent by the CLI,
    # so their enqueue time is their message_timestamp); without records, when it was launched.
    admits = [r for r in records if r["actor"] == "admit"]
    first = min((r["message_timestamp"] for r in admits), default=launched * 1000) / 1000
    end = last.timestamp() if last else exited
    exact = {"enqueue CLI": usage.ru_utime + usage.ru_stime}  # from wait4
    cpu, rss, system = _roles(sampler, exact)
    system["enqueue CLI"] = usage.ru_stime
    return RunResult(
        "pipeline",
        sum(counts.values()),
        end - first,
        counts,
        cpu,
        rss,
        system=system,
        extra={
            "records": records,
            "log_lines": _log_lines(log_path),
            "cli_seconds": exited - launched,
            "cli": cli_args,
            "stored": stored,
            "png_mean": png_mean,
            "reasons": dict(reasons),
            "worker_processes": len(sampler.by_role().get("workers", [])),
            "window": sampler.seconds,
            "redis": {key: redis_after[key] - redis_before.get(key, 0) for key in redis_after},
            "redis_info_calls": memory.calls + 2,  # ours: the memory samples, and the two below
            "redis_memory": {
                "before the run": redis_before["used_memory"],
                "peak during the run (sampled every 0.5 s)": memory.peak,
                "when `enqueue --wait` returned": memory_at_exit,
                f"once the pipeline was idle ({idle_after:.1f} s later)"
                if idle_after is not None
                else "never idle": memory_after,
            },
            "redis_keys_left": left,
        },
    )


def _log_lines(path: Path) -> dict[str, int]:
    """Lines the workers logged, by logger (``[name]`` after the level, as Dramatiq formats them)."""
    counts: dict[str, int] = defaultdict(int)
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split("] [", 4)  # [time] [PID n] [thread] [logger] [LEVEL] message
        counts[fields[3] if len(fields) == 5 else "continuation lines"] += 1
    return dict(counts)


def _wait_for_outcomes(env: dict[str, str], urls: Path) -> None:
    """Wait until the (fresh) database has counted an outcome per URL, polling its cheapest count."""
    expected = sum(1 for line in urls.read_text().splitlines() if line.strip())
    db = storage.connect(load_settings(env))
    try:
        while sum(outcomes.counted_totals(db).values()) < expected:
            time.sleep(0.1)
    finally:
        db.client.close()


class _RedisMemory:
    """Samples Redis ``used_memory`` every ``interval`` seconds from a thread, keeping the peak."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        self.client = redis.Redis.from_url(url)
        self.interval = interval
        self.peak = 0
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RedisMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _used_memory(self.client))
            self.calls += 1
            if self._stop.wait(self.interval):
                return


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _in_flight(client: redis.Redis) -> int:
    """Messages stored in Redis and not acknowledged yet: queued, delayed, or running."""
    keys = [queue_keys(queue) for queue in QUEUE_NAMES]
    return sum(int(client.hlen(key.messages)) + int(client.hlen(key.delayed_messages)) for key in keys)


def _wait_for_idle(client: redis.Redis) -> float | None:
    """Wait until no message is left in Redis; the seconds it took, None if it never happened."""
    started = time.monotonic()
    while _in_flight(client):
        if time.monotonic() - started > IDLE_TIMEOUT_S:
            return None
        time.sleep(0.1)
    return time.monotonic() - started


#: What the keys the pipeline leaves in Redis are, by name.
_KEY_KINDS: tuple[tuple[str, str], ...] = (
    ("image-crawler:claim:", "claim checks (bodies, PNGs)"),
    ("image-crawler:running:", "CrashGuard marks"),
    ("image-crawler:admitted:", "admitted marks (kept 7 days by design)"),
    (f"{NAMESPACE}:", "Dramatiq broker (queues, acks, heartbeats)"),
)


def _keys_by_kind(client: redis.Redis) -> dict[str, list[int]]:
    """Keys left in Redis and their memory (MEMORY USAGE), by kind: ``kind → [keys, bytes]``."""
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for raw in client.scan_iter(count=1000):
        name = raw.decode(errors="replace")
        kind = next((what for prefix, what in _KEY_KINDS if name.startswith(prefix)), None)
        if kind is None:
            if is_result_key(name):
                kind = "results (Results middleware)"
            elif is_group_key(name):
                kind = "group barriers"
            else:
                kind = "other"
        kinds[kind][0] += 1
        kinds[kind][1] += int(client.memory_usage(raw) or 0)
    return dict(kinds)


def _redis_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command, bytes in and out of the server, and its memory, so far."""
    stats = {
        f"cmd {name.removeprefix('cmdstat_')}": int(value["calls"])
        for name, value in client.info("commandstats").items()
    }
    info = client.info("stats")
    stats["bytes in"] = int(info["total_net_input_bytes"])
    stats["bytes out"] = int(info["total_net_output_bytes"])
    stats["used_memory"] = _used_memory(client)
    return stats


def run_ceiling(
    args: argparse.Namespace, env: dict[str, str], urls: Path, services: dict[str, int]
) -> RunResult:
    """benchmarks/ceiling.py, one process per core; the clock runs from "go" to the last image stored."""
    database = f"bench_ceiling_{uuid.uuid4().hex[:8]}"
    env = dict(env, MONGO_URI=database_uri(env["MONGO_URI"], database))
    settings = load_settings(env)
    db = storage.connect(settings)
    storage.ensure_indexes(db)  # what `image-crawler enqueue` and every worker do first
    run = f"ceiling-{uuid.uuid4().hex[:6]}"
    children = []
    with ExitStack() as stack:
        for shard in range(args.processes):
            command = [sys.executable, "-m", "benchmarks.ceiling", str(urls), "--run", run]
            command += [
                "--shard",
                str(shard),
                "--shards",
                str(args.processes),
                "--threads",
                str(args.ceiling_threads),
                "--batch",
                str(args.ceiling_batch),
            ]
            child = start_group(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            stack.callback(stop_group, child)
            children.append(child)
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a ceiling process did not start")
        watch = {"ceiling": lambda: [c.pid for c in children], **{r: just(p) for r, p in services.items()}}
        with Sampler(watch) as sampler:
            sampler.mark_start()
            started = time.time()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            reports = []
            for child in children:
                assert child.stdout is not None
                reports.append(json.loads(child.stdout.readline()))
            sampler.mark_end()
        for child in children:
            child.wait(timeout=60)
    try:
        counts = outcomes.count_outcomes(db, run)
        stored = storage.images(db).count_documents({})
    finally:
        db.client.drop_database(database)
        db.client.close()
    end = max(report["last_ended_at"] for report in reports)
    cpu, rss, system = _roles(
        sampler, {"ceiling": sum(report["cpu_end"] - report["cpu_start"] for report in reports)}
    )
    stages = {
        stage: [t for report in reports for t in report["stage_lists"][stage]] for stage in CEILING_STAGES
    }
    errors = [error for report in reports for error in report["errors"]]
    return RunResult(
        "ceiling",
        sum(report["images"] for report in reports),
        end - started,
        counts,
        cpu,
        rss,
        stages,
        system,
        extra={"stored": stored, "errors": errors, "window": sampler.seconds},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="distinct images to crawl (default: 3000)")
    parser.add_argument(
        "--processes",
        type=int,
        default=cores,
        help=f"worker and ceiling processes (default: one per core, {cores})",
    )
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default: 8)")
    parser.add_argument(
        "--ceiling-threads", type=int, default=None, help="threads per ceiling process (default: --threads)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both sides N times, alternating, and compare the best runs (other load on the machine)",
    )
    parser.add_argument("--level-sample", type=int, default=300, help="images for the compress_level table")
    parser.add_argument(
        "--skip-imaging", action="store_true", help="skip the compress_level and large photo runs"
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="enqueue without --wait, poll a cheap count instead (shows what --wait's polling costs)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="run `dramatiq image_crawler.actors` itself (no timing middleware, so no per-stage table)",
    )
    parser.add_argument(
        "--ceiling-batch",
        type=int,
        default=None,
        help=f"URLs per write batch of the ceiling (default: {CEILING_BATCH}, the default BATCH_SIZE, "
        "whatever BATCH_SIZE the pipeline runs at)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where generated images are cached")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="crawl 16×16 PNGs instead of photos: no pixel work, both sides show their fixed cost per image",
    )
    args = parser.parse_args(argv)
    args.ceiling_threads = args.ceiling_threads or args.threads
    args.ceiling_batch = args.ceiling_batch or CEILING_BATCH
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings()
    cores = os.cpu_count() or 1
    if args.tiny:
        image_set = image_sets.tiny_set(args.images, args.cache_dir)
    else:
        image_set = image_sets.image_set(args.images, args.cache_dir)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="image-crawler-bench-")))
        redis, redis_url = start_redis(work, new_session=True)
        stack.callback(stop_group, redis)
        services = {"redis-server": redis.pid}
        shim, mongo_uri = mongo_endpoint(work)
        if shim is None:
            mongo_pid = listening_pid(mongo_uri)
            what = f"MongoDB at MONGO_URI ({urlsplit(mongo_uri).netloc})"
        else:
            stack.callback(stop_group, shim)
            mongo_pid = shim.pid
            what = "the MongoDB stand-in MONGO_SHIM, started for this run"
        if mongo_pid is not None:
            services["mongo-shim" if is_mongo_shim(mongo_pid) else "mongod"] = mongo_pid
        mongo_note = f"{what}; both sides write to this same server, each to a fresh database."
        if "mongo-shim" in services:
            mongo_note += (
                "\n  It is the mongo shim: mongomock behind the wire protocol, one lock serialising every "
                "command, slow. It is a measuring instrument: the ceiling writes to the SAME shim, so both "
                "sides pay the same storage cost, and absolute numbers say nothing of a real MongoDB."
            )
        server, port = start_image_server(image_set[0].path.parent)
        stack.callback(stop_group, server)
        services["image server"] = server.pid
        urls = work / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{image.name}\n" for image in image_set))
        env = crawl_env(redis_url, mongo_uri)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

        sizes = [image.path.stat().st_size for image in image_set]
        kinds = defaultdict(int)
        for image in image_set:
            kinds[image.content_type] += 1
        shape = "16×16 px, no pixel work (--tiny)" if args.tiny else "200–640 px, photo-like"
        print(
            f"\nimage-crawler benchmark — {cores} cores, {len(image_set)} distinct images "
            f"({', '.join(f'{n} {t}' for t, n in kinds.items())}; {shape}; "
            f"{statistics.mean(sizes) / 1024:.0f} kB mean) served by benchmarks/server.py"
        )
        print(f"storage: {mongo_note}")
        module = "image_crawler.actors" if args.plain else "benchmarks.instrumented_actors"
        print(
            f"pipeline: dramatiq {module} "
            f"--processes {args.processes} --threads "
            f"{args.threads}, BATCH_SIZE={settings.batch_size}, "
            f"FETCH_CONCURRENCY={settings.fetch_concurrency}; Redis {redis_url}; ceiling: "
            f"{args.processes} processes × {args.ceiling_threads} threads, writes {args.ceiling_batch} "
            f"images at a time; PNG_COMPRESS_LEVEL={settings.png_compress_level}, "
            f"MAX_IMAGE_PIXELS={settings.max_image_pixels}, FETCH_ALLOW_PRIVATE=1 (the server is local), "
            f"HOST_CONCURRENCY={env['HOST_CONCURRENCY']} (one server stands in for many hosts)"
        )

        pipelines: list[RunResult] = []
        ceilings: list[RunResult] = []
        for attempt in range(1, args.repeat + 1):
            print(f"\nrunning the pipeline ({attempt}/{args.repeat})…", flush=True)
            pipelines.append(run_pipeline(args, env, urls, work / f"pipeline-{attempt}", services))
            pipelines[-1].extra["threads"] = args.processes * args.threads
            print(f"  {pipelines[-1].rate:.1f} images/s", flush=True)
            print(f"running the ceiling ({attempt}/{args.repeat})…", flush=True)
            ceilings.append(run_ceiling(args, env, urls, services))
            print(f"  {ceilings[-1].rate:.1f} images/s", flush=True)

        levels: list[imaging_bench.LevelResult] = []
        large: list[imaging_bench.LargeImageResult] = []
        if not args.skip_imaging:
            print("measuring to_grayscale alone…", flush=True)
            step = max(1, len(image_set) // args.level_sample)
            sample = [image.path for image in image_set[::step][: args.level_sample]]
            levels = imaging_bench.compress_levels(sample, settings.max_image_pixels)
            photo = image_sets.large_photo(args.cache_dir)
            large = [
                imaging_bench.large_image(photo, level) for level in sorted({settings.png_compress_level, 1})
            ]

    report(
        pipelines,
        ceilings,
        image_bytes=statistics.mean(sizes),
        levels=levels,
        large=large,
        compress_level=settings.png_compress_level,
        cores=cores,
    )


if __name__ == "__main__":
    main()
