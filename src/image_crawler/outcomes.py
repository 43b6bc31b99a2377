"""The job ledger: exactly one terminal outcome per enqueued URL line, its counters, and runs.

A *job* is one URL line of one ``enqueue`` run; its id is ``<run>:<line number>``.
Its outcome is written with an insert keyed by the job id, so the first outcome
recorded wins and any later attempt (a retry, a redelivered message, a second
collector) is a no-op: nothing is ever counted twice.

**Counters.** Charts and totals must not read the ledger, which grows with every line. Each
:func:`record_outcomes` also adds the outcomes it inserted (only those: a duplicate of an
outcome already recorded adds nothing) to one ``minute_counts`` document per run and UTC
minute, with ``$inc``, and its errors to one ``reason_counts`` document per run, minute and
(counted) reason, recounted with them. A writer can die between the two writes, so the ledger stays the truth:
once a minute has *settled* (:data:`SETTLE_AFTER` after it, when no writer still records into
it), :func:`reconcile` recounts it from the ledger's ``minute_run_outcome_reason`` index and sets
its counters, once; a mark (``reconciled.through``) says how far that went. Passes run now and
then (:func:`reconcile_if_due`): from :func:`record_outcomes` in every process that records
(workers, ``enqueue``) at most every :data:`RECONCILE_EVERY_S`, from the web app's chart and
dashboard as often, and from ``image-crawler runs``/``status``/``reconcile``. Each is bounded
(:data:`RECONCILE_MINUTES` busy minutes) and idempotent, so passes may overlap.

An outcome dated more than :data:`LATE_AFTER` before the writer's clock (a fetch that recorded
its failures late, a clock behind) may land in a minute already recounted: the writer first
moves the mark back to that minute, *before* inserting, so even a crash right after the insert
leaves that minute to be recounted. What is left: until a minute settles, its counters lack
the outcomes whose writer died before counting them; processes whose clocks differ by more
than ``SETTLE_AFTER - LATE_AFTER`` defeat the margin; and a late outcome is missed if a pass
recounts its minute between the writer's insert and its count *and* the writer dies in that
same moment. ``image-crawler reconcile --all`` recounts everything.

**Runs.** :func:`start_run` and :func:`run_progress` keep one ``runs`` document per ``enqueue``:
when it started, which run it retries, how many lines it has sent (its length once it has read
the whole file). A run's outcomes come from its counters; lines in flight are the lines sent
minus those.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from . import storage
from .errors import InvalidUrl
from .fetching import check_url
from .redaction import redact_url, redact_url_field

logger = logging.getLogger(__name__)

SUCCESS = "success"
DUPLICATE = "duplicate"
ERROR = "error"
OUTCOMES = (SUCCESS, DUPLICATE, ERROR)

#: Longest URL text kept in the ledger; a 100 kB "URL" keeps its head and its length.
MAX_STORED_URL = 2048

_MINUTE = dt.timedelta(minutes=1)
#: A minute is recounted from the ledger once the current minute is more than this after it.
SETTLE_AFTER = dt.timedelta(minutes=5)
#: An outcome dated more than this before the current minute is *late*: it moves the
#: reconciliation mark back to its minute before it is inserted.
LATE_AFTER = dt.timedelta(minutes=2)
#: How often a process that records outcomes (or serves the dashboard) runs a pass, at most.
RECONCILE_EVERY_S = 60.0
#: Most minutes that had outcomes one pass recounts, so that a pass stays short (it reads those
#: minutes' index keys); a ledger older than the counters is caught up over many passes, or at
#: once by ``image-crawler reconcile``.
RECONCILE_MINUTES = 10
#: Runs' recent pace is counted over this many minutes, the current one included.
RATE_MINUTES = 5
#: A run still ``sending`` with no progress recorded for this long (and no outcome over the last
#: :data:`RATE_MINUTES`) is ``stalled``: its ``enqueue`` was killed, or lost MongoDB, before it
#: could say it stopped.
STALLED_AFTER = dt.timedelta(minutes=10)
#: A run with lines in flight that has had neither progress nor outcomes for this long is taken
#: as abandoned: the runs going no longer list it.
ABANDONED_AFTER = dt.timedelta(days=1)
#: What :attr:`RunSummary.state` can be, finished runs' ``done`` last.
RUN_STATES = ("sending", "stalled", "running", "interrupted", "done")
#: The ``reconciled`` document of the per-minute counters.
_COUNTERS_MARK = "minute_counts"


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
    rejected: bool = False,
) -> dict[str, Any]:
    """The ledger document for ``job`` ending with ``outcome`` at ``at`` (default: now).

    ``rejected``: ``enqueue`` refused the line (not a URL it takes); the document then says so
    (``rejected: True``), and ``image-crawler failed`` never lists it as a URL to retry.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    ended_at = at or storage.utcnow()
    extra: dict[str, Any] = {"rejected": True} if rejected else {}
    return {
        "_id": job.id,
        "run": job.run,
        "line": job.line,
        "url": _url_for_ledger(job.url),
        "outcome": outcome,
        "reason": reason,
        "md5": md5,
        "ended_at": ended_at,
        # The UTC minute the job ended in, kept so the counters group on a plain field.
        "minute": storage.minute_of(ended_at),
        **extra,
    }


