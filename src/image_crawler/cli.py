"""The ``image-crawler`` command: enqueue a URL list, wait for it, read the totals."""

from __future__ import annotations

import codecs
import itertools
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import click
import pymongo
import pymongo.errors
import redis.exceptions
from pymongo.database import Database

from . import outcomes, storage
from .broker import outage_budget
from .config import ConfigError, Settings, get_settings
from .errors import InvalidUrl
from .fetching import check_url
from .outcomes import Job
from .redaction import redact, redact_url

#: How long the command waits for an unreachable Redis or MongoDB before it says so. Workers ride
#: out minutes (``broker.REDIS_OUTAGE_BUDGET_S``); a person at a prompt wants to know.
OUTAGE_BUDGET_S = 5.0


@dataclass
class EnqueueReport:
    """What ``enqueue`` did with a file."""

    run: str
    enqueued: int = 0
    rejected: int = 0
    skipped: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def jobs(self) -> int:
        """Lines that became jobs (each gets one outcome)."""
        return self.enqueued + self.rejected


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # files saved by Windows editors
        yield number, raw.strip()


def enqueue_lines(
    stream: IO[bytes],
    db: Database,
    *,
    run: str | None = None,
    max_in_flight: int = 0,
    poll_interval: float = 0.5,
) -> EnqueueReport:
    """Queue every URL line of ``stream`` for fetching, streaming it in batches of lines.

    Blank and ``#`` lines are skipped. Lines that are not http(s) URLs (or not UTF-8) become
    jobs that end at once in an error outcome with the reason. The others go to Redis in one
    ``admit`` message per batch, which a worker turns into fetch messages. With
    ``max_in_flight`` > 0, holds back while that many jobs of this run have no outcome yet.
    """
    from .actors import ADMIT_BATCH, admit  # sets up the broker

    report = EnqueueReport(run=run or uuid.uuid4().hex[:12])
    done = 0  # outcomes of the run last seen; it only grows, so it is read only when it matters
    lines = _lines(stream)
    # Each batch of URLs waits until the next one is read: the last one then says how long the
    # run is, so that admission can cut a short run into batches small enough for every thread.
    held: dict[str, Any] | None = None
    while batch := list(itertools.islice(lines, ADMIT_BATCH)):
        admitted: list[tuple[int, str]] = []
        for number, raw in batch:
            if not raw or raw.startswith(b"#"):
                report.skipped += 1
                continue
            job, reason = _parse_line(report.run, number, raw)
            if reason is None:
                admitted.append((number, job.url))
            else:
                report.rejections.append(outcomes.outcome_document(job, outcomes.ERROR, reason=reason))
        if admitted:
            if held is not None:
                _admit(admit, held, report)
            held = {"run": report.run, "lines": admitted}
        report.rejected += len(report.rejections)
        _flush_rejections(db, report)
        # Counts what was sent only: the batch held back cannot end before it is sent.
        while max_in_flight and report.jobs - done >= max_in_flight:
            done, pause = _poll_done(db, report.run, poll_interval)
            if report.jobs - done >= max_in_flight:
                time.sleep(pause)
    if held is not None:
        held["run_lines"] = report.enqueued + len(held["lines"])
        _admit(admit, held, report)
    return report


def _admit(admit: Any, message: dict[str, Any], report: EnqueueReport) -> None:
    admit.send(message)
    report.enqueued += len(message["lines"])


def _parse_line(run: str, number: int, raw: bytes) -> tuple[Job, str | None]:
    """The job for a URL line, and why it is rejected (None: it is fine)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Job.new(
            run, number, redact_url(raw.decode("utf-8", "replace"), checked=False)
        ), "invalid utf-8"
    try:
        return Job.new(run, number, check_url(text)), None
    except InvalidUrl as exc:
        return Job.new(run, number, redact_url(text, checked=False)), exc.reason


def _flush_rejections(db: Database, report: EnqueueReport) -> None:
    outcomes.record_outcomes(db, report.rejections)
    report.rejections.clear()


#: Polls of the run's progress leave MongoDB idle at least this many times as long as they take:
#: counting the outcomes of a run grows with the run, and a poll must not load the server.
_POLL_IDLE_FACTOR = 20


def _done(db: Database, run: str) -> int:
    return storage.outcomes(db).count_documents({"run": run})


def _poll_done(db: Database, run: str, poll_interval: float) -> tuple[int, float]:
    """Outcomes of ``run`` so far, and how long to wait before asking again."""
    started = time.monotonic()
    done = _done(db, run)
    return done, max(poll_interval, _POLL_IDLE_FACTOR * (time.monotonic() - started))


def wait_for_run(
    db: Database, run: str, jobs: int, *, timeout: float | None = None, poll_interval: float = 0.5
) -> bool:
    """Show a progress bar until every job of ``run`` has an outcome; False if ``timeout`` ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with click.progressbar(length=jobs, label="crawling", show_pos=True, show_eta=True) as bar:
        done = 0
        while True:
            now_done, pause = _poll_done(db, run, poll_interval)
            bar.update(now_done - done)
            done = now_done
            if done >= jobs:
                return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                pause = min(pause, left)
            time.sleep(pause)


