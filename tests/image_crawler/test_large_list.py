"""A 1,000,000-line list: `image-crawler enqueue` streams it with flat memory; its rate is measured.

`enqueue` runs as a real process against the test's own redis-server, with no workers and
``--max-in-flight 0``, so every line is left in Redis, in admit messages of 1,000 lines. Its peak RSS is the
kernel's account of the process (``wait4``), compared with a run of 100,000 lines: a streaming
enqueue uses the same memory for both. Rate, RSS and Redis memory are printed (`pytest -s`);
the rate is not asserted (the target is 20,000 URLs/s), it depends on the machine.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dramatiq
import pytest
import redis

from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE
from image_crawler.dramatiq_internals import queue_keys
from support.hostile import ProcessTreeMemory
from support.processes import image_crawler_command, start_workers, stop_workers
from support.services import free_port

pytestmark = pytest.mark.slow

MB = 1024 * 1024
#: Flat memory: a streaming enqueue needs no more than this, however long the file.
MAX_ENQUEUE_RSS = 200 * MB


def _write_urls(path: Path, count: int, port: int) -> None:
    """``count`` distinct image URLs on ``port``, written in blocks."""
    with path.open("w") as file:
        for start in range(0, count, 10_000):
            block = range(start, min(start + 10_000, count))
            file.write("".join(f"http://127.0.0.1:{port}/img/{n}.png\n" for n in block))


def _enqueue(env: dict[str, str], urls: Path, output: Path, timeout: float) -> tuple[str, float, int]:
    """Run `enqueue URLS --max-in-flight 0`; its output, wall time (s) and peak RSS (bytes)."""
    command = image_crawler_command("enqueue", str(urls), "--max-in-flight", "0")
    started = time.perf_counter()
    # The kernel's high-water mark of the process (VmHWM), not wait4's ru_maxrss: that one also
    # counts the memory of the forked test process before exec, hundreds of MB late in a run.
    with (
        output.open("wb") as out,
        ProcessTreeMemory(
            (process := subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)).pid
        ) as memory,
    ):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"enqueue of {urls.name} did not end within {timeout} s")
    elapsed = time.perf_counter() - started
    text = output.read_text()
    assert process.returncode == 0, text
    return text, elapsed, memory.peak


def _queued(client: redis.Redis) -> tuple[int, int, int]:
    """Admit messages stored, admit message ids queued, and distinct URL lines they carry."""
    lines: set[int] = set()
    admit = queue_keys(ADMIT_QUEUE)
    for _, data in client.hscan_iter(admit.messages, count=100):
        lines.update(line for line, _ in dramatiq.Message.decode(data).args[0]["lines"])
    return client.hlen(admit.messages), client.llen(admit.waiting), len(lines)


@pytest.mark.timeout(2400)
def test_a_million_lines_are_enqueued_with_flat_memory(crawl_env, tmp_path):
    env, db = crawl_env
    client = redis.Redis.from_url(env["REDIS_URL"])
    port = free_port()  # nothing listens there, and no worker runs anyway
    small, large = tmp_path / "100k.txt", tmp_path / "1m.txt"
    _write_urls(small, 100_000, port)
    _write_urls(large, 1_000_000, port)

    small_output, small_seconds, small_rss = _enqueue(env, small, tmp_path / "100k.out", timeout=600)
    assert "enqueued 100000 urls (0 rejected lines, 0 blank or comment lines skipped)" in small_output
    assert _queued(client) == (100, 100, 100_000)
    client.flushdb()

    output, seconds, rss = _enqueue(env, large, tmp_path / "1m.out", timeout=2000)
    redis_memory = client.info("memory")["used_memory_human"]
    queued = _queued(client)

    print(
        f"\nenqueue 100,000 lines: {small_seconds:.1f} s, {100_000 / small_seconds:,.0f} URLs/s,"
        f" peak RSS {small_rss / MB:.1f} MB"
        f"\nenqueue 1,000,000 lines: {seconds:.1f} s, {1_000_000 / seconds:,.0f} URLs/s,"
        f" peak RSS {rss / MB:.1f} MB; Redis used_memory_human {redis_memory}"
    )
    assert "enqueued 1000000 urls (0 rejected lines, 0 blank or comment lines skipped)" in output
    assert queued == (1_000, 1_000, 1_000_000)
    assert rss < MAX_ENQUEUE_RSS
    # Ten times the lines, (nearly) the same memory: nothing grows with the file.
    assert rss < 1.5 * small_rss, f"peak RSS grew from {small_rss / MB:.1f} MB to {rss / MB:.1f} MB"
    assert db.outcomes.count_documents({}) == 0  # no line was rejected, no worker ran


@pytest.mark.timeout(900)
def test_workers_admit_every_line_exactly_once_in_fetch_batches(crawl_env, tmp_path):
    """Workers listening only on the admit queue turn 100,000 queued lines into fetch batches."""
    from image_crawler.config import get_settings

    env, _ = crawl_env
    client = redis.Redis.from_url(env["REDIS_URL"])
    urls = tmp_path / "100k.txt"
    _write_urls(urls, 100_000, free_port())
    output, _, _ = _enqueue(env, urls, tmp_path / "enqueue.out", timeout=600)
    run = output.split()[1].rstrip(":")

    started = time.perf_counter()
    workers = start_workers(env, processes=2, threads=1, queues=("admit",), log=tmp_path / "workers.log")
    try:
        deadline = started + 600
        # Admitted once every admit message is acknowledged: a worker acks one only after its
        # transaction queued the fetch messages.
        admit = queue_keys(ADMIT_QUEUE)
        while client.hlen(admit.messages) or client.llen(admit.waiting):
            assert time.perf_counter() < deadline, "lines were not admitted within 600 s"
            time.sleep(0.1)
        seconds = time.perf_counter() - started
    finally:
        stop_workers(workers)

    batches = [
        dramatiq.Message.decode(data).args[0]
        for _, data in client.hscan_iter(queue_keys(FETCH_QUEUE).messages, count=1000)
    ]
    lines = [line for batch in batches for line in batch["lines"]]
    print(
        f"\nadmit 100,000 lines (2 worker processes × 1 thread, start-up included): {seconds:.1f} s,"
        f" {100_000 / seconds:,.0f} URLs/s, {len(batches):,} fetch messages"
    )
    assert sorted(line[0] for line in lines) == list(range(1, 100_001))  # each line once
    assert {batch["run"] for batch in batches} == {run}
    assert max(len(batch["lines"]) for batch in batches) <= get_settings().batch_size
    assert client.llen(queue_keys(FETCH_QUEUE).waiting) == len(batches)
