#!/usr/bin/env python3
"""``make bench``: the pipeline end to end against the machine's ceiling, on the same cores (issue 6).

1. Serves a few thousand distinct photo-like images (benchmarks/images.py, cached) from a local
   HTTP server (benchmarks/server.py) and starts a private redis-server; MongoDB is ``MONGO_URI``,
   or else the mongo shim of ``../shared/tools``, started for the run.
2. **Pipeline**: ``dramatiq benchmarks.instrumented_actors`` workers (the project's actors plus
   timing middleware) and ``image-crawler enqueue URLS --wait``, at the default settings.
3. **Ceiling**: the same work in a plain loop with no queue (benchmarks/ceiling.py), one process
   per core, writing the same documents and GridFS files to a fresh database of the same MongoDB.
4. ``to_grayscale`` alone: the PNG compression levels on the image set, and a 4000×3000 photo.

Prints tables; asserts nothing about time. ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: `benchmarks` importable

import pymongo
import redis

from benchmarks import images as image_sets
from benchmarks import imaging_bench
from benchmarks.ceiling import STAGES as CEILING_STAGES
from benchmarks.services import (
    REPO,
    Sampler,
    children_of,
    is_mongo_shim,
    just,
    listening_pid,
    start_image_server,
    start_mongo_shim,
    start_redis,
    stop_group,
)
from image_crawler import outcomes, storage
from image_crawler.config import load_settings

ACTORS = ("fetch", "md5", "grayscale", "collect", "record_failure")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Running the two sides


@dataclass
class RunResult:
    """One side of the comparison."""

    name: str
    images: int
    seconds: float
    counts: dict[str, int]
    cpu: dict[str, float]  # role → CPU seconds during the run
    rss: dict[str, list[int]]  # role → peak RSS of each process
    stages: dict[str, list[float]] = field(default_factory=dict)  # stage → seconds per image/message
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _database_uri(base: str, database: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _wait_for_workers(ready: Callable[[], bool], process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"the workers exited with code {process.returncode} (see their log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not start within {timeout:g} s (see their log)")
        time.sleep(0.1)


OTHERS = "other processes (not ours)"


def _roles(sampler: Sampler, exact: dict[str, float]) -> tuple[dict[str, float], dict[str, list[int]]]:
    """CPU seconds and peak RSS per role; ``exact`` CPU figures replace sampled ones."""
    cpu: dict[str, float] = {}
    rss: dict[str, list[int]] = {}
    for role, stats in sampler.by_role().items():
        cpu[role] = sum(stat.cpu for stat in stats)
        rss[role] = sorted((stat.peak_rss for stat in stats), reverse=True)
    cpu.update(exact)
    # Whatever else ran on the machine meanwhile (other test runs, say) took cores from both sides.
    cpu[OTHERS] = max(0.0, sampler.system_cpu - sum(cpu.values()))
    return cpu, rss


def run_pipeline(
    args: argparse.Namespace, env: dict[str, str], urls: Path, work: Path, services: dict[str, int]
) -> RunResult:
    """The workers + ``enqueue --wait``; the clock runs from the first message to the last outcome."""
    database = f"bench_pipeline_{uuid.uuid4().hex[:8]}"
    work.mkdir()
    stage_dir = work / "stages"
    env = dict(env, MONGO_URI=_database_uri(env["MONGO_URI"], database), BENCH_STAGE_DIR=str(stage_dir))
    module = args.actors or ("image_crawler.actors" if args.plain else "benchmarks.instrumented_actors")
    command = [sys.executable, "-m", "dramatiq", module, "--path", str(REPO)]
    command += ["--processes", str(args.processes), "--threads", str(args.threads)]
    log_path = work / "workers.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    workers = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=log)
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
        if args.plain or args.actors:
            booted = lambda: log_path.read_bytes().count(b"Worker process is ready") >= args.processes  # noqa: E731
        else:
            booted = lambda: len(list(stage_dir.glob("ready-*"))) >= args.processes  # noqa: E731
        _wait_for_workers(booted, workers, timeout=180)
        redis_before = _redis_stats(redis_client)
        with Sampler(watch) as sampler:
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
            sampler.mark_end()
        redis_after = _redis_stats(redis_client)
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
        last = storage.outcomes(db).find_one({"run": run}, sort=[("ended_at", pymongo.DESCENDING)])
        stored = storage.images(db).count_documents({})
        png_mean = next(
            storage.images(db).aggregate([{"$group": {"_id": None, "mean": {"$avg": "$gray_size"}}}]), {}
        ).get("mean", 0.0)
        reasons = list(
            storage.outcomes(db).aggregate(
                [
                    {"$match": {"run": run, "outcome": "error"}},
                    {"$group": {"_id": "$reason", "n": {"$sum": 1}}},
                ]
            )
        )
    finally:
        db.client.drop_database(database)
        db.client.close()
    records = [
        r for path in sorted(stage_dir.glob("stages-*.json")) for r in json.loads(path.read_text())["records"]
    ]
    fetches = [r for r in records if r["actor"] == "fetch"]
    first = min((r["enqueued_at"] for r in fetches), default=launched * 1000) / 1000
    end = last["ended_at"].timestamp() if last else exited
    cpu, rss = _roles(sampler, {"enqueue CLI": usage.ru_utime + usage.ru_stime})  # exact, from wait4
    return RunResult(
        "pipeline",
        sum(counts.values()),
        end - first,
        counts,
        cpu,
        rss,
        extra={
            "records": records,
            "cli_seconds": exited - launched,
            "cli": cli_args,
            "stored": stored,
            "png_mean": png_mean,
            "reasons": {row["_id"]: row["n"] for row in reasons},
            "worker_processes": len(sampler.by_role().get("workers", [])),
            "window": sampler.seconds,
            "redis": {key: redis_after[key] - redis_before.get(key, 0) for key in redis_after},
        },
    )


def _wait_for_outcomes(env: dict[str, str], urls: Path) -> None:
    """Wait until the (fresh) database holds an outcome per URL, polling its cheapest count."""
    expected = sum(1 for line in urls.read_text().splitlines() if line.strip())
    db = storage.connect(load_settings(env))
    try:
        while storage.outcomes(db).estimated_document_count() < expected:
            time.sleep(0.1)
    finally:
        db.client.close()


def _redis_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command, and bytes in and out of the server, so far."""
    stats = {
        f"cmd {name.removeprefix('cmdstat_')}": int(value["calls"])
        for name, value in client.info("commandstats").items()
    }
    info = client.info("stats")
    stats["bytes in"] = int(info["total_net_input_bytes"])
    stats["bytes out"] = int(info["total_net_output_bytes"])
    return stats


