"""Claim checks: bytes parked in Redis between tasks, so messages stay small.

Dramatiq's JSON encoder cannot carry bytes, and base64 bodies would bloat every queue. Each
execution of ``fetch`` parks the bodies of its batch in one Redis hash named after a claim id
made fresh for that execution, field ``i`` holding the ``i``-th body of the parcel it sends on;
``grayscale`` parks the PNGs in a second hash of the same id, and ``collect`` deletes both.
Because the id is new on every execution, a fetch redelivered after it had sent its group
parks its bodies elsewhere and can never change what the first group's members read
(docs/architecture.md, "Invariants", 3). Keys expire on their own if a batch ends early.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence

import redis

from .errors import ClaimExpired

_PREFIX = "image-crawler:claim"

#: What a claim holds: the downloaded bodies, and the grayscale PNGs made from them.
BODIES = "body"
PNGS = "gray"


def new_claim() -> str:
    """A claim id no other execution will ever use."""
    return uuid.uuid4().hex


def claim_key(claim: str, kind: str) -> str:
    """The Redis hash holding the ``kind`` (:data:`BODIES` or :data:`PNGS`) of a claim."""
    return f"{_PREFIX}:{claim}:{kind}"


def chunks(indexes: Iterable[int], sizes: Sequence[int], limit: int) -> Iterator[list[int]]:
    """``indexes`` in runs whose ``sizes`` add up to at most ``limit`` bytes (a larger one alone)."""
    run: list[int] = []
    total = 0
    for index in indexes:
        if run and total + sizes[index] > limit:
            yield run
            run, total = [], 0
        run.append(index)
        total += sizes[index]
    if run:
        yield run


class ClaimCheck:
    """Parks and returns bytes in Redis hashes with a TTL.

    Parameters:
      client(redis.Redis): The Redis client (its pool is shared by all threads).
      ttl(int): Seconds a parked value lives.
    """

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    def put(
        self,
        claim: str,
        kind: str,
        items: Mapping[int, bytes],
        *,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Park ``items`` (index → bytes) in the claim's ``kind`` (on ``pipe``: when it is sent)."""
        if not items:
            return
        key = claim_key(claim, kind)
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        # One HSET per item, not one for all: hiredis packs a command into one buffer, and a
        # buffer of many bodies is a fresh multi-megabyte allocation (page faults) every time.
        for index, data in items.items():
            target.hset(key, str(index), data)
        target.expire(key, self.ttl)
        if pipe is None:
            target.execute()

    def get(self, claim: str, kind: str, indexes: Sequence[int], what: str) -> dict[int, bytes]:
        """The bytes parked under ``indexes``; ClaimExpired (``<what> expired``) if any is gone."""
        if not indexes:
            return {}
        values = self.client.hmget(claim_key(claim, kind), [str(index) for index in indexes])
        if any(value is None for value in values):
            raise ClaimExpired(f"{what} expired")
        return {index: bytes(value) for index, value in zip(indexes, values, strict=True)}  # type: ignore[arg-type]

    def drop(self, claim: str, *, pipe: redis.client.Pipeline | None = None) -> None:
        """Forget everything parked under a claim."""
        (pipe if pipe is not None else self.client).delete(claim_key(claim, BODIES), claim_key(claim, PNGS))
