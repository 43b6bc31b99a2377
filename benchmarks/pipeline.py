#!/usr/bin/env python3
"""``make bench``: the pipeline end to end against the machine's ceiling, on the same cores (issue 6).

1. Serves a few thousand distinct photo-like images (benchmarks/images.py, cached) from a local
   HTTP server (benchmarks/server.py) and starts a private redis-server; MongoDB is ``MONGO_URI``,
   or else the mongo shim of ``../shared/tools``, started for the run.
2. **Pipeline**: ``dramatiq benchmarks.instrumented_actors`` workers (the project's actors plus
   timing middleware) and ``image-crawler enqueue URLS --wait``, at the settings of the
   environment (``BATCH_SIZE``, ``FETCH_CONCURRENCY``, ``PNG_COMPRESS_LEVEL``…: the defaults
   users get unless set).
3. **Ceiling**: the same work in a plain loop with no queue (benchmarks/ceiling.py), one process
   per core, writing the same documents and GridFS files, batch by batch as ``collect`` does, to a
   fresh database of the same MongoDB.
4. ``to_grayscale`` alone: the PNG compression levels on the image set, and a 4000×3000 photo.

Prints tables, the issue's targets among them (CPU efficiency ≥ 0.90, wall-clock ratio ≥ 0.85,
redis-server ≤ 0.25 ms of CPU per image), and whether each run met them; asserts nothing about
time. ``--help`` lists the knobs.
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
from image_crawler.config import Settings, load_settings

ACTORS = ("admit", "fetch", "md5", "grayscale", "collect", "record_failure", "record_admit_failure")
#: The MongoDB endpoint's role, whichever it is.
MONGO_ROLES = ("mongo-shim", "mongod")
#: What the pipeline's processes are, in the CPU efficiency: everything it runs but the image server.
PIPELINE_ROLES = ("workers", "dramatiq parent", "enqueue CLI", "redis-server", *MONGO_ROLES)
CEILING_ROLES = ("ceiling", *MONGO_ROLES)
#: The issue's targets.
TARGET_CPU_EFFICIENCY = 0.90
TARGET_WALL_RATIO = 0.85
TARGET_REDIS_MS = 0.25
#: The ceiling writes as many images at a time as a fetch message carries by default, whatever
#: BATCH_SIZE the pipeline runs at: a sweep of BATCH_SIZE compares the pipeline to one ceiling.
CEILING_BATCH = Settings().batch_size
#: How long to wait, after the last outcome, for the pipeline to finish (collect deletes what it
#: parked in Redis after recording the outcomes).
IDLE_TIMEOUT_S = 60
MB = 1024 * 1024
CORES = os.cpu_count() or 1


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
    system: dict[str, float] = field(default_factory=dict)  # role → kernel CPU seconds during the run
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
    env = dict(env, MONGO_URI=_database_uri(env["MONGO_URI"], database), BENCH_STAGE_DIR=str(stage_dir))
    module = "image_crawler.actors" if args.plain else "benchmarks.instrumented_actors"
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
    # The clock starts when `enqueue` sends its first batch (admit messages are sent by the CLI,
    # so their enqueue time is their message_timestamp); without records, when it was launched.
    admits = [r for r in records if r["actor"] == "admit"]
    first = min((r["message_timestamp"] for r in admits), default=launched * 1000) / 1000
    end = last["ended_at"].timestamp() if last else exited
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
            "reasons": {row["_id"]: row["n"] for row in reasons},
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
    """Wait until the (fresh) database holds an outcome per URL, polling its cheapest count."""
    expected = sum(1 for line in urls.read_text().splitlines() if line.strip())
    db = storage.connect(load_settings(env))
    try:
        while storage.outcomes(db).estimated_document_count() < expected:
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
    keys = list(client.scan_iter(match="dramatiq:*.msgs", count=1000))
    return sum(int(client.hlen(key)) for key in keys if not key.endswith(b".XQ.msgs"))


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
    ("dramatiq:", "Dramatiq broker (queues, acks, heartbeats)"),
)


def _keys_by_kind(client: redis.Redis) -> dict[str, list[int]]:
    """Keys left in Redis and their memory (MEMORY USAGE), by kind: ``kind → [keys, bytes]``."""
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for raw in client.scan_iter(count=1000):
        name = raw.decode(errors="replace")
        kind = next((what for prefix, what in _KEY_KINDS if name.startswith(prefix)), None)
        if kind is None:
            bare = name.removesuffix("@members")
            if len(bare) == 32 and all(c in "0123456789abcdef" for c in bare):
                kind = "results (Results middleware)"
            elif len(bare) == 36 and bare.count("-") == 4:
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
                "--batch",
                str(args.ceiling_batch),
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


def _cpu_of(result: RunResult, roles: Iterable[str]) -> float:
    """CPU seconds of the processes playing ``roles`` during the run."""
    return sum(result.cpu.get(role, 0.0) for role in roles)


def _cpu_of_system(result: RunResult, roles: Iterable[str]) -> float:
    """Kernel (system) CPU seconds of the processes playing ``roles`` during the run."""
    return sum(result.system.get(role, 0.0) for role in roles)


def _cpu_per_image(result: RunResult) -> float:
    """CPU ms per image of every process of the benchmark (the image server included)."""
    return 1000 * sum(cpu for role, cpu in result.cpu.items() if role != OTHERS) / result.images


def _efficiency_cpu(result: RunResult) -> float:
    """CPU ms per image of the processes the CPU efficiency counts for this side."""
    roles = PIPELINE_ROLES if result.name == "pipeline" else CEILING_ROLES
    return 1000 * _cpu_of(result, roles) / result.images


def _redis_commands(result: RunResult) -> dict[str, int]:
    """Calls per Redis command during the run, without the benchmark's own probes."""
    return {
        name.removeprefix("cmd "): calls
        for name, calls in result.extra["redis"].items()
        if name.startswith("cmd ") and calls and name.removeprefix("cmd ") not in _PROBE_COMMANDS
    }


