"""Hostile input, real processes: each bad line ends with its reason, the rest succeeds, memory stays bounded.

`dramatiq` CLI workers and `image-crawler enqueue --wait` run as in production, against a local
server that answers with a gzip bomb, a body that never ends, an endless redirect loop and a
40000×40000 PNG; the list also holds a 100 kB line and a line that is not UTF-8. The peak RSS of
every worker process is measured (the kernel's high-water mark) and printed (`pytest -s`).

A redirect to a private address cannot be shown end to end here: the local server is itself on
127.0.0.1, so these workers run with FETCH_ALLOW_PRIVATE=1. ``test_fetching.py`` proves that policy
(``test_redirect_from_a_public_host_to_a_private_address_is_refused`` and the private-address tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from support.hostile import ProcessTreeMemory, bilevel_png, gzip_bomb
from support.http_server import LocalHttpServer
from support.images import png_bytes
from support.processes import image_crawler, start_workers, stop_workers

pytestmark = pytest.mark.slow

MB = 1024 * 1024
#: Generous: a worker process idles at ~100 MB; inflating the bomb or decoding the PNG would take GBs.
MAX_WORKER_RSS = 600 * MB
#: Limits the workers run with (the rest comes from ``crawl_env``: FETCH_RETRIES=1).
LIMITS = {"FETCH_TIMEOUT": "2", "FETCH_MAX_BYTES": str(5 * MB), "FETCH_MAX_REDIRECTS": "5"}


@dataclass(frozen=True)
class Case:
    """One hostile line of a URL list, and how it must end."""

    line: bytes
    reason: str
    #: The server route it hits and how many requests it may cause (None: never fetched).
    path: str | None = None
    requests: int = 0


@functools.cache
def _bomb() -> bytes:
    return gzip_bomb(1024 * MB)  # 1 GiB of zeros in ~1 MB


@functools.cache
def _huge_png() -> bytes:
    return bilevel_png(40_000, 40_000)  # 1.6 gigapixels in ~200 kB


def gzip_bomb_case(server: LocalHttpServer) -> Case:
    server.add("/bomb.png", _bomb(), content_type="image/png", headers={"Content-Encoding": "gzip"})
    return Case(server.url("/bomb.png").encode(), "too large", "/bomb.png", requests=1)


def endless_body_case(server: LocalHttpServer) -> Case:
    # One byte every 0.1 s: every read is far under the 2 s timeout, the whole body takes hours.
    server.add("/endless.png", bytes(100_000), content_type="image/png", drip=0.1)
    # A timeout is transient: tried once more (FETCH_RETRIES=1), then given up.
    return Case(server.url("/endless.png").encode(), "timeout", "/endless.png", requests=2)


def redirect_loop_case(server: LocalHttpServer) -> Case:
    server.add_redirect("/loop", "/loop")
    # The first request and FETCH_MAX_REDIRECTS hops; a permanent error is not retried.
    return Case(server.url("/loop").encode(), "too many redirects", "/loop", requests=6)


def huge_png_case(server: LocalHttpServer) -> Case:
    server.add("/huge.png", _huge_png(), content_type="image/png")
    return Case(server.url("/huge.png").encode(), "too many pixels", "/huge.png", requests=1)


def long_line_case(server: LocalHttpServer) -> Case:
    return Case(server.url("/" + "a" * 100_000).encode(), "url too long")


def invalid_utf8_case(server: LocalHttpServer) -> Case:
    return Case(server.url("/caf").encode() + b"\xe9-\xff\xfe.png", "invalid utf-8")


#: Hostile inputs the workers download; each gets its own run with fresh workers below.
FETCHED: dict[str, Callable[[LocalHttpServer], Case]] = {
    "gzip bomb": gzip_bomb_case,
    "endless body": endless_body_case,
    "redirect loop": redirect_loop_case,
    "40000x40000 png": huge_png_case,
}
#: Hostile lines ``enqueue`` itself rejects.
REJECTED: dict[str, Callable[[LocalHttpServer], Case]] = {
    "100 kB line": long_line_case,
    "invalid utf-8": invalid_utf8_case,
}


def _good_images(server: LocalHttpServer, count: int) -> list[bytes]:
    lines = []
    for n in range(count):
        body = png_bytes(40 + n % 30, 30 + n % 20, seed=70_000 + n)
        server.add(f"/good/{n}.png", body, content_type="image/png")
        lines.append(server.url(f"/good/{n}.png").encode())
    return lines


def _crawl(env: dict[str, str], urls, log) -> tuple:
    """Run `enqueue --wait` on ``urls`` with fresh workers; returns the result and their memory."""
    workers = start_workers({**env, **LIMITS}, processes=2, threads=4, log=log)
    try:
        with ProcessTreeMemory(workers.pid) as memory:
            result = image_crawler(env, "enqueue", str(urls), "--wait", "--timeout", "300")
    finally:
        stop_workers(workers)
    return result, memory


def _assert_bounded(memory: ProcessTreeMemory) -> None:
    assert len(memory.peaks) >= 3, f"the worker processes were not all seen:\n{memory.report()}"
    assert memory.peak < MAX_WORKER_RSS, f"a worker grew past {MAX_WORKER_RSS // MB} MB:\n{memory.report()}"


@pytest.mark.parametrize("name", list(FETCHED))
def test_a_hostile_download_ends_with_its_reason_and_the_rest_succeeds(crawl_env, tmp_path, name):
    env, db = crawl_env
    with LocalHttpServer() as server:
        case = FETCHED[name](server)
        urls = tmp_path / "urls.txt"
        urls.write_bytes(b"\n".join([case.line, *_good_images(server, 30)]) + b"\n")
        result, memory = _crawl(env, urls, tmp_path / "workers.log")
        requests = server.hits(case.path) if case.path else 0

    print(f"\n{name}: peak worker RSS {memory.peak / MB:.1f} MB\n{memory.report()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "done: 31 urls — 30 success, 0 duplicate, 1 error"
    assert db.outcomes.find_one({"line": 1}, {"_id": 0, "outcome": 1, "reason": 1}) == {
        "outcome": "error",
        "reason": case.reason,
    }
    assert requests == case.requests
    assert db.images.count_documents({}) == 30
    _assert_bounded(memory)


def test_a_list_mixing_good_images_with_every_hostile_input(crawl_env, tmp_path):
    env, db = crawl_env
    with LocalHttpServer() as server:
        good = _good_images(server, 100)
        cases = {name: make(server) for name, make in (FETCHED | REJECTED).items()}
        lines = list(good)
        for position, case in enumerate(cases.values()):
            lines.insert(position * 17, case.line)  # spread among the good ones
        urls = tmp_path / "urls.txt"
        urls.write_bytes(b"\n".join(lines) + b"\n")
        result, memory = _crawl(env, urls, tmp_path / "workers.log")
        requests = {name: server.hits(case.path) for name, case in cases.items() if case.path}

    print(f"\nevery hostile input at once: peak worker RSS {memory.peak / MB:.1f} MB\n{memory.report()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "enqueued 104 urls (2 rejected lines, 0 blank or comment lines skipped)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "done: 106 urls — 100 success, 0 duplicate, 6 error"
    line_of = {line: number for number, line in enumerate(lines, 1)}
    reasons = {
        name: db.outcomes.find_one({"line": line_of[case.line]})["reason"] for name, case in cases.items()
    }
    assert reasons == {name: case.reason for name, case in cases.items()}
    assert requests == {name: case.requests for name, case in cases.items() if case.path}
    assert db.outcomes.count_documents({"outcome": "success", "reason": None}) == 100
    assert db.images.count_documents({}) == 100
    assert db["gray.files"].count_documents({}) == 100
    # The ledger keeps the head of a 100 kB "URL" and its length, not all of it.
    long_url = db.outcomes.find_one({"line": line_of[cases["100 kB line"].line]})["url"]
    assert len(long_url) < 2100 and long_url.endswith(f"({len(cases['100 kB line'].line)} characters)")
    _assert_bounded(memory)


def test_an_empty_file_is_done_at_once(crawl_env, tmp_path):
    env, db = crawl_env
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"")

    result = image_crawler(env, "enqueue", str(urls), "--wait", "--timeout", "60")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "enqueued 0 urls (0 rejected lines, 0 blank or comment lines skipped)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "done: 0 urls — 0 success, 0 duplicate, 0 error"
    assert db.outcomes.count_documents({}) == 0
