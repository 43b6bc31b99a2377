"""Claim checks: bytes parked in Redis between tasks, under a claim made per execution, with a TTL."""

from __future__ import annotations

import pytest

from image_crawler.claims import BODIES, PNGS, ClaimCheck, chunks, claim_key, new_claim
from image_crawler.errors import ClaimExpired


@pytest.fixture
def claims(redis_client):
    return ClaimCheck(redis_client, ttl=600)


def test_parked_bytes_come_back_unchanged(claims):
    claim = new_claim()
    bodies = {0: bytes(range(256)) * 100, 1: b"", 2: b"\x00" * 10}

    claims.put(claim, BODIES, bodies)

    assert claims.get(claim, BODIES, [2, 0, 1], "body") == {2: bodies[2], 0: bodies[0], 1: b""}
    assert claims.get(claim, BODIES, [1], "body") == {1: b""}
    claims.drop(claim)


def test_parked_bytes_expire_with_the_ttl(claims, redis_client):
    claim = new_claim()
    claims.put(claim, PNGS, {0: b"png"})

    assert 590 <= redis_client.ttl(claim_key(claim, PNGS)) <= 600
    claims.drop(claim)


def test_a_missing_item_raises_claim_expired_with_the_reason(claims):
    claim = new_claim()
    claims.put(claim, BODIES, {0: b"body"})

    with pytest.raises(ClaimExpired) as caught:
        claims.get(claim, BODIES, [0, 1], "body")
    assert caught.value.reason == "body expired"
    with pytest.raises(ClaimExpired, match="grayscale image expired"):
        claims.get(claim, PNGS, [0], "grayscale image")
    claims.drop(claim)


def test_drop_forgets_bodies_and_pngs_of_one_claim_only(claims, redis_client):
    claim, other = new_claim(), new_claim()
    claims.put(claim, BODIES, {0: b"body"})
    claims.put(claim, PNGS, {0: b"png"})
    claims.put(other, BODIES, {0: b"other body"})

    claims.drop(claim)

    assert redis_client.exists(claim_key(claim, BODIES), claim_key(claim, PNGS)) == 0
    assert claims.get(other, BODIES, [0], "body") == {0: b"other body"}
    claims.drop(other)


def test_every_execution_gets_its_own_claim():
    made = {new_claim() for _ in range(1000)}
    assert len(made) == 1000


def test_the_bodies_and_pngs_of_one_claim_are_kept_apart(claims):
    claim = new_claim()
    claims.put(claim, BODIES, {0: b"body"})
    claims.put(claim, PNGS, {0: b"png"})  # the same index, in the other kind

    assert claims.get(claim, BODIES, [0], "body") == {0: b"body"}
    assert claims.get(claim, PNGS, [0], "grayscale image") == {0: b"png"}
    claims.drop(claim)


def test_parcels_move_in_runs_of_bounded_size():
    sizes = [5, 5, 5, 20, 1, 1]
    assert list(chunks(range(6), sizes, 10)) == [[0, 1], [2], [3], [4, 5]]
    assert list(chunks([], sizes, 10)) == []
    assert list(chunks([3, 0], sizes, 100)) == [[3, 0]]