def run_ceiling(
    args: argparse.Namespace, env: dict[str, str], urls: Path, services: dict[str, int]
) -> RunResult:
    """benchmarks/ceiling.py, one process per core; the clock runs from "go" to the last image stored."""
    database = f"bench_ceiling_{uuid.uuid4().hex[:8]}"
    env = dict(env, MONGO_URI=_database_uri(env["MONGO_URI"], database))
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
            ]
            child = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                start_new_session=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
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
    cpu, rss = _roles(
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
        extra={"stored": stored, "errors": errors, "window": sampler.seconds},
    )


# ---------------------------------------------------------------------------------------------
# Reporting


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
    rows = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    if title:
        print(f"\n{title}")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _ms(values: list[float], per: int | None = None) -> float | None:
    """Mean in milliseconds (per ``per`` items when given, e.g. per image), None when empty."""
    if not values:
        return None
    return 1000 * sum(values) / (per or len(values))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report_throughput(pipelines: list[RunResult], ceilings: list[RunResult]) -> None:
    pipeline, ceiling = _best(pipelines), _best(ceilings)
    waited = "--wait" if "--wait" in pipeline.extra["cli"] else "without --wait, then a cheap poll"
    rows: list[list[Any]] = []
    for side, results in (
        ("pipeline (first message → last outcome)", pipelines),
        ("ceiling (go → last image stored)", ceilings),
    ):
        for attempt, result in enumerate(results, start=1):
            label = side if len(results) == 1 else f"{side}, run {attempt}"
            rows.append([label, result.images, result.seconds, result.rate, _cpu_per_image(result)])
            if result.name == "pipeline":
                seconds = result.extra["cli_seconds"]
                wall = [f"  `enqueue` ({waited}) wall, incl. start-up", result.images, seconds]
                rows.append([*wall, result.images / seconds, None])
    best = " (best runs)" if len(pipelines) > 1 or len(ceilings) > 1 else ""
    cpu_ratio = _cpu_per_image(ceiling) / _cpu_per_image(pipeline)
    rows.append([f"ratio pipeline / ceiling{best}", None, None, f"{pipeline.rate / ceiling.rate:.2f}", None])
    rows.append(["ratio of CPU per image, ceiling / pipeline", None, None, None, f"{cpu_ratio:.2f}"])
    _table(
        ["", "images", "seconds", "images/s", "CPU ms/image"],
        rows,
        title="== Throughput (CPU: all the processes of the benchmark, per image)",
    )
    for result in (*pipelines, *ceilings):
        counts = ", ".join(f"{n} {name}" for name, n in result.counts.items())
        print(f"{result.name}: {counts}; images stored {result.extra['stored']}", end="")
        if result.extra.get("reasons"):
            print(f"; errors: {result.extra['reasons']}", end="")
        if result.extra.get("errors"):
            print(f"; errors: {result.extra['errors'][:3]}", end="")
        print()


