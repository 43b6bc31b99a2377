"""A 1,000,000-line list: `image-crawler enqueue` streams it with flat memory; its rate is measured.

`enqueue` runs as a real process against the test's own redis-server, with no workers and
``--max-in-flight 0``, so every line becomes a fetch message left in Redis. Its peak RSS is the
kernel's account of the process (``wait4``), compared with a run of 100,000 lines: a streaming
enqueue uses the same memory for both. Rate, RSS and Redis memory are printed (`pytest -s`);
the rate is not asserted (DESIGN's target is 20,000 URLs/s), it depends on the machine.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from support.hostile import ProcessTreeMemory
from support.processes import image_crawler_command
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


def _messages(client: redis.Redis) -> tuple[int, int]:
    """Fetch messages stored, and fetch message ids queued."""
    return client.hlen("dramatiq:fetch.msgs"), client.llen("dramatiq:fetch")


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
    assert _messages(client) == (100_000, 100_000)
    client.flushdb()

    output, seconds, rss = _enqueue(env, large, tmp_path / "1m.out", timeout=2000)
    redis_memory = client.info("memory")["used_memory_human"]
    messages = _messages(client)

    print(
        f"\nenqueue 100,000 lines: {small_seconds:.1f} s, {100_000 / small_seconds:,.0f} URLs/s,"
        f" peak RSS {small_rss / MB:.1f} MB"
        f"\nenqueue 1,000,000 lines: {seconds:.1f} s, {1_000_000 / seconds:,.0f} URLs/s,"
        f" peak RSS {rss / MB:.1f} MB; Redis used_memory_human {redis_memory}"
    )
    assert "enqueued 1000000 urls (0 rejected lines, 0 blank or comment lines skipped)" in output
    assert messages == (1_000_000, 1_000_000)
    assert rss < MAX_ENQUEUE_RSS
    # Ten times the lines, (nearly) the same memory: nothing grows with the file.
    assert rss < 1.5 * small_rss, f"peak RSS grew from {small_rss / MB:.1f} MB to {rss / MB:.1f} MB"
    assert db.outcomes.count_documents({}) == 0  # no line was rejected, no worker ran
