"""The tables of ``python -m benchmarks.pipeline``: what the two sides of a run measured, compared.

:class:`RunResult` is what :mod:`benchmarks.pipeline` measures of one side (the pipeline or the
ceiling) in one run; :func:`report` prints every table from the runs, the performance targets first.
Nothing here starts a process or reads a store.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import imaging_bench
from image_crawler.broker import ACTOR_NAMES

#: The pipeline's actors (image_crawler.actors) in the order of the flow, for the per-actor rows.
ACTORS = ACTOR_NAMES
#: The MongoDB endpoint's role, whichever it is.
MONGO_ROLES = ("mongo-shim", "mongod")
#: What the pipeline's processes are, in the CPU efficiency: everything it runs but the image server.
PIPELINE_ROLES = ("workers", "dramatiq parent", "enqueue CLI", "redis-server", *MONGO_ROLES)
CEILING_ROLES = ("ceiling", *MONGO_ROLES)
#: The pipeline's performance targets (benchmarks/README.md, "Reading the output").
TARGET_CPU_EFFICIENCY = 0.90
TARGET_WALL_RATIO = 0.85
TARGET_REDIS_MS = 0.25
MB = 1024 * 1024
CORES = os.cpu_count() or 1
#: Whatever else ran on the machine meanwhile, as a role.
OTHERS = "other processes (not ours)"


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
    """The performance targets, for each run (a pipeline run and the ceiling run after it)."""
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


def report(
    pipelines: list[RunResult],
    ceilings: list[RunResult],
    *,
    image_bytes: float,
    levels: list[imaging_bench.LevelResult],
    large: list[imaging_bench.LargeImageResult],
    compress_level: int,
    cores: int = CORES,
) -> None:
    """Every table: throughput and targets of each run, then the best run of each side in detail.

    ``image_bytes`` is the mean size of the images crawled; ``levels`` and ``large`` are the
    ``to_grayscale`` measurements (empty when skipped), ``compress_level`` the configured level.
    """
    report_throughput(pipelines, ceilings)
    report_targets(pipelines, ceilings)
    if len(pipelines) > 1:
        print("\nThe tables below are those of the best run of each side.")
    pipeline, ceiling = _best(pipelines), _best(ceilings)
    if pipeline.extra["records"]:
        report_stages(pipeline, ceiling)
    report_cpu(pipeline, ceiling, cores)
    report_redis(pipeline, image_bytes)
    report_memory(pipeline, ceiling)
    if levels:
        report_levels(levels, compress_level)
    if large:
        report_large(large)