#: Commands only the benchmark sends (INFO, SCAN, HLEN, MEMORY USAGE); the pipeline sends none.
_PROBE_COMMANDS = ("info", "scan", "hlen", "memory|usage", "flushall", "ping")


def _best(results: list[RunResult]) -> RunResult:
    return max(results, key=lambda result: result.rate)


def report_targets(pipelines: list[RunResult], ceilings: list[RunResult]) -> None:
    """The issue's targets, for each run (a pipeline run and the ceiling run after it)."""
    pairs = list(zip(pipelines, ceilings, strict=True))
    runs = [f"run {n}" for n in range(1, len(pairs) + 1)] if len(pairs) > 1 else ["value"]

    def row(label: str, values: list[float], target: str | None = None, ok=None) -> list[Any]:
        cells: list[Any] = [f"{v:.2f}" if abs(v) < 10 else f"{v:,.1f}" for v in values]
        met = None if ok is None else ("yes" if all(ok(v) for v in values) else "NO")
        return [label, *cells, target, met]

    efficiency = [_efficiency_cpu(c) / _efficiency_cpu(p) for p, c in pairs]
    wall = [p.rate / c.rate for p, c in pairs]
    redis_ms = [1000 * p.cpu.get("redis-server", 0.0) / p.images for p, _ in pairs]
    rows = [
        row(
            "CPU efficiency (CPU per image: ceiling / pipeline)",
            efficiency,
            f"≥ {TARGET_CPU_EFFICIENCY:.2f}",
            lambda v: v >= TARGET_CPU_EFFICIENCY,
        ),
        row(
            "wall-clock ratio (images/s: pipeline / ceiling)",
            wall,
            f"≥ {TARGET_WALL_RATIO:.2f}",
            lambda v: v >= TARGET_WALL_RATIO,
        ),
        row(
            "redis-server CPU ms per image",
            redis_ms,
            f"≤ {TARGET_REDIS_MS:.2f}",
            lambda v: v <= TARGET_REDIS_MS,
        ),
        row(
            "  pipeline CPU ms per image (workers, dramatiq parent, redis, MongoDB, enqueue)",
            [_efficiency_cpu(p) for p, _ in pairs],
        ),
        row(
            "  ceiling CPU ms per image (ceiling processes, MongoDB)", [_efficiency_cpu(c) for _, c in pairs]
        ),
        row(
            "  CPU efficiency without the MongoDB endpoint on either side (our processes only)",
            [
                (_cpu_of(c, ["ceiling"]) / c.images)
                / (_cpu_of(p, [r for r in PIPELINE_ROLES if r not in MONGO_ROLES]) / p.images)
                for p, c in pairs
            ],
        ),
        row("  pipeline images/s", [p.rate for p, _ in pairs]),
        row("  ceiling images/s", [c.rate for _, c in pairs]),
        row(
            "Redis commands per image (INFO commandstats, scripts' inner calls included)",
            [sum(_redis_commands(p).values()) / p.images for p, _ in pairs],
        ),
        row(
            "Redis kB per image (total_net_input_bytes + total_net_output_bytes)",
            [
                (p.extra["redis"]["bytes in"] + p.extra["redis"]["bytes out"]) / p.images / 1024
                for p, _ in pairs
            ],
        ),
        row(
            "peak RSS of a worker process, MB (the largest)",
            [max(p.rss.get("workers", [0])) / MB for p, _ in pairs],
        ),
        row(
            "Redis used_memory once the pipeline was idle, MB",
            [list(p.extra["redis_memory"].values())[-1] / MB for p, _ in pairs],
        ),
        row(
            "  Redis used_memory before the run, MB",
            [p.extra["redis_memory"]["before the run"] / MB for p, _ in pairs],
        ),
        row(
            "  % of the cores other processes (not ours) took during the pipeline run",
            [100 * p.cpu[OTHERS] / (CORES * p.extra["window"]) for p, _ in pairs],
        ),
        row(
            "  % of the cores other processes (not ours) took during the ceiling run",
            [100 * c.cpu[OTHERS] / (CORES * c.extra["window"]) for _, c in pairs],
        ),
    ]
    _table(
        ["target (defaults users get: the settings shown above)", *runs, "target", "met"],
        rows,
        title="== Targets (each run: the pipeline, then the ceiling on the same cores and image list)",
    )
    if not any(role in p.cpu for p, _ in pairs for role in MONGO_ROLES):
        print("note: MongoDB is not a local process here: its CPU is in neither side of the efficiency")


