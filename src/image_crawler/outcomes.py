"""The job ledger: exactly one terminal outcome per enqueued URL line.

A *job* is one URL line of one ``enqueue`` run; its id is ``<run>:<line number>``.
Its outcome is written with an insert keyed by the job id, so the first outcome
recorded wins and any later attempt (a retry, a redelivered message, a second
collector) is a no-op: nothing is ever counted twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from . import storage
from .redaction import redact_url

SUCCESS = "success"
DUPLICATE = "duplicate"
ERROR = "error"
OUTCOMES = (SUCCESS, DUPLICATE, ERROR)

#: Longest URL text kept in the ledger; a 100 kB "URL" keeps its head and its length.
MAX_STORED_URL = 2048


@dataclass(frozen=True)
class Job:
    """One URL line of one run (messages carry it as ``[line, url, …]`` under their ``run``)."""

    id: str
    run: str
    line: int
    url: str

    @classmethod
    def new(cls, run: str, line: int, url: str) -> Job:
        """The job for line ``line`` of run ``run``."""
        return cls(id=f"{run}:{line}", run=run, line=line, url=url)

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> Job:
        """Rebuild a job from the dict a message carries."""
        return cls(id=data["id"], run=data["run"], line=int(data["line"]), url=data["url"])

    def to_message(self) -> dict[str, Any]:
        """The job as a JSON-safe dict."""
        return asdict(self)


def _url_for_ledger(url: str) -> str:
    url = redact_url(url)  # credentials stay in the message that fetches
    if len(url) <= MAX_STORED_URL:
        return url
    return f"{url[:MAX_STORED_URL]}… ({len(url)} characters)"


def outcome_document(
    job: Job,
    outcome: str,
    *,
    reason: str | None = None,
    md5: str | None = None,
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """The ledger document for ``job`` ending with ``outcome`` at ``at`` (default: now)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    ended_at = at or storage.utcnow()
    return {
        "_id": job.id,
        "run": job.run,
        "line": job.line,
        "url": _url_for_ledger(job.url),
        "outcome": outcome,
        "reason": reason,
        "md5": md5,
        "ended_at": ended_at,
        # The UTC minute the job ended in, kept so the histogram groups on a plain field.
        "minute": ended_at.replace(second=0, microsecond=0),
    }


def record_outcome(
    db: Database, job: Job, outcome: str, *, reason: str | None = None, md5: str | None = None
) -> bool:
    """Record the job's terminal outcome; False if it already had one (which is kept)."""
    try:
        storage.outcomes(db).insert_one(outcome_document(job, outcome, reason=reason, md5=md5))
    except DuplicateKeyError:
        return False
    return True


def record_outcomes(db: Database, documents: list[dict[str, Any]]) -> int:
    """Record many ready-made outcome documents at once; returns how many were new."""
    if not documents:
        return 0
    try:
        return len(storage.outcomes(db).insert_many(documents, ordered=False).inserted_ids)
    except BulkWriteError as exc:
        if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
            raise
        return int(exc.details.get("nInserted", 0))


def finished(db: Database, job_ids: Iterable[str]) -> set[str]:
    """Which of ``job_ids`` have an outcome already (one query)."""
    wanted = list(job_ids)
    if not wanted:
        return set()
    found = storage.outcomes(db).find({"_id": {"$in": wanted}}, projection={"_id": 1})
    return {document["_id"] for document in found}


def get_outcome(db: Database, job_id: str) -> dict[str, Any] | None:
    """The ledger entry of one job, or None while it is still running."""
    return storage.outcomes(db).find_one({"_id": job_id})


def count_outcomes(db: Database, run: str | None = None) -> dict[str, int]:
    """How many jobs ended in each outcome, for one run or overall."""
    pipeline: list[dict[str, Any]] = [{"$group": {"_id": "$outcome", "n": {"$sum": 1}}}]
    if run is not None:
        pipeline.insert(0, {"$match": {"run": run}})
    counts = dict.fromkeys(OUTCOMES, 0)
    for row in storage.outcomes(db).aggregate(pipeline):
        counts[row["_id"]] = row["n"]
    return counts
