"""The ``image-crawler`` command: enqueue a URL list, wait for it, follow runs, retry what failed."""

from __future__ import annotations

import codecs
import contextlib
import itertools
import re
import time
import uuid
from collections.abc import Iterable, Iterator
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


def _lines(stream: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # files saved by Windows editors
        yield number, raw.strip()


def enqueue_lines(
    stream: Iterable[bytes],
    db: Database,
    *,
    run: str | None = None,
    max_in_flight: int = 0,
    poll_interval: float = 0.5,
    retry_of: str | None = None,
) -> EnqueueReport:
    """Queue every URL line of ``stream`` for fetching, streaming it in batches of lines.

    Blank and ``#`` lines are skipped. Lines that are not http(s) URLs (or not UTF-8) become
    jobs that end at once in an error outcome with the reason. The others go to Redis in one
    ``admit`` message per batch, which a worker turns into fetch messages. With
    ``max_in_flight`` > 0, holds back while that many jobs of this run have no outcome yet.

    The run is recorded in ``runs`` (retrying ``retry_of``, if given) before anything is sent,
    with the lines sent so far after each batch and its length once the whole stream is read.
    """
    from .actors import ADMIT_BATCH, admit  # sets up the broker

    report = EnqueueReport(run=run or uuid.uuid4().hex[:12])
    outcomes.start_run(db, report.run, retry_of=retry_of)
    try:
        _send_lines(stream, db, report, admit, ADMIT_BATCH, max_in_flight, poll_interval)
    except BaseException as exc:
        # What was sent still ends in outcomes; the run says it will not get more lines (unless
        # MongoDB itself is what failed: asking it again would only wait out the budget twice).
        if not isinstance(exc, pymongo.errors.PyMongoError):
            with contextlib.suppress(pymongo.errors.PyMongoError):
                _record_progress(db, report, interrupted=True)
        raise
    return report


def _send_lines(
    stream: Iterable[bytes],
    db: Database,
    report: EnqueueReport,
    admit: Any,
    admit_batch: int,
    max_in_flight: int,
    poll_interval: float,
) -> None:
    done = 0  # outcomes of the run last seen; it only grows, so it is read only when it matters
    lines = _lines(stream)
    # Each batch of URLs waits until the next one is read: the last one then says how long the
    # run is, so that admission can cut a short run into batches small enough for every thread.
    held: dict[str, Any] | None = None
    while batch := list(itertools.islice(lines, admit_batch)):
        admitted: list[tuple[int, str]] = []
        for number, raw in batch:
            if not raw or raw.startswith(b"#"):
                report.skipped += 1
                continue
            job, reason = _parse_line(report.run, number, raw)
            if reason is None:
                admitted.append((number, job.url))
            else:
                report.rejections.append(
                    outcomes.outcome_document(job, outcomes.ERROR, reason=reason, rejected=True)
                )
        if admitted:
            if held is not None:
                _admit(admit, held, report)
            held = {"run": report.run, "lines": admitted}
        report.rejected += len(report.rejections)
        _flush_rejections(db, report)
        _record_progress(db, report)
        # Counts what was sent only: the batch held back cannot end before it is sent.
        while max_in_flight and report.jobs - done >= max_in_flight:
            done, pause = _poll_done(db, report.run, poll_interval)
            if report.jobs - done >= max_in_flight:
                time.sleep(pause)
    last = 0 if held is None else len(held["lines"])
    # The run's length is recorded before its last batch is sent, so that nothing waits for
    # MongoDB between the last line sent and the report (a failed send records the truth).
    _record_progress(db, report, sent=True, sending=last)
    if held is not None:
        held["run_lines"] = report.enqueued + last
        _admit(admit, held, report)


def _record_progress(
    db: Database, report: EnqueueReport, *, sent: bool = False, interrupted: bool = False, sending: int = 0
) -> None:
    outcomes.run_progress(
        db,
        report.run,
        enqueued=report.enqueued + sending,
        rejected=report.rejected,
        skipped=report.skipped,
        sent=sent,
        interrupted=interrupted,
    )


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


def _poll_done(db: Database, run: str, poll_interval: float) -> tuple[int, float]:
    """Outcomes of ``run`` so far, and how long to wait before asking again."""
    started = time.monotonic()
    done = outcomes.count_ended(db, run)
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


def _enqueue_options(command: Any) -> Any:
    """The options ``enqueue`` and ``retry`` share."""
    for option in reversed(
        [
            click.option(
                "--wait", is_flag=True, help="Show progress until every URL has an outcome, then a summary."
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(min=0),
                default=None,
                help="With --wait: give up after SECONDS.",
            ),
            click.option(
                "--max-in-flight",
                type=click.IntRange(min=0),
                default=100_000,
                show_default=True,
                help="Hold back while this many URLs of the run are unfinished (0: no limit).",
            ),
        ]
    ):
        command = option(command)
    return command


@main.command()
@click.argument("file", type=click.File("rb"))
@_enqueue_options
def enqueue(file: IO[bytes], wait: bool, timeout: float | None, max_in_flight: int) -> None:
    """Enqueue every URL line of FILE (- for stdin); blank and # lines are skipped."""
    settings = _settings()
    with _reporting_outages(settings):
        # Both services answer before a line is read: nothing is recorded for a run never sent.
        _check_redis()
        db = _database(settings)
        _send_and_report(db, file, wait=wait, timeout=timeout, max_in_flight=max_in_flight)


def _send_and_report(
    db: Database,
    lines: Iterable[bytes],
    *,
    wait: bool,
    timeout: float | None,
    max_in_flight: int,
    retry_of: str | None = None,
    after_sending: Any = None,
) -> None:
    """Enqueue ``lines`` as a run, say what was sent, and with ``wait`` wait for the summary."""
    report = enqueue_lines(lines, db, max_in_flight=max_in_flight, retry_of=retry_of)
    click.echo(
        f"run {report.run}: enqueued {report.enqueued} urls"
        f" ({report.rejected} rejected lines, {report.skipped} blank or comment lines skipped)"
    )
    if after_sending is not None:
        after_sending()
    if not wait:
        return
    if not wait_for_run(db, report.run, report.jobs, timeout=timeout):
        missing = report.jobs - outcomes.count_ended(db, report.run)
        raise click.ClickException(f"gave up after {timeout:g} s: {missing} urls still have no outcome")
    click.echo(summary_line(report.jobs, outcomes.count_outcomes(db, report.run)))


def _settle(db: Database) -> None:
    """One reconciliation pass, so that the counters shown include what a crashed writer missed."""
    outcomes.reconcile_if_due(db, outcomes.Schedule())


def _known_run(db: Database, run: str) -> outcomes.RunSummary | None:
    """Where ``run`` stands (None for a run enqueued before runs were recorded); an error if unknown."""
    try:
        return outcomes.known_run(db, run)
    except outcomes.UnknownRun:
        raise click.ClickException(f"no run {run} (image-crawler runs lists them)") from None


def _lines_shown(summary: outcomes.RunSummary) -> str:
    """The run's length, or the lines sent so far followed by ``+`` while it may get more."""
    return f"{summary.jobs}" if summary.length_known else f"{summary.jobs}+"


def _started(summary: outcomes.RunSummary) -> str:
    return f"{summary.started_at:%Y-%m-%d %H:%M:%S}"


@main.command(short_help="Totals and top error reasons, of RUN if given.")
@click.argument("run", required=False)
@click.option("--run", "run_option", default=None, hidden=True, help="Deprecated: give RUN as an argument.")
def status(run: str | None, run_option: str | None) -> None:
    """Totals of outcomes so far, and the most frequent error reasons (of RUN only, if given)."""
    if run_option is not None:
        if run is not None and run != run_option:
            raise click.UsageError("give the run once: RUN, or the deprecated --run, not both")
        run = run_option
    settings = _settings()
    with _reporting_outages(settings):
        db = _database(settings)
        _settle(db)
        if run is None:
            counts = outcomes.counted_totals(db)
        else:
            summary = _known_run(db, run)
            counts = outcomes.run_counts(db, run, summary)
            if summary is not None:
                retry = "" if summary.retry_of is None else f", retry of {summary.retry_of}"
                click.echo(
                    f"run {run}: started {_started(summary)} UTC, {_lines_shown(summary)} lines,"
                    f" {summary.in_flight} in flight, {summary.state}{retry}"
                )
        click.echo(summary_line(sum(counts.values()), counts))
        for reason, n in outcomes.top_error_reasons(db, run=run):
            click.echo(f"  {n:>8}  {reason}")


_RUNS_COLUMNS = (
    ("RUN", "<"),
    ("STARTED (UTC)", "<"),
    ("LINES", ">"),
    ("SUCCESS", ">"),
    ("DUPLICATE", ">"),
    ("ERROR", ">"),
    ("IN FLIGHT", ">"),
    ("URLS/MIN", ">"),
    ("STATE", "<"),
    ("RETRY OF", "<"),
)


@main.command(short_help="One line per run: outcomes, in flight, pace, state.")
@click.option(
    "--limit", type=click.IntRange(min=0), default=20, show_default=True, help="The N latest runs (0: all)."
)
def runs(limit: int) -> None:
    """One line per run, newest first: lines, outcomes, lines in flight, recent pace, state.

    URLS/MIN counts outcomes per minute over the last few minutes (- once done); STATE is sending
    (enqueue is still reading its file), stalled (sending, but nothing for 10 minutes), interrupted
    (enqueue stopped before the end of it), running or done.
    """
    settings = _settings()
    with _reporting_outages(settings):
        db = _database(settings)
        _settle(db)
        summaries = outcomes.recent_runs(db, limit)
    if not summaries:
        click.echo("no runs yet")
        return
    rows = [
        [
            summary.run,
            _started(summary),
            _lines_shown(summary),
            *(str(summary.counts[name]) for name in outcomes.OUTCOMES),
            str(summary.in_flight),
            "-" if summary.pace is None else f"{summary.pace:.1f}",
            summary.state,
            summary.retry_of or "",
        ]
        for summary in summaries
    ]
    header = [name for name, _ in _RUNS_COLUMNS]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = (
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(row, _RUNS_COLUMNS, widths, strict=True)
        )
        click.echo("  ".join(cells).rstrip())


def _say_what_was_left_out(failures: outcomes.FailedLines, *, retrying: bool = False) -> None:
    note = failures.left_out_note(retrying=retrying)
    if note:
        click.echo(note, err=True)


def _not_finished_note(summary: outcomes.RunSummary | None) -> None:
    note = None if summary is None else summary.not_finished_note()
    if note:
        click.echo(note, err=True)


_REASON_OPTION = click.option(
    "--reason",
    "reasons",
    multiple=True,
    metavar="TEXT",
    help='Only errors whose reason contains TEXT, ignoring case ("http 5": every 5xx); repeatable.',
)


@main.command(short_help="RUN's failed URLs, as a URL list to enqueue again.")
@click.argument("run")
@_REASON_OPTION
def failed(run: str, reasons: tuple[str, ...]) -> None:
    """The URLs of RUN's errors, one per line in line order: a URL list to enqueue again.

    Errors that cannot be retried as the ledger keeps them (credentials redacted, URL truncated,
    a line enqueue rejected) are written as # comments, which enqueue skips; stderr says how
    many. `image-crawler failed RUN | image-crawler enqueue - --wait` retries the others.
    """
    settings = _settings()
    with _reporting_outages(settings):
        db = _database(settings)
        _settle(db)
        summary = _known_run(db, run)
        failures = outcomes.FailedLines(db, run, reasons)
        for line, _ in failures.lines():
            click.echo(line)
    _say_what_was_left_out(failures)
    _not_finished_note(summary)


@main.command(short_help="Enqueue RUN's failed URLs again, as a new run.")
@click.argument("run")
@_REASON_OPTION
@_enqueue_options
def retry(run: str, reasons: tuple[str, ...], wait: bool, timeout: float | None, max_in_flight: int) -> None:
    """Enqueue the URLs of RUN's errors again, as a new run that records it retries RUN.

    The same as `image-crawler failed RUN | image-crawler enqueue -`, with enqueue's options.
    """
    settings = _settings()
    with _reporting_outages(settings):
        _check_redis()
        db = _database(settings)
        _settle(db)
        summary = _known_run(db, run)
        failures = outcomes.FailedLines(db, run, reasons)
        urls = failures.urls()
        first = next(urls, None)
        if first is None:
            click.echo(f"nothing to retry in run {run}")
            _say_what_was_left_out(failures, retrying=True)
            _not_finished_note(summary)
            return

        def after_sending() -> None:
            _say_what_was_left_out(failures, retrying=True)
            _not_finished_note(summary)

        _send_and_report(
            db,
            itertools.chain([first], urls),
            wait=wait,
            timeout=timeout,
            max_in_flight=max_in_flight,
            retry_of=run,
            after_sending=after_sending,
        )


@main.command(short_help="Recount settled minutes' counters from the ledger.")
@click.option("--all", "everything", is_flag=True, help="Recount every minute of the ledger again.")
def reconcile(everything: bool) -> None:
    """Recount the per-minute counters of settled minutes from the ledger.

    Workers and the web app do this as they go, a few minutes behind. Run it once after
    upgrading from a version without counters, so that the outcomes recorded before count.
    """
    settings = _settings()
    with _reporting_outages(settings):
        db = _database(settings)
        if everything:
            outcomes.forget_reconciliation(db)
        recounted = 0
        while passed := outcomes.reconcile(db):
            recounted += passed
    click.echo(f"recounted {recounted} minutes that had outcomes")