def image_outcome(job: Job, md5: str, stored_by: dict[str, str | None]) -> dict[str, Any]:
    """The outcome document of ``job``, whose body is the image ``md5``: ``success`` when the job
    stored that image, ``duplicate`` when another did (``stored_by``, MD5 → the job that stored
    it, as :func:`~image_crawler.storage.images_to_store` and ``store_new_images`` say)."""
    outcome = SUCCESS if stored_by.get(md5) == job.id else DUPLICATE
    return outcome_document(job, outcome, md5=md5)


def record_outcomes(db: Database, documents: list[dict[str, Any]]) -> int:
    """Record many ready-made outcome documents at once, and count them; returns how many were new.

    Only the outcomes inserted now are counted. A late outcome moves the reconciliation mark
    back first (see the module's docstring); now and then a reconciliation pass follows.
    """
    if not documents:
        return 0
    _mark_late(db, documents)
    inserted, failure = documents, None
    try:
        storage.ledger(db).insert_many(documents, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        refused = {error["index"] for error in errors}
        inserted = [document for index, document in enumerate(documents) if index not in refused]
        if any(error.get("code") != 11000 for error in errors):
            failure = exc
    _count(db, inserted)  # what was inserted is counted even when some other insert failed
    if failure is not None:
        raise failure
    reconcile_if_due(db, _writers_schedule)
    return len(inserted)


def _minute_of(document: dict[str, Any]) -> dt.datetime:
    minute = document.get("minute")
    return storage.as_utc(minute) if minute is not None else storage.minute_of(document["ended_at"])


def _counter_id(run: str, minute: dt.datetime) -> str:
    # The minute first and of fixed width: no two (run, minute) pairs share a key.
    return f"{minute:%Y-%m-%dT%H:%MZ} {run}"


def _zero() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


def _reason_counter_id(run: str, minute: dt.datetime, reason: str | None) -> dict[str, Any]:
    # A document, not a joined string: no run id or reason can make two counters share a key.
    return {"minute": minute, "run": run, "reason": reason}


_DETAIL_NUMBER = re.compile(r"[0-9]+")


def reason_kind(reason: object) -> str:
    """The kind of an error reason: its text before any colon (``too many pixels: 3000x3000`` →
    ``too many pixels``), ``unknown`` for none. Fewer than :func:`counted_reason`: for labels."""
    text = reason.split(":", 1)[0].strip() if isinstance(reason, str) else ""
    return text or "unknown"


def counted_reason(reason: str | None) -> str | None:
    """The reason errors are counted under: its numbers after the first colon read ``N``.

    ``too many pixels: 3000x3000`` and ``http 429: retry-after 900 s is over RETRY_AFTER_MAX``
    carry numbers a server picks; counted as they are, each image could make a counter of its
    own. ``http 404`` keeps its code (before any colon: a few hundred at most).
    """
    if reason is None or ":" not in reason:
        return reason
    kind, detail = reason.split(":", 1)
    return f"{kind}:{_DETAIL_NUMBER.sub('N', detail)}"


def _count(db: Database, documents: Iterable[dict[str, Any]]) -> None:
    """Add ``documents`` (outcomes just inserted) to their runs' counters of their minutes.

    Errors are also counted by reason (``reason_counts``: one document per run, minute and
    :func:`counted_reason`, whose number stays small: reasons are short names from a closed
    list, HTTP codes, and details whose numbers are not told apart).
    """
    added: dict[tuple[str, dt.datetime], dict[str, int]] = {}
    errors: Counter[tuple[str, dt.datetime, str | None]] = Counter()
    for document in documents:
        key = (document["run"], _minute_of(document))
        added.setdefault(key, _zero())[document["outcome"]] += 1
        if document["outcome"] == ERROR:
            errors[(*key, counted_reason(document.get("reason")))] += 1
    counters = storage.minute_counts(db)
    for (run, minute), counts in added.items():
        counters.update_one(
            {"_id": _counter_id(run, minute)},
            {"$inc": counts, "$setOnInsert": {"run": run, "minute": minute}},
            upsert=True,
        )
    reasons = storage.reason_counts(db)
    for (run, minute, reason), n in errors.items():
        reasons.update_one(
            {"_id": _reason_counter_id(run, minute, reason)},
            {"$inc": {"n": n}, "$setOnInsert": {"run": run, "minute": minute, "reason": reason}},
            upsert=True,
        )


def _mark_late(db: Database, documents: Iterable[dict[str, Any]]) -> None:
    """Move the reconciliation mark back to the earliest late outcome of ``documents``, if any."""
    threshold = storage.this_minute() - LATE_AFTER
    late = [minute for minute in map(_minute_of, documents) if minute < threshold]
    if late:
        # No upsert: without a mark the first pass starts from the ledger's first minute anyway.
        storage.reconciled(db).update_one({"_id": _COUNTERS_MARK}, {"$min": {"through": min(late)}})


def reconcile(db: Database, *, now: dt.datetime | None = None, max_minutes: int = RECONCILE_MINUTES) -> int:
    """Recount settled minutes from the ledger into their counters; returns how many were recounted.

    Starts at the mark (the ledger's first minute without one), visits only the minutes that
    had outcomes (one index probe each), at most ``max_minutes`` of them, and stops before the
    minutes that have not settled. The mark moves on only if nobody moved it meanwhile (a late
    outcome moved it back: the next pass starts there).
    """
    until = storage.minute_of(now or storage.utcnow()) - SETTLE_AFTER
    marks = storage.reconciled(db)
    mark = marks.find_one({"_id": _COUNTERS_MARK})
    if mark is None:
        minute = _next_busy_minute(db, None, until)
    else:
        minute = storage.as_utc(mark["through"])
        if minute >= until:
            return 0
    recounted = 0
    while minute is not None and recounted < max_minutes:
        minute = _next_busy_minute(db, minute, until)
        if minute is None:
            break
        _recount(db, minute)
        recounted += 1
        minute += _MINUTE
    through = until if minute is None else minute
    if mark is None:
        with contextlib.suppress(DuplicateKeyError):  # another pass made it first: it stands
            marks.insert_one({"_id": _COUNTERS_MARK, "through": through})
    else:
        marks.update_one({"_id": _COUNTERS_MARK, "through": mark["through"]}, {"$set": {"through": through}})
    return recounted


def _next_busy_minute(db: Database, after: dt.datetime | None, until: dt.datetime) -> dt.datetime | None:
    """The first minute from ``after`` on, before ``until``, that had outcomes (one index probe)."""
    window: dict[str, Any] = {"$lt": until}
    if after is not None:
        window["$gte"] = after
    row = storage.ledger(db).find_one(
        {"minute": window}, projection={"_id": 0, "minute": 1}, sort=[("minute", ASCENDING)]
    )
    return None if row is None else storage.as_utc(row["minute"])


def _recount(db: Database, minute: dt.datetime) -> None:
    """Set every counter of ``minute`` to what the ledger holds (covered by ``minute_run_outcome_reason``)."""
    truth: dict[str, dict[str, int]] = {}
    rows = storage.ledger(db).aggregate(
        [
            {"$match": {"minute": minute}},
            {"$group": {"_id": {"run": "$run", "outcome": "$outcome"}, "n": {"$sum": 1}}},
        ]
    )
    for row in rows:
        run, outcome = row["_id"].get("run"), row["_id"].get("outcome")
        if isinstance(run, str) and outcome in OUTCOMES:
            truth.setdefault(run, _zero())[outcome] += int(row["n"])
    counters = storage.minute_counts(db)
    for counter in counters.find({"minute": minute}, projection={"run": 1}):
        truth.setdefault(counter["run"], _zero())  # counted, yet not in the ledger: zero
    for run, counts in truth.items():
        counters.update_one(
            {"_id": _counter_id(run, minute)},
            {"$set": {"run": run, "minute": minute, **counts}},
            upsert=True,
        )
    _recount_reasons(db, minute)


def _recount_reasons(db: Database, minute: dt.datetime) -> None:
    """Set every error-reason counter of ``minute`` to what the ledger holds."""
    truth: dict[tuple[str, str | None], int] = {}
    rows = storage.ledger(db).aggregate(
        [
            {"$match": {"minute": minute, "outcome": ERROR}},
            {"$group": {"_id": {"run": "$run", "reason": "$reason"}, "n": {"$sum": 1}}},
        ]
    )
    for row in rows:
        run, reason = row["_id"].get("run"), row["_id"].get("reason")
        if isinstance(run, str):
            key = (run, counted_reason(reason) if isinstance(reason, str) else None)
            truth[key] = truth.get(key, 0) + int(row["n"])
    counters = storage.reason_counts(db)
    for counter in counters.find({"minute": minute}, projection={"run": 1, "reason": 1}):
        truth.setdefault((counter["run"], counter.get("reason")), 0)  # counted, yet not in the ledger
    for (run, reason), n in truth.items():
        counters.update_one(
            {"_id": _reason_counter_id(run, minute, reason)},
            {"$set": {"run": run, "minute": minute, "reason": reason, "n": n}},
            upsert=True,
        )


def forget_reconciliation(db: Database) -> None:
    """Make the next passes recount every minute of the ledger, from its first one."""
    storage.reconciled(db).delete_one({"_id": _COUNTERS_MARK})


class Schedule:
    """When something done now and then is due: at most once every ``every_s`` seconds.

    :param every_s: seconds between two runs (float, default :data:`RECONCILE_EVERY_S`); the
        first call is due at once.
    """

    def __init__(self, every_s: float = RECONCILE_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True (and not again for ``every_s``) if it is time."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + self.every_s
            return True


_writers_schedule = Schedule()


def reconcile_if_due(db: Database, schedule: Schedule) -> bool:
    """Run a reconciliation pass if ``schedule`` says so; True if one ran.

    A pass that fails (MongoDB unreachable, writes refused) is logged and tried again at the
    next due time: the caller's own work is done by then and must not fail for it.
    """
    if not schedule.due():
        return False
    try:
        reconcile(db)
    except PyMongoError as exc:
        logger.warning("recounting settled minutes failed, to be tried again: %s", exc)
        return False
    return True


#: A $group stage's sums of the counters' outcome fields.
_SUMS = {name: {"$sum": f"${name}"} for name in OUTCOMES}


def _match_window(since: dt.datetime | None, run: str | None) -> list[dict[str, Any]]:
    """The start of a pipeline over counters: those from ``since`` on (all: None), of ``run`` (all: None)."""
    match: dict[str, Any] = {}
    if since is not None:
        match["minute"] = {"$gte": since}
    if run is not None:
        match["run"] = run
    return [{"$match": match}] if match else []


def counts_per_minute(
    db: Database, since: dt.datetime | None = None, *, run: str | None = None
) -> dict[dt.datetime, dict[str, int]]:
    """Outcomes per UTC minute from ``since`` on (default: ever), of one run or all, from the counters.

    The grouping runs in MongoDB over the counters of the window alone (index ``minute``, or
    ``run_minute``): one document per run and minute, however many outcomes there are.
    """
    pipeline = _match_window(since, run)
    pipeline.append({"$group": {"_id": "$minute", **_SUMS}})
    counts: dict[dt.datetime, dict[str, int]] = {}
    for row in storage.minute_counts(db).aggregate(pipeline):
        if isinstance(row["_id"], dt.datetime):
            per_minute = counts.setdefault(storage.as_utc(row["_id"]), _zero())
            for name in OUTCOMES:
                per_minute[name] += int(row.get(name) or 0)
    return counts


def latest_minute(db: Database, until: dt.datetime | None = None) -> dt.datetime | None:
    """The UTC minute of the most recent outcome (at ``until`` or before, if given), or None.

    One key of the ``minute_run_outcome_reason`` index.
    """
    query = {} if until is None else {"minute": {"$lte": until}}
    row = storage.ledger(db).find_one(query, projection={"minute": 1}, sort=[("minute", DESCENDING)])
    minute = None if row is None else row.get("minute")
    return storage.as_utc(minute) if isinstance(minute, dt.datetime) else None


def latest_errors(db: Database, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most recent errors (index ``outcome_ended``): ``url``, ``reason``, ``ended_at``."""
    cursor = storage.ledger(db).find(
        {"outcome": ERROR},
        projection={"_id": 0, "url": 1, "reason": 1, "ended_at": 1},
        sort=[("ended_at", DESCENDING)],
        limit=limit,
    )
    return [redact_url_field(document, "url") for document in cursor]


def counted_totals(db: Database) -> dict[str, int]:
    """How many jobs ended in each outcome so far, from the counters (one document per run and minute)."""
    totals = _zero()
    group = {"_id": None, **_SUMS}
    for row in storage.minute_counts(db).aggregate([{"$group": group}]):
        for name in OUTCOMES:
            totals[name] += int(row.get(name) or 0)
    return totals


def run_totals(
    db: Database, runs: Sequence[str], *, since: dt.datetime | None = None
) -> dict[str, dict[str, int]]:
    """For each of ``runs``, its jobs per outcome (that ended from ``since`` on), from the counters."""
    totals = {run: _zero() for run in runs}
    if not totals:
        return totals
    match: dict[str, Any] = {"run": {"$in": list(totals)}}
    if since is not None:
        match["minute"] = {"$gte": since}
    group = {"_id": "$run", **_SUMS}
    for row in storage.minute_counts(db).aggregate([{"$match": match}, {"$group": group}]):
        if row["_id"] in totals:
            for name in OUTCOMES:
                totals[row["_id"]][name] += int(row.get(name) or 0)
    return totals


# --- runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """Where one run stands: what its ``runs`` document says and what its counters count."""

    run: str
    started_at: dt.datetime
    retry_of: str | None
    #: Lines sent so far (each gets one outcome); the run's length once ``sent``.
    jobs: int
    #: ``enqueue`` has read the whole file.
    sent: bool
    #: ``enqueue`` stopped before it had sent the whole file.
    interrupted: bool
    counts: dict[str, int]
    #: Outcomes per minute over the last :data:`RATE_MINUTES` minutes (or since the run started).
    rate: float

    @property
    def done(self) -> int:
        """Lines that have their outcome."""
        return sum(self.counts.values())

    @property
    def in_flight(self) -> int:
        """Lines sent that have no outcome yet."""
        return max(0, self.jobs - self.done)

    #: When ``enqueue`` last recorded progress (None for runs recorded before it did).
    updated_at: dt.datetime | None = None
    #: When these numbers were read.
    now: dt.datetime | None = None

    @property
    def state(self) -> str:
        """One of :data:`RUN_STATES`: ``sending``, ``stalled``, ``interrupted``, ``running`` or ``done``.

        ``stalled``: still sending by its record, but no progress recorded for
        :data:`STALLED_AFTER` and no outcome over the pace's window: its ``enqueue`` was probably
        killed or lost MongoDB (or waits on stopped workers, or on slow input). It is ``sending``
        again as soon as anything happens.
        """
        if self.interrupted:
            return "interrupted"
        if not self.sent:
            return "stalled" if self._stalled() else "sending"
        return "running" if self.in_flight else "done"

    def _stalled(self) -> bool:
        if self.now is None or self.rate > 0:
            return False
        return self.now - (self.updated_at or self.started_at) >= STALLED_AFTER

    @property
    def length_known(self) -> bool:
        """``enqueue`` will send no more lines: it read the whole file, or stopped."""
        return self.sent or self.interrupted

    @property
    def finished(self) -> bool:
        """Nothing more will happen to it: every line it sent has its outcome, and it sends no more.

        A stalled run whose lines have all ended counts as finished too (its ``enqueue`` is gone);
        if that ``enqueue`` records progress again after all, the run is unfinished again.
        """
        return self.in_flight == 0 and (self.length_known or self.state == "stalled")

    def quiet_for(self, span: dt.timedelta) -> bool:
        """Not finished, with no progress recorded for ``span`` and no outcome over the pace's window."""
        if self.now is None or self.rate > 0 or self.finished:
            return False
        return self.now - (self.updated_at or self.started_at) >= span

    @property
    def pace(self) -> float | None:
        """:attr:`rate` while the run is going; None once it is done (it has no pace any more)."""
        return None if self.state == "done" else self.rate

    @property
    def eta(self) -> dt.timedelta | None:
        """A rough time left at the recent pace, once the run's length is known (None: no estimate)."""
        if not self.length_known or self.rate <= 0 or self.in_flight == 0:
            return None
        return dt.timedelta(minutes=self.in_flight / self.rate)

    def not_finished_note(self) -> str | None:
        """What to tell someone listing the run's failed URLs before it has finished (None: it has)."""
        if self.finished:
            return None
        return f"run {self.run} is not finished: {self.in_flight} lines in flight may still fail"


#: What a run id may be (``enqueue`` makes 12 hex digits): safe in keys, paths and file names.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def start_run(db: Database, run: str, *, retry_of: str | None = None) -> None:
    """Record that ``enqueue`` starts ``run`` (which retries ``retry_of``, if given).

    Raises ValueError for a run id that is not :data:`RUN_ID_PATTERN`.
    """
    if not RUN_ID_PATTERN.fullmatch(run):
        raise ValueError(f"a run id is 1 to 64 letters, digits, '_', '.' or '-', not {run!r}")
    fields = {"jobs": 0, "enqueued": 0, "rejected": 0, "skipped": 0, "sent_at": None, "finished_at": None}
    storage.runs(db).update_one(
        {"_id": run},
        {"$setOnInsert": {"started_at": storage.utcnow(), "retry_of": retry_of, **fields}},
        upsert=True,
    )


def run_progress(
    db: Database,
    run: str,
    *,
    enqueued: int,
    rejected: int,
    skipped: int,
    sent: bool = False,
    interrupted: bool = False,
) -> None:
    """Record how far ``enqueue`` got with ``run``: lines sent so far, and whether that is all."""
    fields: dict[str, Any] = {
        "jobs": enqueued + rejected,
        "enqueued": enqueued,
        "rejected": rejected,
        "skipped": skipped,
        "updated_at": storage.utcnow(),
        # A run seen finished while stalled that sends again after all is going on again.
        "finished_at": None,
    }
    if sent:
        fields["sent_at"] = storage.utcnow()
    if interrupted:
        fields["interrupted_at"] = storage.utcnow()
    storage.runs(db).update_one({"_id": run}, {"$set": fields})


def recent_runs(
    db: Database, limit: int = 0, *, skip: int = 0, now: dt.datetime | None = None
) -> list[RunSummary]:
    """The ``limit`` most recently started runs (0: all) after the ``skip`` latest, newest first."""
    documents = storage.runs(db).find({}, sort=[("started_at", DESCENDING)], skip=skip, limit=limit)
    return _summaries(db, list(documents), now)


def get_run(db: Database, run: str, *, now: dt.datetime | None = None) -> RunSummary | None:
    """Where ``run`` stands, or None if ``enqueue`` did not record it."""
    document = storage.runs(db).find_one({"_id": run})
    return None if document is None else _summaries(db, [document], now)[0]


def unfinished_runs(db: Database, *, now: dt.datetime | None = None) -> list[RunSummary]:
    """Every run not seen finished yet, newest first; those finished now are marked so.

    A run is finished once nothing more will happen to it (:attr:`RunSummary.finished`); the mark
    (``finished_at``) keeps this read to the runs still going, however many runs there were.
    """
    documents = list(storage.runs(db).find({"finished_at": None}, sort=[("started_at", DESCENDING)]))
    summaries = _summaries(db, documents, now)
    # The counters could say more than the ledger for a while (a late outcome counted twice,
    # until a recount): the ledger has the last word, once per run, before the mark is set.
    over = [
        summary.run
        for summary in summaries
        if (summary.finished and count_ended(db, summary.run) >= summary.jobs) or _abandoned(db, summary)
    ]
    if over:
        storage.runs(db).update_many(
            {"_id": {"$in": over}, "finished_at": None}, {"$set": {"finished_at": storage.utcnow()}}
        )
    return [summary for summary in summaries if summary.run not in over]


def retries_of(db: Database, run: str) -> list[str]:
    """The runs that retry ``run``'s failed URLs, oldest first."""
    documents = storage.runs(db).find(
        {"retry_of": run}, projection={"_id": 1}, sort=[("started_at", ASCENDING)]
    )
    return [document["_id"] for document in documents]


def count_runs(db: Database) -> int:
    """How many runs ``enqueue`` recorded (from collection metadata: no scan)."""
    return storage.runs(db).estimated_document_count()


def _abandoned(db: Database, summary: RunSummary) -> bool:
    """Lines in flight, but neither progress nor any outcome for :data:`ABANDONED_AFTER`.

    Its lines were lost (Redis lost its data) or its workers have been gone for that long: the
    runs going stop listing it (it keeps its state wherever it is shown).
    """
    if not summary.quiet_for(ABANDONED_AFTER):
        return False
    last = last_counted_minute(db, summary.run)
    return last is None or storage.as_utc(summary.now or storage.utcnow()) - last >= ABANDONED_AFTER


def last_counted_minute(db: Database, run: str, *, first: bool = False) -> dt.datetime | None:
    """The last (or ``first``) minute with a counted outcome of ``run``, or None.

    One key of the ``run_minute`` index.
    """
    row = storage.minute_counts(db).find_one(
        {"run": run},
        projection={"_id": 0, "minute": 1},
        sort=[("minute", ASCENDING if first else DESCENDING)],
    )
    return None if row is None else storage.as_utc(row["minute"])


def run_counts(db: Database, run: str, summary: RunSummary | None) -> dict[str, int]:
    """``run``'s jobs per outcome: its summary's, or (a run from before runs were recorded) its counters'."""
    return summary.counts if summary is not None else run_totals(db, [run])[run]


def has_outcomes(db: Database, run: str) -> bool:
    """Whether the ledger holds any outcome of ``run`` (a run enqueued before runs were recorded)."""
    return storage.ledger(db).find_one({"run": run}, projection={"_id": 1}) is not None


class UnknownRun(LookupError):
    """No run has this id: ``enqueue`` recorded none, and the ledger holds no outcome of one."""


def known_run(db: Database, run: str, *, now: dt.datetime | None = None) -> RunSummary | None:
    """Where ``run`` stands: None for a run enqueued before runs were recorded (it has outcomes
    only); :class:`UnknownRun` if there is no such run."""
    summary = get_run(db, run, now=now)
    if summary is None and not has_outcomes(db, run):
        raise UnknownRun(run)
    return summary


def _summaries(db: Database, documents: list[dict[str, Any]], now: dt.datetime | None) -> list[RunSummary]:
    now = storage.as_utc(now or storage.utcnow())
    window = storage.minute_of(now or storage.utcnow()) - (RATE_MINUTES - 1) * _MINUTE
    ids = [document["_id"] for document in documents]
    totals = run_totals(db, ids)
    recent = run_totals(db, ids, since=window)
    summaries = []
    for document in documents:
        started = storage.as_utc(document["started_at"])
        minutes = max((now - max(window, started)) / _MINUTE, 1.0)
        summaries.append(
            RunSummary(
                run=document["_id"],
                started_at=started,
                retry_of=document.get("retry_of"),
                jobs=int(document.get("jobs") or 0),
                sent=document.get("sent_at") is not None,
                interrupted=document.get("interrupted_at") is not None,
                counts=totals[document["_id"]],
                rate=sum(recent[document["_id"]].values()) / minutes,
                updated_at=_utc_or_none(document.get("updated_at")),
                now=now,
            )
        )
    return summaries


def _utc_or_none(value: Any) -> dt.datetime | None:
    return storage.as_utc(value) if isinstance(value, dt.datetime) else None


def top_error_reasons(
    db: Database, *, since: dt.datetime | None = None, run: str | None = None, limit: int = 10
) -> list[tuple[str | None, int]]:
    """The ``limit`` most frequent error reasons (0: all) with their counts, most frequent first.

    Of the errors that ended from ``since`` on (default: ever), of ``run`` or of all, summed
    from the reason counters of the window (index ``minute`` or ``run_minute``): the cost
    follows the minutes, runs and reasons, never the number of errors.
    """
    pipeline = _match_window(since, run)
    pipeline.append({"$group": {"_id": "$reason", "n": {"$sum": "$n"}}})
    pipeline.append({"$match": {"n": {"$gt": 0}}})
    pipeline.append({"$sort": {"n": DESCENDING, "_id": ASCENDING}})
    if limit:
        pipeline.append({"$limit": limit})
    return [(row["_id"], int(row["n"])) for row in storage.reason_counts(db).aggregate(pipeline)]


def failed_outcomes(
    db: Database, run: str, reasons: Sequence[str] = (), *, page: int = 1000
) -> Iterator[dict[str, Any]]:
    """The error outcomes of ``run`` in line order (``line``, ``url``, ``reason``, ``rejected``).

    With ``reasons``, only those whose reason contains one of them, ignoring case. Read a page
    at a time by line number (index ``run_outcome_line``), so that a consumer may pause for
    hours (``enqueue`` holding back) without a cursor timing out.
    """
    query: dict[str, Any] = {"run": run, "outcome": ERROR}
    if reasons:
        query["$or"] = [{"reason": {"$regex": re.escape(text), "$options": "i"}} for text in reasons]
    after: int | None = None
    while True:
        if after is not None:
            query["line"] = {"$gt": after}
        batch = list(
            storage.ledger(db).find(
                query,
                projection={"_id": 0, "line": 1, "url": 1, "reason": 1, "rejected": 1},
                sort=[("line", ASCENDING)],
                limit=page,
            )
        )
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1]["line"]


# --- failed lines, as a URL list to enqueue again ----------------------------------------

#: Why a failed line is written as a comment rather than as a URL to retry, in the order reported.
REDACTED = "credentials redacted in the ledger"
TRUNCATED = "url truncated in the ledger"
NOT_A_URL = "not a url enqueue takes"
_LEFT_OUT = (REDACTED, TRUNCATED, NOT_A_URL)


def left_out_because(entry: dict[str, Any]) -> str | None:
    """Why the error outcome ``entry`` cannot be retried from what the ledger holds (None: it can).

    The ledger keeps URLs without their credentials and cuts very long ones, and a line that
    ``enqueue`` rejected (not an http(s) URL, not UTF-8…) would only be rejected again.
    """
    url = entry.get("url")
    if not isinstance(url, str) or entry.get("rejected"):
        return NOT_A_URL
    if len(url) > MAX_STORED_URL:
        return TRUNCATED
    try:
        checked = check_url(url)
    except InvalidUrl:
        return NOT_A_URL
    if "@" in urlsplit(checked).netloc:  # the ledger keeps no credentials: these are "***"
        return REDACTED
    return None


def _one_line(text: object) -> str:
    """``text`` with every character that could end or hide a line escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


@dataclass
class FailedLines:
    """The lines of a URL list that retries a run's errors, and a tally of those left out.

    What ``image-crawler failed`` prints and the web app's ``/runs/<id>/failed.txt`` serves.
    """

    db: Database
    run: str
    reasons: Sequence[str] = ()
    listed: int = 0
    left_out: Counter[str] = field(default_factory=Counter)

    def lines(self) -> Iterator[tuple[str, bool]]:
        """Each error's line: its URL (True), or a ``# `` comment saying why not (False)."""
        for entry in failed_outcomes(self.db, self.run, self.reasons):
            self.listed += 1
            why = left_out_because(entry)
            if why is None:
                yield entry["url"], True
                continue
            self.left_out[why] += 1
            shown = redact_url(_one_line(entry.get("url", "")))  # also if stored before redaction
            yield f"# line {entry['line']}, {_one_line(entry.get('reason'))}: {why}: {shown}", False

    def urls(self) -> Iterator[bytes]:
        """The URL lines alone."""
        return (line.encode() for line, is_url in self.lines() if is_url)

    def left_out_note(self, *, retrying: bool = False) -> str | None:
        """How many of the lines read so far were left out, and why (None: none were).

        They were written as ``#`` comments; with ``retrying``, they were not sent again.
        """
        if not self.left_out:
            return None
        why = ", ".join(f"{self.left_out[reason]} {reason}" for reason in _LEFT_OUT if self.left_out[reason])
        how = ", not retried" if retrying else ", as # comments"
        return f"left out {sum(self.left_out.values())} of {self.listed} failed lines{how}: {why}"


def ended_jobs(db: Database, job_ids: Iterable[str]) -> set[str]:
    """Which of ``job_ids`` have an outcome already (one query)."""
    wanted = list(job_ids)
    if not wanted:
        return set()
    found = storage.ledger(db).find({"_id": {"$in": wanted}}, projection={"_id": 1})
    return {document["_id"] for document in found}


def last_ended_at(db: Database, run: str) -> dt.datetime | None:
    """When the last outcome of ``run`` was recorded, or None: read from every outcome of the run
    (for a benchmark's clock, not for pages)."""
    last = storage.ledger(db).find_one(
        {"run": run}, projection={"ended_at": 1}, sort=[("ended_at", DESCENDING)]
    )
    return None if last is None else storage.as_utc(last["ended_at"])


def count_ended(db: Database, run: str) -> int:
    """How many of ``run``'s lines have their outcome, counted in the ledger (exact; ``run_outcome_line``)."""
    return storage.ledger(db).count_documents({"run": run})


def count_outcomes(db: Database, run: str | None = None) -> dict[str, int]:
    """How many jobs ended in each outcome, for one run or overall, counted in the ledger.

    Exact at once, where the counters (:func:`counted_totals`, :func:`run_totals`) may lack for
    a few minutes what a crashed writer did not count; but it reads every outcome it counts:
    for the end of one run (``enqueue --wait``), not for pages.
    """
    pipeline: list[dict[str, Any]] = [{"$group": {"_id": "$outcome", "n": {"$sum": 1}}}]
    if run is not None:
        pipeline.insert(0, {"$match": {"run": run}})
    counts = dict.fromkeys(OUTCOMES, 0)
    for row in storage.ledger(db).aggregate(pipeline):
        counts[row["_id"]] = row["n"]
    return counts