def report_throughput(pipelines: list[RunResult], ceilings: list[RunResult]) -> None:
    pipeline, ceiling = _best(pipelines), _best(ceilings)
    waited = "--wait" if "--wait" in pipeline.extra["cli"] else "without --wait, then a cheap poll"
    rows: list[list[Any]] = []
    for side, results in (
        ("pipeline (first batch sent → last outcome)", pipelines),
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
        title="== Throughput (CPU: all the processes of the benchmark, the image server included, per image)",
    )
    for result in (*pipelines, *ceilings):
        counts = ", ".join(f"{n} {name}" for name, n in result.counts.items())
        print(f"{result.name}: {counts}; images stored {result.extra['stored']}", end="")
        if result.extra.get("reasons"):
            print(f"; errors: {result.extra['reasons']}", end="")
        if result.extra.get("errors"):
            print(f"; errors: {result.extra['errors'][:3]}", end="")
        print()
    logged = pipeline.extra.get("log_lines", {})
    if logged:
        print(
            "lines the workers logged, by logger: "
            + ", ".join(f"{name} {n}" for name, n in sorted(logged.items(), key=lambda item: -item[1])[:6])
        )


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
        for label, seconds in record.get("download_spans", {}).items():
            span_totals[(record["actor"], label)].append(seconds)

    def span(actor: str, label: str) -> float | None:
        return _ms(span_totals.pop((actor, label), []), per=n)

    def rest(actor: str) -> float | None:
        rows = by_actor.get(actor, [])
        if not rows:
            return None
        return _ms([r["actor_time"] - sum(r["spans"].values()) for r in rows], per=n)

    rows = [
        [
            "http download (fetch: on the download threads)",
            _ms(ceiling.stages["http download"]),
            span("fetch", "http download"),
        ],
        ["md5 (md5: the actor less its claim reads)", _ms(ceiling.stages["md5"]), rest("md5")],
        ["to_grayscale", _ms(ceiling.stages["to_grayscale"]), span("grayscale", "to_grayscale")],
        [
            "mongo: look up MD5s, store new images",
            _ms(ceiling.stages["mongo store images"]),
            _add(span("collect", "mongo image_jobs"), span("collect", "mongo store_new_images")),
        ],
        [
            "mongo: record outcomes",
            _ms(ceiling.stages["mongo record outcomes"]),
            _add(*(span(actor, "mongo record_outcomes") for actor in ACTORS)),
        ],
    ]
    rows.append(
        [
            "  work the ceiling does too, summed",
            _sum_ms(ceiling.stages.values(), n=ceiling.images),
            _add(*(row[2] for row in rows)),
        ]
    )
    extra: list[list[Any]] = [
        [
            "fetch: download queued (waiting for one of FETCH_CONCURRENCY download threads)",
            None,
            span("fetch", "download queued"),
        ],
    ]
    for actor in ACTORS:
        for owner, label in sorted(key for key in span_totals if key[0] == actor):
            extra.append([f"{actor}: {label}", None, span(owner, label)])
        if actor in by_actor and actor != "md5":
            note = " (mostly waiting for its downloads)" if actor == "fetch" else ""
            extra.append([f"{actor}: rest of the actor{note}", None, rest(actor)])
    extra.append(
        [
            "middleware hooks (CrashGuard mark, results, group barrier, callback, retries)",
            None,
            _ms([r["total"] - r["actor_time"] for r in records], per=n),
        ]
    )
    pipeline_total = _ms([r["total"] for r in records], per=n)
    _table(
        ["stage (wall ms per image, measured under full load)", "ceiling", "pipeline"],
        [*rows, *extra, ["  all message handling (worker threads), summed", None, pipeline_total]],
        title="== Per stage (thread time, incl. waiting for the GIL, a core, the shim's lock)",
    )
    _table(
        [
            "actor",
            "messages",
            "lines/msg",
            "wait p50 ms",
            "wait p95 ms",
            "wait mean ms",
            "in actor ms",
            "hooks ms",
        ],
        [
            [
                actor,
                len(rows),
                sum(r.get("lines", 0) for r in rows) / len(rows),
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
        "behind the backlog (the whole list is admitted at once), the others show how long started work waits"
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

    def per_image(result: RunResult, seconds: dict[str, float], role: str) -> float | None:
        return 1000 * seconds[role] / result.images if role in seconds else None

    for role in roles:
        if role not in pipeline.cpu and role not in ceiling.cpu:
            continue
        rows.append(
            [
                role,
                per_image(ceiling, ceiling.cpu, role),
                per_image(ceiling, ceiling.system, role),
                per_image(pipeline, pipeline.cpu, role),
                per_image(pipeline, pipeline.system, role),
            ]
        )

    def efficiency_system(result: RunResult) -> float:
        roles = PIPELINE_ROLES if result.name == "pipeline" else CEILING_ROLES
        return 1000 * _cpu_of_system(result, roles) / result.images

    rows.append(
        [
            "total counted by the CPU efficiency (all but the image server)",
            _efficiency_cpu(ceiling),
            efficiency_system(ceiling),
            _efficiency_cpu(pipeline),
            efficiency_system(pipeline),
        ]
    )

    def ours(result: RunResult) -> float:
        return sum(cpu for role, cpu in result.cpu.items() if role != OTHERS)

    rows.append(["total, this benchmark", _cpu_per_image(ceiling), None, _cpu_per_image(pipeline), None])

    def busy(result: RunResult, seconds: float) -> str:
        return f"{100 * seconds / (cores * result.extra['window']):.0f}%"

    rows.append(
        [
            f"cores busy with this benchmark ({cores})",
            busy(ceiling, ours(ceiling)),
            None,
            busy(pipeline, ours(pipeline)),
            None,
        ]
    )
    rows.append(
        [
            f"cores busy with {OTHERS}",
            busy(ceiling, ceiling.cpu[OTHERS]),
            None,
            busy(pipeline, pipeline.cpu[OTHERS]),
            None,
        ]
    )
    _table(
        ["CPU ms per image, by process", "ceiling", "of it kernel", "pipeline", "of it kernel"],
        rows,
        title="== Where the CPU goes (per image; pipeline: from launching `enqueue` until no message is "
        "left; ceiling: from go to the end)",
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
    _table(
        ["Redis used_memory (pipeline)", "MB"],
        [[moment, used / MB] for moment, used in pipeline.extra["redis_memory"].items()],
        title="== Redis memory (INFO memory used_memory)",
    )
    left = pipeline.extra["redis_keys_left"]
    _table(
        ["keys left in Redis once the pipeline was idle", "keys", "kB (MEMORY USAGE)"],
        [[kind, keys, size / 1024] for kind, (keys, size) in sorted(left.items())] or [["none", 0, 0.0]],
    )


def report_redis(pipeline: RunResult, image_bytes: float) -> None:
    stats = pipeline.extra["redis"]
    n = pipeline.images
    commands = sorted(_redis_commands(pipeline).items(), key=lambda item: -item[1])
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
    rows.append(["kB in + out", (stats["bytes in"] + stats["bytes out"]) / n / 1024])
    _table(
        ["Redis, per image (pipeline)", "per image"],
        rows,
        title=f"== Redis traffic (INFO commandstats, without the benchmark's own probes; evalsha = Lua "
        f"scripts, whose inner calls are counted too; source {image_bytes / 1024:.0f} kB and grayscale "
        f"PNG {png / 1024:.0f} kB mean)",
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
        # One local server stands in for the many hosts of a real list: no per-host limit.
        env.setdefault("HOST_CONCURRENCY", "0")
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
    report_targets(pipelines, ceilings)
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
