"""robots.txt on every redirect hop: with OBEY_ROBOTS=1 a redirect never leads to a disallowed URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import redis

from image_crawler import storage
from image_crawler.config import Settings
from image_crawler.fetching import Fetcher
from image_crawler.robots import DISALLOWED, RobotsDisallowed, origin
from support.http_server import LocalHttpServer
from support.images import png_bytes


def _forget(client: redis.Redis, server: LocalHttpServer) -> None:
    """What Redis remembers of the server's origin(s): tests share Redis, and ports come again."""
    for url in (server.url(), server.url().replace("127.0.0.1", "localhost")):
        site = origin(url)
        client.delete(f"image-crawler:robots:{site}", f"image-crawler:robots-lock:{site}")


@contextmanager
def _host(client: redis.Redis) -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as running:
        _forget(client, running)
        yield running
        _forget(client, running)


@pytest.fixture
def server(redis_client: redis.Redis) -> Iterator[LocalHttpServer]:
    with _host(redis_client) as running:
        yield running


@pytest.fixture
def other(redis_client: redis.Redis) -> Iterator[LocalHttpServer]:
    """Another host: its own origin (``localhost`` and a port of its own), its own robots.txt."""
    with _host(redis_client) as running:
        yield running


def _on_localhost(server: LocalHttpServer, path: str) -> str:
    return server.url(path).replace("127.0.0.1", "localhost")


def _ledger(pipeline, run: str) -> dict[int, dict]:
    return {doc["line"]: doc for doc in storage.ledger(pipeline.db).find({"run": run})}


def test_a_redirect_to_a_path_its_robots_txt_disallows_is_never_followed(make_pipeline, server):
    pipeline = make_pipeline(obey_robots=True)
    server.add("/robots.txt", body=b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    server.add_redirect("/public/old.png", "/private/a.png")
    server.add("/private/a.png", body=png_bytes(20, 20, seed=11))

    report = pipeline.enqueue_text(server.url("/public/old.png"))
    pipeline.wait_for(report.run, 1)

    entry = _ledger(pipeline, report.run)[1]
    assert (entry["outcome"], entry["reason"]) == ("error", DISALLOWED)
    assert server.hits("/public/old.png") == 1
    assert server.hits("/private/a.png") == 0
    assert server.hits("/robots.txt") == 1


def test_a_redirect_to_another_host_obeys_that_hosts_robots_txt(make_pipeline, server, other):
    pipeline = make_pipeline(obey_robots=True)
    # This host has no robots.txt (404: everything allowed); the other disallows /private/.
    other.add("/robots.txt", body=b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    server.add_redirect("/go.png", _on_localhost(other, "/private/cat.png"))
    server.add_redirect("/fine.png", _on_localhost(other, "/public/dog.png"))
    other.add("/private/cat.png", body=png_bytes(20, 20, seed=12))
    other.add("/public/dog.png", body=png_bytes(20, 20, seed=13))

    report = pipeline.enqueue_text("\n".join([server.url("/go.png"), server.url("/fine.png")]))
    pipeline.wait_for(report.run, 2)

    ledger = _ledger(pipeline, report.run)
    assert (ledger[1]["outcome"], ledger[1]["reason"]) == ("error", DISALLOWED)
    assert ledger[2]["outcome"] == "success"
    assert other.hits("/private/cat.png") == 0
    assert other.hits("/public/dog.png") == 1
    assert other.hits("/robots.txt") == 1  # once, for both hops
    assert server.hits("/robots.txt") == 1


def test_a_hop_whose_robots_txt_stays_pending_ends_the_line_after_the_postpone_limit(
    make_pipeline, server, other, redis_client, monkeypatch
):
    from image_crawler import actors

    monkeypatch.setattr(actors, "POSTPONE_LIMIT", 2)
    monkeypatch.setattr(actors, "NOT_STARTED_DELAY_MS", 50)
    pipeline = make_pipeline(obey_robots=True, fetch_retries=0)
    server.add_redirect("/go.png", _on_localhost(other, "/cat.png"))
    other.add("/cat.png", body=png_bytes(20, 20, seed=15))
    # Another worker fetches the other host's robots.txt, and goes on fetching it.
    hop_site = origin(_on_localhost(other, "/"))
    redis_client.set(f"image-crawler:robots-lock:{hop_site}", "another worker", ex=600)

    report = pipeline.enqueue_text(server.url("/go.png"))
    pipeline.wait_for(report.run, 1, timeout=120)

    entry = _ledger(pipeline, report.run)[1]
    assert (entry["outcome"], entry["reason"]) == ("error", "timeout")
    # Its first URL was asked for again each round, and the rounds stopped at the limit.
    assert server.hits("/go.png") == 2
    assert other.hits("/cat.png") == 0 and other.hits("/robots.txt") == 0


def test_without_obey_robots_a_redirect_is_followed_whatever_robots_txt_says(make_pipeline, server):
    pipeline = make_pipeline()
    server.add("/robots.txt", body=b"User-agent: *\nDisallow: /\n", content_type="text/plain")
    server.add_redirect("/old.png", "/new.png")
    server.add("/new.png", body=png_bytes(20, 20, seed=14))

    report = pipeline.enqueue_text(server.url("/old.png"))
    pipeline.wait_for(report.run, 1)

    assert _ledger(pipeline, report.run)[1]["outcome"] == "success"
    assert server.hits("/robots.txt") == 0


# --- the hook on Fetcher.fetch ----------------------------------------------------------------


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    with Fetcher(replace(Settings(), fetch_allow_private=True, fetch_timeout=5.0)) as running:
        yield running


def test_check_hop_is_asked_about_each_redirect_before_it_is_requested(server, fetcher):
    server.add_redirect("/a", "/b")
    server.add_redirect("/b", server.url("/c"))
    server.add("/c", body=b"cat")
    asked: list[tuple[str, int]] = []

    def check_hop(url: str) -> None:
        asked.append((url, server.hits("/" + url.rsplit("/", 1)[1])))

    download = fetcher.fetch(server.url("/a"), check_hop=check_hop)

    assert download.content == b"cat"
    # Each hop asked about before its request was sent (no hit yet), the first URL never.
    assert asked == [(server.url("/b"), 0), (server.url("/c"), 0)]


def test_a_hop_check_that_refuses_stops_the_download_before_that_hop(server, fetcher):
    server.add_redirect("/a", "/b")
    server.add("/b", body=b"cat")

    def check_hop(url: str) -> None:
        raise RobotsDisallowed()

    with pytest.raises(RobotsDisallowed):
        fetcher.fetch(server.url("/a"), check_hop=check_hop)
    assert (server.hits("/a"), server.hits("/b")) == (1, 0)
