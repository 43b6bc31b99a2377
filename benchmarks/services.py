"""The processes a benchmark run needs, each in its own process group, and a sampler watching them.

Everything a benchmark starts is stopped by its own process group id (never by name), so a run
cannot touch anyone else's redis-server, shim or workers on the machine. redis-server and the
mongo shim are started by ``tests.support.services``, which the test suite uses too.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from tests.support.processes import crawl_environment, worker_command
from tests.support.services import REPO, stop_group


def start_group(command: list[str], *, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """``command`` run from the repository root in a process group of its own (for :func:`stop_group`)."""
    return subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **popen)


def start_workers(
    module: str,
    env: dict[str, str],
    *,
    processes: int,
    threads: int,
    output: int | IO[bytes] = subprocess.DEVNULL,
) -> subprocess.Popen:
    """``dramatiq MODULE`` workers with this checkout on their path, both their streams to ``output``."""
    command = worker_command(module, processes=processes, threads=threads, path=REPO)
    return start_group(command, env=env, stdout=output, stderr=output)


def crawl_env(redis_url: str, mongo_uri: str) -> dict[str, str]:
    """The environment of a benchmark's workers and ``image-crawler``: this one, on its own stores.

    ``HOST_CONCURRENCY`` is 0 (no per-host limit) unless the environment sets it: one local
    server stands in for the many hosts of a real list, and the default of 8 requests at once to
    one host would cap every benchmark at 8 downloads in flight, whatever the workers could do.
    """
    env = crawl_environment(redis_url, mongo_uri)
    env.setdefault("HOST_CONCURRENCY", "0")
    return env


def start_image_server(directory: Path) -> tuple[subprocess.Popen, int]:
    """benchmarks/server.py serving ``directory``; returns it and its port."""
    process = start_group(
        [sys.executable, "-m", "benchmarks.server", str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("port "):
        stop_group(process)
        raise RuntimeError(f"the image server did not start: {line!r}")
    return process, int(line.split()[1])


def listening_pid(uri: str) -> int | None:
    """The pid of the local process listening on the first host of a ``mongodb://`` URI, if it is local."""
    host_port = uri.split("://", 1)[-1].split("/", 1)[0].split(",", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.rpartition(":") if ":" in host_port else (host_port, "", "27017")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return None
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == int(port):
                return connection.pid
    except (psutil.Error, ValueError):
        pass
    return None


def is_mongo_shim(pid: int) -> bool:
    """Whether ``pid`` is the mongomock-backed shim rather than a real mongod."""
    try:
        return any("mongo_shim" in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


@dataclass
class ProcessStats:
    """What the sampler saw of one process."""

    role: str
    pid: int
    peak_rss: int = 0
    cpu_start: float | None = None
    cpu_end: float | None = None
    #: The CPU time of the last sample, for a process that ended before the measurement did.
    cpu_last: float | None = None
    #: The same, for the kernel's share (system time) alone.
    system_start: float | None = None
    system_end: float | None = None
    system_last: float | None = None

    @property
    def cpu(self) -> float:
        """CPU seconds (user + system) from :meth:`Sampler.mark_start` to :meth:`Sampler.mark_end`."""
        return _spent(self.cpu_start, self.cpu_end, self.cpu_last)

    @property
    def system(self) -> float:
        """The part of :attr:`cpu` spent in the kernel (system time)."""
        return _spent(self.system_start, self.system_end, self.system_last)


def _spent(start: float | None, end: float | None, last: float | None) -> float:
    """Seconds from ``start`` to ``end``, or to ``last`` for a process gone before the end (0: not seen)."""
    end = end if end is not None else last
    return 0.0 if start is None or end is None else end - start


def _cpu(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) and system seconds of a process so far."""
    times = process.cpu_times()
    return float(times.user + times.system), float(times.system)


@dataclass
class Sampler:
    """Samples RSS (peak) and CPU time of a changing set of processes from a background thread.

    ``watch`` maps a role to a callable returning the pids playing it now (worker processes
    come and go with their parent, so the set is looked up on every sample).
    """

    watch: dict[str, Callable[[], Iterable[int]]]
    interval: float = 0.2
    stats: dict[int, ProcessStats] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _phase: str = "before"
    _system: list[float] = field(default_factory=list)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mark_start(self) -> None:
        """Take the CPU baseline of every watched process now."""
        with self._lock:
            self._phase = "during"
            self._sample(set_start=True)
            self._system = [_system_busy(), time.monotonic()]

    def mark_end(self) -> None:
        """Read the CPU time of every watched process now (call before stopping them)."""
        with self._lock:
            self._sample(set_end=True)
            self._phase = "after"
            self._system += [_system_busy(), time.monotonic()]

    @property
    def system_cpu(self) -> float:
        """CPU seconds the whole machine (every process, ours or not) spent during the measurement."""
        return self._system[2] - self._system[0] if len(self._system) == 4 else 0.0

    @property
    def seconds(self) -> float:
        """How long the measurement lasted."""
        return self._system[3] - self._system[1] if len(self._system) == 4 else 0.0

    def by_role(self) -> dict[str, list[ProcessStats]]:
        """The processes seen, grouped by role."""
        roles: dict[str, list[ProcessStats]] = {}
        for stat in self.stats.values():
            roles.setdefault(stat.role, []).append(stat)
        return roles

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._sample()

    def _sample(self, *, set_start: bool = False, set_end: bool = False) -> None:
        for role, pids in self.watch.items():
            try:
                current = list(pids())
            except psutil.Error:
                continue
            for pid in current:
                try:
                    process = psutil.Process(pid)
                    rss = process.memory_info().rss
                    cpu, system = _cpu(process)
                except psutil.Error:
                    continue
                stat = self.stats.setdefault(pid, ProcessStats(role, pid))
                stat.peak_rss = max(stat.peak_rss, rss)
                if set_start or (stat.cpu_start is None and self._phase == "during"):
                    # A process born during the measurement counts from zero.
                    stat.cpu_start = cpu if set_start else 0.0
                    stat.system_start = system if set_start else 0.0
                if self._phase == "during":
                    stat.cpu_last, stat.system_last = cpu, system
                if set_end:
                    stat.cpu_end, stat.system_end = cpu, system


def _system_busy() -> float:
    times = psutil.cpu_times()
    # guest time is already counted in user time; steal is time the hypervisor gave to others.
    idle = sum(getattr(times, name, 0.0) for name in ("idle", "iowait", "guest", "guest_nice", "steal"))
    return float(sum(times) - idle)


def tree(pid: int) -> Callable[[], list[int]]:
    """The pids of ``pid`` and its descendants (empty once it is gone)."""

    def pids() -> list[int]:
        try:
            parent = psutil.Process(pid)
            return [pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    return pids


def children_of(pid: int) -> Callable[[], list[int]]:
    """The pids of the descendants of ``pid``, not ``pid`` itself."""

    def pids() -> list[int]:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    return pids


def just(pid: int) -> Callable[[], list[int]]:
    """``pid`` alone."""
    return lambda: [pid]
