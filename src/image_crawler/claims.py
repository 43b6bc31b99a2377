"""Claim checks: bytes parked in Redis between tasks, so messages stay small.

Dramatiq's JSON encoder cannot carry bytes, and base64 bodies would bloat every
queue; the fetch task parks the body under a key derived from the job id, the
next tasks read it, and the collector drops it. Keys expire on their own if a
job ends early.
"""

from __future__ import annotations

import redis

from .errors import ClaimExpired

_PREFIX = "image-crawler:claim"


def body_key(job_id: str) -> str:
    """Where the downloaded body of a job waits."""
    return f"{_PREFIX}:body:{job_id}"


def gray_key(job_id: str) -> str:
    """Where the grayscale PNG of a job waits for the collector."""
    return f"{_PREFIX}:gray:{job_id}"


class ClaimCheck:
    """Parks and returns bytes in Redis with a TTL.

    Parameters:
      client(redis.Redis): The Redis client (its pool is shared by all threads).
      ttl(int): Seconds a parked value lives.
    """

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    def put(self, key: str, data: bytes, *, pipe: redis.client.Pipeline | None = None) -> None:
        """Park ``data`` under ``key`` (on ``pipe``: when that pipeline is sent)."""
        (pipe if pipe is not None else self.client).set(key, data, ex=self.ttl)

    def get(self, key: str, what: str) -> bytes:
        """The bytes under ``key``; ClaimExpired (reason ``<what> expired``) if they are gone."""
        data = self.client.get(key)
        if data is None:
            raise ClaimExpired(f"{what} expired")
        return bytes(data)  # type: ignore[arg-type]

    def drop(self, job_id: str) -> None:
        """Forget everything parked for a job."""
        self.client.delete(body_key(job_id), gray_key(job_id))
