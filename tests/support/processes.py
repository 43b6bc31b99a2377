"""Real processes for multi-process tests: `dramatiq` CLI workers and the `image-crawler` command.

The benchmarks use the commands and the environment built here too (as ``tests.support.processes``;
see ``tests/support/services.py``), so this module imports its siblings relatively.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .services import stop_group


def worker_command(
    *modules: str, processes: int, threads: int, queues: tuple[str, ...] = (), path: Path | None = None
) -> list[str]:
    """The argv of `dramatiq MODULES --processes P --threads T` in this environment (``--path``
    puts a directory on the workers' ``sys.path``; ``--queues`` comes last: it takes the rest)."""
    command = [sys.executable, "-m", "dramatiq", *modules]
    if path is not None:
        command += ["--path", str(path)]
    command += ["--processes", str(processes), "--threads", str(threads)]
    if queues:
        command += ["--queues", *queues]
    return command


#: Settings of the end-to-end crawls: a failing URL is tried twice, within 5 s, and the workers'
#: output is not held back in buffers (the tests read their logs).
END_TO_END_SETTINGS = {"FETCH_RETRIES": "1", "FETCH_TIMEOUT": "5", "PYTHONUNBUFFERED": "1"}


def crawl_environment(redis_url: str, mongo_uri: str, **settings: str) -> dict[str, str]:
    """This environment, on these stores, with ``FETCH_ALLOW_PRIVATE=1`` (the image servers of the
    tests and benchmarks are local) and these other settings: for workers and ``image-crawler``."""
    return dict(os.environ, REDIS_URL=redis_url, MONGO_URI=mongo_uri, FETCH_ALLOW_PRIVATE="1", **settings)


def start_workers(
    env: dict[str, str],
    processes: int = 2,
    threads: int = 4,
    log: Path | None = None,
    queues: tuple[str, ...] = (),
    modules: tuple[str, ...] = (),
) -> subprocess.Popen:
    """`dramatiq image_crawler.actors [MODULES]` in its own process group (so the group can be signalled).

    ``modules`` are imported by every worker process after the actors (e.g. ``support.poison``;
    ``tests/`` is put on ``PYTHONPATH`` for them).
    """
    command = worker_command(
        "image_crawler.actors", *modules, processes=processes, threads=threads, queues=queues
    )
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    if modules:
        tests = str(Path(__file__).resolve().parent.parent)
        env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")])))
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=output, stderr=output)


def signal_workers(workers: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the whole worker process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(workers.pid, signum)


def stop_workers(workers: subprocess.Popen, timeout: float = 60) -> None:
    """Stop the workers as ``docker compose stop`` does: SIGTERM to the dramatiq CLI only (it
    forwards it: a worker process given a second one exits at once, without its shutdown), and
    SIGKILL to the whole group if it has not stopped within ``timeout``."""
    stop_group(workers, timeout=timeout)


def image_crawler_command(*args: str) -> list[str]:
    """The argv of `image-crawler ARGS` in this environment."""
    return [sys.executable, "-m", "image_crawler", *args]


def image_crawler(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `image-crawler ARGS` to completion."""
    return subprocess.run(
        image_crawler_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def crawl(
    env: dict[str, str], urls: Path, lines: list[str], *, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`image-crawler enqueue URLS --wait` of ``lines``, written to the file ``urls``, while workers run.

    The workers (:func:`start_workers`' defaults) are stopped after; ``timeout`` is enqueue's ``--timeout``.
    """
    urls.write_text("\n".join(lines) + "\n")
    workers = start_workers(env)
    try:
        return image_crawler(env, "enqueue", str(urls), "--wait", "--timeout", str(timeout))
    finally:
        stop_workers(workers)


def run_bounded(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion with ``env`` over this environment; fail the test if it is still
    running after ``timeout`` seconds (a command that hangs, rather than gives up)."""
    try:
        return subprocess.run(
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} was still waiting after {timeout} s")
