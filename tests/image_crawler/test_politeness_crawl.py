"""Politeness through a real crawl: in-process workers, the suite's Redis, a local server that records.

What the server saw (when each request arrived, to which host) is the evidence: waits are
checked as lower bounds on the gaps between requests, never as upper bounds on a test's time.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import math
import time
from collections.abc import Iterator

import pytest
import redis

from image_crawler import context as context_module
from image_crawler import outcomes
from image_crawler.robots import origin
from support.http_server import LocalHttpServer, Response
from support.images import png_bytes

#: Slack for the gaps the server sees: a request reaches it a little after its turn was taken,
#: the first over a new connection, later ones over a kept-alive one.
SLACK_S = 0.05


@pytest.fixture
def server(redis_client: redis.Redis) -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as running:
        site = origin(running.url())
        redis_client.delete(f"image-crawler:robots:{site}", f"image-crawler:robots-lock:{site}")
        yield running
        redis_client.delete(f"image-crawler:robots:{site}", f"image-crawler:robots-lock:{site}")


def _starts(server: LocalHttpServer, *, path_prefix: str = "/") -> dict[str, list[float]]:
    """When each path's requests arrived, in order."""
    times: dict[str, list[float]] = {}
    for at, _, path, _ in server.requests():
        if path.startswith(path_prefix):
            times.setdefault(path, []).append(at)
    return times


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(sorted(times))]


def test_urls_waiting_for_their_host_use_up_no_retry(make_pipeline, server, caplog):
    # One request at a time, each 2.5 s after the last: longer than a download thread waits for
    # a turn (2 s), so the lines go back to the queue to wait. With no retries at all, a wait
    # that counted as a try would end them in error.
    pipeline = make_pipeline(fetch_retries=0, host_concurrency=1, host_delay_ms=2_500)
    for n in range(3):
        server.add(f"/wait/{n}.png", body=png_bytes(20, 20, seed=200 + n))

    with caplog.at_level(logging.INFO, logger="image_crawler.actors"):
        report = pipeline.enqueue_text("\n".join(server.url(f"/wait/{n}.png") for n in range(3)))
        pipeline.wait_for(report.run, 3, timeout=60)

    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 3, "duplicate": 0, "error": 0}
    starts = [at for times in _starts(server, path_prefix="/wait/").values() for at in times]
    assert len(starts) == 3  # each requested once: no try was made and lost
    assert all(gap >= 2.5 - SLACK_S for gap in _gaps(starts))
    waited = [record.getMessage() for record in caplog.records if "for their hosts' turns" in record.message]
    assert waited, "no line went back to the queue to wait for its host"
    assert all("127.0.0.1" in message for message in waited)


def test_requests_of_a_crawl_to_one_host_start_at_least_host_delay_ms_apart(make_pipeline, server):
    pipeline = make_pipeline(host_delay_ms=500)  # HOST_CONCURRENCY as by default: 8
    for n in range(5):
        server.add(f"/spaced/{n}.png", body=png_bytes(20, 20, seed=300 + n))

    report = pipeline.enqueue_text("\n".join(server.url(f"/spaced/{n}.png") for n in range(5)))
    pipeline.wait_for(report.run, 5, timeout=60)

    assert outcomes.count_outcomes(pipeline.db, report.run)["success"] == 5
    starts = [at for times in _starts(server, path_prefix="/spaced/").values() for at in times]
    assert len(starts) == 5
    assert all(gap >= 0.5 - SLACK_S for gap in _gaps(starts))


def test_a_503_with_retry_after_is_retried_no_sooner_than_it_says_in_seconds_or_as_a_date(
    make_pipeline, server
):
    # Both waits are longer than the backoff of a first retry (2 to 4 s), so only Retry-After
    # explains them. Two hosts (one server, two names), so one's pause does not hold up the other.
    pipeline = make_pipeline(fetch_retries=1)
    wall, mono = time.time(), time.monotonic()
    date = math.ceil(wall) + 8  # an HTTP date has whole seconds
    date_monotonic = mono + (date - wall)
    server.add_sequence(
        "/seconds.png",
        [
            Response(status=503, headers={"Retry-After": "5"}, content_type="text/plain"),
            Response(body=png_bytes(20, 20, seed=400)),
        ],
    )
    server.add_sequence(
        "/date.png",
        [
            Response(
                status=503,
                headers={"Retry-After": email.utils.formatdate(date, usegmt=True)},
                content_type="text/plain",
            ),
            Response(body=png_bytes(20, 20, seed=401)),
        ],
    )
    lines = [server.url("/seconds.png"), server.url("/date.png").replace("127.0.0.1", "localhost")]

    report = pipeline.enqueue_text("\n".join(lines))
    pipeline.wait_for(report.run, 2, timeout=60)

    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 2, "duplicate": 0, "error": 0}
    starts = _starts(server)
    assert len(starts["/seconds.png"]) == len(starts["/date.png"]) == 2
    assert starts["/seconds.png"][1] - starts["/seconds.png"][0] >= 5 - SLACK_S
    assert starts["/date.png"][1] >= date_monotonic - SLACK_S


def test_a_robots_txt_that_never_answers_lets_the_url_be_fetched_after_robots_timeout_s(
    make_pipeline, server, monkeypatch
):
    # A worker's robots.txt gets ROBOTS_TIMEOUT_S, not FETCH_TIMEOUT (a minute here: waiting that
    # long would outlast wait_for's 30 s); a robots.txt that times out allows everything.
    monkeypatch.setattr(context_module, "ROBOTS_TIMEOUT_S", 0.5)
    pipeline = make_pipeline(obey_robots=True, fetch_timeout=60.0)
    server.add("/robots.txt", body=b"User-agent: *\nDisallow: /\n", content_type="text/plain", delay=120)
    server.add("/cat.png", body=png_bytes(20, 20, seed=500))

    report = pipeline.enqueue_text(server.url("/cat.png"))
    pipeline.wait_for(report.run, 1, timeout=30)

    assert outcomes.count_outcomes(pipeline.db, report.run)["success"] == 1
    starts = _starts(server)
    assert len(starts["/robots.txt"]) == len(starts["/cat.png"]) == 1
    assert starts["/cat.png"][0] - starts["/robots.txt"][0] >= 0.5 - SLACK_S  # it waited for the limit