def _cpu_per_image(result: RunResult) -> float:
    return 1000 * sum(cpu for role, cpu in result.cpu.items() if role != OTHERS) / result.images


def _best(results: list[RunResult]) -> RunResult:
    return max(results, key=lambda result: result.rate)


def report_stages(pipeline: RunResult, ceiling: RunResult) -> None:
    records = pipeline.extra["records"]
    n = pipeline.images
    by_actor: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_actor[record["actor"]].append(record)
    span_totals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in records:
        for label, seconds in record["spans"].items():
            span_totals[(record["actor"], label)].append(seconds)

    def pipeline_span(actor: str, label: str) -> float | None:
        return _ms(span_totals.get((actor, label), []), per=n)

    def rest(actor: str) -> float | None:
        rows = by_actor.get(actor, [])
        if not rows:
            return None
        return _ms([r["actor_time"] - sum(r["spans"].values()) for r in rows], per=n)

    rows = [
        ["http download", _ms(ceiling.stages["http download"]), pipeline_span("fetch", "http download")],
        ["md5", _ms(ceiling.stages["md5"]), rest("md5")],
        ["to_grayscale", _ms(ceiling.stages["to_grayscale"]), pipeline_span("grayscale", "to_grayscale")],
        [
            "mongo store_image",
            _ms(ceiling.stages["mongo store_image"]),
            pipeline_span("collect", "mongo store_image"),
        ],
        [
            "mongo record_outcome",
            _ms(ceiling.stages["mongo record_outcome"]),
            pipeline_span("collect", "mongo record_outcome"),
        ],
    ]
    rows.append(
        [
            "  work the ceiling does too, summed",
            _sum_ms(ceiling.stages.values(), n=ceiling.images),
            _add(*(row[2] for row in rows)),
        ]
    )
    extra = [
        ["redis claim put (fetch: body)", None, pipeline_span("fetch", "redis claim put")],
        ["redis claim get (md5: body)", None, pipeline_span("md5", "redis claim get")],
        ["redis claim get (grayscale: body)", None, pipeline_span("grayscale", "redis claim get")],
        ["redis claim put (grayscale: png)", None, pipeline_span("grayscale", "redis claim put")],
        ["redis result get ×2 (collect)", None, pipeline_span("collect", "redis result get")],
        ["redis claim get (collect: png)", None, pipeline_span("collect", "redis claim get")],
        ["redis claim drop (collect)", None, pipeline_span("collect", "redis claim drop")],
        ["enqueue group[md5, grayscale] (fetch)", None, pipeline_span("fetch", "enqueue group")],
        [
            "other code in fetch / grayscale / collect",
            None,
            _add(rest("fetch"), rest("grayscale"), rest("collect")),
        ],
        [
            "middleware hooks (results, group barrier, callback enqueue, retries)",
            None,
            _ms([r["total"] - r["actor_time"] for r in records], per=n),
        ],
    ]
    pipeline_total = _ms([r["total"] for r in records], per=n)
    _table(
        ["stage (wall ms per image, measured under full load)", "ceiling", "pipeline"],
        [*rows, *extra, ["  all message handling, summed", None, pipeline_total]],
        title="== Per stage (thread time, incl. waiting for the GIL, a core, the shim's lock)",
    )
    _table(
        ["actor", "messages", "wait p50 ms", "wait p95 ms", "wait mean ms", "in actor ms", "hooks ms"],
        [
            [
                actor,
                len(rows),
                _pct([r["queue_wait"] for r in rows], 0.5),
                _pct([r["queue_wait"] for r in rows], 0.95),
                _ms([r["queue_wait"] for r in rows]),
                _ms([r["actor_time"] for r in rows]),
                _ms([r["total"] - r["actor_time"] for r in rows]),
            ]
            for actor in ACTORS
            if (rows := by_actor.get(actor))
        ],
        title="== Pipeline per actor (queue wait = enqueue → start of processing; per message)",
    )
    busy = sum(r["total"] for r in records)
    threads = pipeline.extra["threads"]
    print(
        f"worker threads busy {100 * busy / (threads * pipeline.seconds):.0f}% of the time "
        f"({busy:.1f} thread-seconds over {threads} threads × {pipeline.seconds:.1f} s); fetch messages wait "
        "behind the backlog (the whole list is enqueued at once), the others show how long started work waits"
    )


