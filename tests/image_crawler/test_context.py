"""The per-process context: one MongoDB client, one Redis pool (the broker's), one HTTP client."""

from __future__ import annotations

import dataclasses

import redis

from image_crawler import context as context_module
from image_crawler.claims import BODIES, claim_key
from image_crawler.config import get_settings
from image_crawler.context import Context


def test_the_workers_claim_checks_use_the_brokers_redis_pool(redis_url, mongo_db, monkeypatch):
    from image_crawler import actors, storage

    monkeypatch.setattr(storage, "get_database", lambda settings: mongo_db)
    previous = context_module.set_context(None)
    try:
        context = context_module.get_context()  # as the first actor of a worker process creates it
        assert context.claims.client is actors.broker.client
        assert not context.owns_redis
    finally:
        context_module.set_context(previous)


def _connections(observer: redis.Redis, name: str) -> int:
    """Connections the Redis server has from clients called ``name``."""
    return sum(1 for client in observer.client_list() if client["name"] == name)


def test_a_shared_redis_client_stays_open_when_the_context_closes(redis_url, mongo_db):
    settings = dataclasses.replace(get_settings(), redis_url=redis_url)
    observer = redis.Redis.from_url(redis_url)
    client = redis.Redis.from_url(redis_url, client_name="shared-by-test")
    client.ping()

    context = Context.create(settings, db=mongo_db, redis_client=client)
    context.claims.put("ctx-test", BODIES, {0: b"abc"})
    context.close()

    assert context.claims.client is client
    assert _connections(observer, "shared-by-test") == 1  # still connected, nothing else opened
    assert client.hget(claim_key("ctx-test", BODIES), "0") == b"abc"
    client.delete(claim_key("ctx-test", BODIES))


def test_a_context_opens_and_closes_its_own_redis_pool_otherwise(redis_url, mongo_db):
    settings = dataclasses.replace(get_settings(), redis_url=redis_url)
    observer = redis.Redis.from_url(redis_url)

    context = Context.create(settings, db=mongo_db)
    context.claims.client.client_setname("context-own")
    assert _connections(observer, "context-own") == 1
    context.close()

    assert context.owns_redis
    assert _connections(observer, "context-own") == 0


def test_a_workers_robots_txt_over_500_kib_is_cut_there_and_obeyed(redis_url, mongo_db):
    from image_crawler.robots import MAX_ROBOTS_BYTES, origin
    from support.http_server import LocalHttpServer

    settings = dataclasses.replace(
        get_settings(), redis_url=redis_url, obey_robots=True, fetch_allow_private=True
    )
    rules = b"User-agent: *\nDisallow: /private/\n"
    filler = b"# " + b"x" * 1000 + b"\n"
    with LocalHttpServer() as server:
        server.add(
            "/robots.txt", rules + filler * (3 * MAX_ROBOTS_BYTES // len(filler)), content_type="text/plain"
        )
        context = Context.create(settings, db=mongo_db)
        try:
            assert context.robots is not None
            assert context.robots.allowed(server.url("/private/cat.png")) is False
            assert context.robots.allowed(server.url("/cat.png")) is True
        finally:
            site = origin(server.url())
            context.claims.client.delete(f"image-crawler:robots:{site}", f"image-crawler:robots-lock:{site}")
            context.close()
