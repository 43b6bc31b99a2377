"""Claim checks: bytes parked in Redis between tasks, with a TTL, gone once the job ends."""

from __future__ import annotations

import uuid

import pytest
import redis

from image_crawler.claims import ClaimCheck, body_key, gray_key
from image_crawler.errors import ClaimExpired


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def job_id():
    return f"{uuid.uuid4().hex[:12]}:1"


def test_parked_bytes_come_back_unchanged(client, job_id):
    claims = ClaimCheck(client, ttl=600)
    body = bytes(range(256)) * 100

    claims.put(body_key(job_id), body)

    assert claims.get(body_key(job_id), "body") == body
    claims.drop(job_id)


def test_parked_bytes_expire_after_the_ttl(client, job_id):
    claims = ClaimCheck(client, ttl=600)

    claims.put(body_key(job_id), b"body")

    assert 590 <= client.ttl(body_key(job_id)) <= 600
    claims.drop(job_id)


def test_missing_bytes_raise_claim_expired_naming_what_is_gone(client, job_id):
    claims = ClaimCheck(client, ttl=600)

    with pytest.raises(ClaimExpired) as caught:
        claims.get(gray_key(job_id), "grayscale image")

    assert caught.value.reason == "grayscale image expired"
    assert caught.value.transient is False


def test_drop_forgets_the_body_and_the_png_of_a_job_only(client, job_id):
    claims = ClaimCheck(client, ttl=600)
    other = f"{job_id}0"
    claims.put(body_key(job_id), b"body")
    claims.put(gray_key(job_id), b"png")
    claims.put(body_key(other), b"other body")

    claims.drop(job_id)

    assert client.exists(body_key(job_id), gray_key(job_id)) == 0
    with pytest.raises(ClaimExpired, match="body expired"):
        claims.get(body_key(job_id), "body")
    assert claims.get(body_key(other), "body") == b"other body"
    claims.drop(other)


def test_dropping_a_job_with_nothing_parked_is_harmless(client, job_id):
    ClaimCheck(client, ttl=600).drop(job_id)


def test_body_and_png_of_a_job_live_under_different_keys(job_id):
    assert body_key(job_id) != gray_key(job_id)
    assert body_key(job_id) != body_key(f"{job_id}0")
    assert job_id in body_key(job_id)