def _sum_ms(lists: Iterable[list[float]], *, n: int) -> float:
    return 1000 * sum(sum(values) for values in lists) / n


def _add(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def report_cpu(pipeline: RunResult, ceiling: RunResult, cores: int) -> None:
    roles = [
        "workers",
        "ceiling",
        "dramatiq parent",
        "enqueue CLI",
        "redis-server",
        "mongo-shim",
        "mongod",
        "image server",
    ]
    rows: list[list[Any]] = []
    for role in roles:
        if role not in pipeline.cpu and role not in ceiling.cpu:
            continue
        p = 1000 * pipeline.cpu[role] / pipeline.images if role in pipeline.cpu else None
        c = 1000 * ceiling.cpu[role] / ceiling.images if role in ceiling.cpu else None
        rows.append([role, c, p])

    def ours(result: RunResult) -> float:
        return sum(cpu for role, cpu in result.cpu.items() if role != OTHERS)

    rows.append(
        [
            "total, this benchmark",
            1000 * ours(ceiling) / ceiling.images,
            1000 * ours(pipeline) / pipeline.images,
        ]
    )

    def busy(result: RunResult, seconds: float) -> str:
        return f"{100 * seconds / (cores * result.extra['window']):.0f}%"

    rows.append(
        [
            f"cores busy with this benchmark ({cores})",
            busy(ceiling, ours(ceiling)),
            busy(pipeline, ours(pipeline)),
        ]
    )
    rows.append(
        [
            f"cores busy with {OTHERS}",
            busy(ceiling, ceiling.cpu[OTHERS]),
            busy(pipeline, pipeline.cpu[OTHERS]),
        ]
    )
    _table(
        ["CPU ms per image, by process", "ceiling", "pipeline"],
        rows,
        title="== Where the CPU goes (per image; from the start signal to the end of the run)",
    )
    cpu_ratio = (ours(ceiling) / ceiling.images) / (ours(pipeline) / pipeline.images)
    print(
        f"CPU per image, ceiling / pipeline: {cpu_ratio:.2f} — the throughput ratio to expect once this "
        "benchmark alone saturates the cores"
    )
    if (
        max(ceiling.cpu[OTHERS] / ceiling.extra["window"], pipeline.cpu[OTHERS] / pipeline.extra["window"])
        > 0.1
    ):
        print(
            "note: other processes used more than 10% of a core during a run: the throughput figures are "
            "disturbed, the CPU figures much less"
        )


def report_memory(pipeline: RunResult, ceiling: RunResult) -> None:
    rows = []
    for result in (pipeline, ceiling):
        for role, peaks in result.rss.items():
            rows.append([f"{result.name}: {role}", len(peaks), ", ".join(f"{p / MB:.0f}" for p in peaks)])
    _table(["process", "count", "peak RSS MB (each, sampled every 0.2 s)"], rows, title="== Memory")


def report_redis(pipeline: RunResult, image_bytes: float) -> None:
    stats = pipeline.extra["redis"]
    n = pipeline.images
    commands = sorted(
        (
            (name.removeprefix("cmd "), calls)
            for name, calls in stats.items()
            if name.startswith("cmd ") and calls
        ),
        key=lambda item: -item[1],
    )
    total = sum(calls for _, calls in commands)
    rows: list[list[Any]] = [[name, calls / n] for name, calls in commands if calls / n >= 0.01]
    rows.append(["all commands", total / n])
    png = pipeline.extra["png_mean"]
    rows.append(
        [
            f"kB into Redis (body + PNG parked once: {(image_bytes + png) / 1024:.0f})",
            stats["bytes in"] / n / 1024,
        ]
    )
    rows.append(
        [
            f"kB out of Redis (body read twice + PNG once: {(2 * image_bytes + png) / 1024:.0f})",
            stats["bytes out"] / n / 1024,
        ]
    )
    _table(
        ["Redis, per image (pipeline)", "per image"],
        rows,
        title=f"== Redis traffic (evalsha = Dramatiq's Lua scripts: enqueue, fetch, ack; "
        f"source {image_bytes / 1024:.0f} kB and grayscale PNG {png / 1024:.0f} kB mean)",
    )


def report_levels(levels: list[imaging_bench.LevelResult], current: int) -> None:
    base = next((r for r in levels if r.level == current), levels[-1])
    _table(
        [
            "PNG compress_level",
            "ms/image",
            "images/s/core",
            "mean PNG kB",
            "size vs level " + str(current),
            "time vs level " + str(current),
        ],
        [
            [
                f"{r.level}{' (current default)' if r.level == current else ''}",
                r.ms_per_image,
                1000 / r.ms_per_image,
                r.png_bytes / r.images / 1024,
                f"{r.png_bytes / base.png_bytes:.2f}×",
                f"{r.seconds / base.seconds:.2f}×",
            ]
            for r in levels
        ],
        title=f"== to_grayscale by PNG compress_level ({levels[0].images} images of the set, one core, "
        f"sources {levels[0].source_bytes / levels[0].images / 1024:.0f} kB mean)",
    )
    smallest = min(r.png_bytes for r in levels)
    pick = min((r for r in levels if r.png_bytes <= 1.2 * smallest), key=lambda r: r.seconds)
    print(
        f"fastest level whose PNGs are within 20% of the smallest: {pick.level} "
        f"({base.seconds / pick.seconds:.1f}× faster than level {current}, "
        f"{100 * (pick.png_bytes / base.png_bytes - 1):+.0f}% bytes)"
    )


def report_large(results: list[imaging_bench.LargeImageResult]) -> None:
    _table(
        ["4000×3000 photo (JPEG)", "seconds", "peak RSS MB", "over baseline MB", "source MB", "PNG MB"],
        [
            [
                f"to_grayscale, level {r.level}",
                r.seconds,
                r.peak_rss / MB,
                (r.peak_rss - r.baseline_rss) / MB,
                r.source_bytes / MB,
                r.png_bytes / MB,
            ]
            for r in results
        ],
        title="== A large photo (a fresh process each; peak RSS = VmHWM, i.e. ru_maxrss; RGB 36 MB, L 12 MB)",
    )


# ---------------------------------------------------------------------------------------------


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
        "--actors",
        default=None,
        help="run `dramatiq MODULE` instead (e.g. benchmarks.variants, see BENCH_VARIANT; no stage table)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where generated images are cached")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="crawl 16×16 PNGs instead of photos: no pixel work, both sides show their fixed cost per image",
    )
    args = parser.parse_args(argv)
    args.ceiling_threads = args.ceiling_threads or args.threads
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
        redis, redis_url = start_redis(work)
        stack.callback(stop_group, redis)
        services = {"redis-server": redis.pid}
        mongo_uri = os.environ.get("MONGO_URI")
        if mongo_uri:
            mongo_pid = listening_pid(mongo_uri)
            what = f"MongoDB at MONGO_URI ({urlsplit(mongo_uri).netloc})"
        else:
            shim, mongo_uri = start_mongo_shim(work)
            stack.callback(stop_group, shim)
            mongo_pid = shim.pid
            what = "the mongo shim of ../shared/tools, started for this run"
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
        env = dict(os.environ, REDIS_URL=redis_url, MONGO_URI=mongo_uri, FETCH_ALLOW_PRIVATE="1")
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
        module = args.actors or ("image_crawler.actors" if args.plain else "benchmarks.instrumented_actors")
        if module == "benchmarks.variants":
            module += f" (BENCH_VARIANT={os.environ.get('BENCH_VARIANT', 'md5-in-fetch')})"
        print(
            f"pipeline: dramatiq {module} "
            f"--processes {args.processes} --threads "
            f"{args.threads}; Redis {redis_url}; ceiling: {args.processes} processes × "
            f"{args.ceiling_threads} threads; PNG_COMPRESS_LEVEL={settings.png_compress_level}, "
            f"MAX_IMAGE_PIXELS={settings.max_image_pixels}, FETCH_ALLOW_PRIVATE=1 (the server is local)"
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

    report_throughput(pipelines, ceilings)
    if len(pipelines) > 1:
        print("\nThe tables below are those of the best run of each side.")
    pipeline, ceiling = _best(pipelines), _best(ceilings)
    if pipeline.extra["records"]:
        report_stages(pipeline, ceiling)
    report_cpu(pipeline, ceiling, cores)
    report_redis(pipeline, statistics.mean(sizes))
    report_memory(pipeline, ceiling)
    if levels:
        report_levels(levels, settings.png_compress_level)
    if large:
        report_large(large)


if __name__ == "__main__":
    main()