def summary_line(total: int, counts: dict[str, int]) -> str:
    """``done: 544 urls — 401 success, 99 duplicate, 44 error``."""
    parts = ", ".join(f"{counts.get(name, 0)} {name}" for name in outcomes.OUTCOMES)
    return f"done: {total} urls — {parts}"


class ServiceUnreachable(click.ClickException):
    """Redis or MongoDB failed the command (unreachable for ``OUTAGE_BUDGET_S``, or refusing it).

    Reported in one line on stderr, with exit code 2 (as click's usage errors); the command's
    other errors exit with 1.
    """

    exit_code = 2


#: What pymongo appends to a connection error: the timeouts in force, the whole topology.
_PYMONGO_DETAILS = re.compile(r" \(configured timeouts:[^)]*\)|, Timeout: .*", re.DOTALL)
_MAX_CAUSE = 300


def _cause(exc: Exception) -> str:
    """What went wrong, in one short line without credentials."""
    text = " ".join(_PYMONGO_DETAILS.sub("", str(exc)).split()) or type(exc).__name__
    text = redact(text)
    return text if len(text) <= _MAX_CAUSE else text[: _MAX_CAUSE - 1] + "…"


@contextmanager
def _reporting_outages(settings: Settings) -> Iterator[None]:
    """Turn a Redis or MongoDB failure, whenever it happens, into :class:`ServiceUnreachable`."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        where = redact_url(settings.redis_url, checked=False)
        raise ServiceUnreachable(f"cannot reach Redis at {where}: {_cause(exc)}") from None
    except pymongo.errors.PyMongoError as exc:
        where = redact_url(settings.mongo_uri, checked=False)
        raise ServiceUnreachable(f"cannot reach MongoDB at {where}: {_cause(exc)}") from None


def _connect_database(settings: Settings) -> Database:
    """A handle on ``MONGO_URI`` that gives up on an unreachable server within ``OUTAGE_BUDGET_S``.

    Its own client, not the workers' (``storage.get_database``), whose patience is theirs.
    """
    return storage.connect(settings, timeout_s=OUTAGE_BUDGET_S)


def _database(settings: Settings) -> Database:
    db = _connect_database(settings)
    click.get_current_context().call_on_close(db.client.close)
    storage.ensure_indexes(db)
    return db


def _check_redis() -> None:
    from .actors import broker  # sets up the broker, within the command's outage budget

    broker.client.ping()


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="image-crawler")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Crawl image URLs into MongoDB with Dramatiq workers (run `dramatiq image_crawler.actors`)."""
    # Every Redis client of this command (the broker's, made when the actors are imported) gives
    # up after seconds; the workers' ride out minutes.
    ctx.with_resource(outage_budget(OUTAGE_BUDGET_S))


@main.command()
@click.argument("file", type=click.File("rb"))
@click.option("--wait", is_flag=True, help="Show progress until every URL has an outcome, then a summary.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None, help="With --wait: give up after SECONDS."
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    help="Hold back while this many URLs of the run are unfinished (0: no limit).",
)
def enqueue(file: IO[bytes], wait: bool, timeout: float | None, max_in_flight: int) -> None:
    """Enqueue every URL line of FILE (- for stdin); blank and # lines are skipped."""
    settings = _settings()
    with _reporting_outages(settings):
        # Both services answer before a line is read: nothing is recorded for a run never sent.
        _check_redis()
        db = _database(settings)
        report = enqueue_lines(file, db, max_in_flight=max_in_flight)
        click.echo(
            f"run {report.run}: enqueued {report.enqueued} urls"
            f" ({report.rejected} rejected lines, {report.skipped} blank or comment lines skipped)"
        )
        if not wait:
            return
        if not wait_for_run(db, report.run, report.jobs, timeout=timeout):
            missing = report.jobs - _done(db, report.run)
            raise click.ClickException(f"gave up after {timeout:g} s: {missing} urls still have no outcome")
        click.echo(summary_line(report.jobs, outcomes.count_outcomes(db, report.run)))


@main.command()
@click.option("--run", default=None, help="Only this run (as printed by enqueue).")
def status(run: str | None) -> None:
    """Totals of outcomes so far, and the most frequent error reasons."""
    settings = _settings()
    with _reporting_outages(settings):
        db = _database(settings)
        counts = outcomes.count_outcomes(db, run)
        click.echo(summary_line(sum(counts.values()), counts))
        match: dict[str, Any] = {"outcome": outcomes.ERROR}
        if run is not None:
            match["run"] = run
        reasons = storage.outcomes(db).aggregate(
            [
                {"$match": match},
                {"$group": {"_id": "$reason", "n": {"$sum": 1}}},
                {"$sort": {"n": -1}},
                {"$limit": 10},
            ]
        )
        for row in reasons:
            click.echo(f"  {row['n']:>8}  {row['_id']}")
