"""The ``image-crawler`` command, as a user runs it: enqueue a list, wait for it, read the totals.

MongoDB is mongomock here (no server can run on these machines): the command's database is
the test's. Redis, the broker and the worker are real. Unreachable services are real too: the
command runs as a process against a closed port, or a port that accepts and never answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import dramatiq
import pymongo
import pytest
import redis.retry
from click.testing import CliRunner

from image_crawler import actors, cli, outcomes, storage
from image_crawler import broker as broker_module
from image_crawler.broker import ADMIT_QUEUE, REDIS_OUTAGE_BUDGET_S, connect_redis
from image_crawler.cli import enqueue_lines, main, summary_line
from image_crawler.config import get_settings
from image_crawler.dramatiq_internals import queue_keys
from image_crawler.outcomes import Job
from support.clock import FakeClock, fake_time_of
from support.images import png_bytes
from support.processes import image_crawler_command, run_bounded
from support.stores import get_outcome, record_outcome

# ``actors`` is imported above, at collection, as a worker imports it: its broker is set up outside
# any command's Redis outage budget, whichever test runs the command first.

_ENQUEUED = re.compile(
    r"^run (\w+): enqueued (\d+) urls \((\d+) rejected lines, (\d+) blank or comment lines skipped\)$"
)


@pytest.fixture
def db(mongo_db, monkeypatch):
    """The database the command will use."""
    monkeypatch.setattr(cli, "_connect_database", lambda settings: mongo_db)
    return mongo_db


@pytest.fixture
def no_workers(redis_url):
    """The broker with nobody consuming; whatever a test leaves on its queues is thrown away."""
    actors.broker.flush_all()
    yield actors.broker
    actors.broker.flush_all()


@pytest.fixture
def run_cli():
    runner = CliRunner()

    def invoke(*args: str, input: bytes | None = None):
        return runner.invoke(main, list(args), input=input)

    return invoke


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The command's clock (its polls, pauses and ``--timeout``), moved only by its own pauses."""
    fake = fake_time_of(monkeypatch, cli)
    return fake


def _enqueued(output: str) -> tuple[str, int, int, int]:
    """Run id, enqueued, rejected and skipped from enqueue's first line of output."""
    match = _ENQUEUED.match(output.splitlines()[0])
    assert match, output
    run, *numbers = match.groups()
    return run, *map(int, numbers)


def _queued_urls(broker) -> int:
    """URL lines waiting in Redis, in the admit messages ``enqueue`` sent."""
    messages = broker.client.hvals(queue_keys(ADMIT_QUEUE, broker.namespace).messages)
    return sum(len(dramatiq.Message.decode(data).args[0]["lines"]) for data in messages)


def _last_line(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


def _stdout(run_cli, *args: str, input: bytes | None = None) -> str:
    """What ``image-crawler ARGS`` printed on stdout; it must have succeeded."""
    result = run_cli(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


# --- enqueue ----------------------------------------------------------------------------


def test_enqueue_a_file_and_wait_for_the_summary(make_pipeline, db, server, tmp_path, run_cli):
    make_pipeline(threads=4)
    server.add("/a.png", png_bytes(30, 20, seed=1), content_type="image/png")
    server.add("/b.png", png_bytes(30, 20, seed=2), content_type="image/png")
    urls = tmp_path / "urls.txt"
    lines = [
        "# images for the test",
        "",
        server.url("/a.png"),
        server.url("/b.png"),
        server.url("/gone"),
        "nope",
    ]
    urls.write_bytes("\r\n".join(lines).encode() + b"\r\n")  # a file saved on Windows

    result = run_cli("enqueue", str(urls), "--wait", "--timeout", "60")

    assert result.exit_code == 0, result.output
    run, enqueued, rejected, skipped = _enqueued(result.stdout)
    assert (enqueued, rejected, skipped) == (3, 1, 2)
    assert _last_line(result.stdout) == "done: 4 urls — 2 success, 0 duplicate, 2 error"
    reasons = {entry["line"]: entry["reason"] for entry in storage.ledger(db).find({"run": run})}
    assert reasons == {3: None, 4: None, 5: "http 404", 6: "not an http(s) url"}


def test_enqueue_from_stdin(make_pipeline, db, server, run_cli):
    make_pipeline(threads=4)
    body = png_bytes(25, 25, seed=3)
    server.add("/one.png", body, content_type="image/png")
    server.add("/same-bytes.png", body, content_type="image/png")
    text = f"{server.url('/one.png')}\n\n{server.url('/same-bytes.png')}\n"

    result = run_cli("enqueue", "-", "--wait", "--timeout", "60", input=text.encode())

    assert result.exit_code == 0, result.output
    assert _enqueued(result.stdout)[1:] == (2, 0, 1)
    assert _last_line(result.stdout) == "done: 2 urls — 1 success, 1 duplicate, 0 error"


def test_without_wait_enqueue_returns_after_sending(db, no_workers, run_cli):
    result = run_cli("enqueue", "-", input=b"http://example.com/a.png\nhttp://example.com/b.png\n")

    assert result.exit_code == 0, result.output
    run, enqueued, rejected, skipped = _enqueued(result.stdout)
    assert (enqueued, rejected, skipped) == (2, 0, 0)
    assert len(result.stdout.splitlines()) == 1
    assert _queued_urls(no_workers) == 2
    assert outcomes.count_outcomes(db, run) == {"success": 0, "duplicate": 0, "error": 0}


def test_blank_and_comment_lines_are_not_jobs(db, no_workers, run_cli):
    text = b"# header\n\n   \n\t\n  # indented comment\n#http://example.com/commented-out.png\n"

    result = run_cli("enqueue", "-", "--wait", input=text)

    assert result.exit_code == 0, result.output
    run, enqueued, rejected, skipped = _enqueued(result.stdout)
    assert (enqueued, rejected, skipped) == (0, 0, 6)
    assert storage.ledger(db).count_documents({"run": run}) == 0
    assert _queued_urls(no_workers) == 0


def _the_one_rejected_line(db, run_cli, text: bytes, line: int) -> dict:
    """The outcome of line ``line`` of ``text``, its one line to enqueue, which ``enqueue --wait`` rejects."""
    stdout = _stdout(run_cli, "enqueue", "-", "--wait", input=text)
    run, enqueued, rejected, _ = _enqueued(stdout)
    assert (enqueued, rejected) == (0, 1)
    assert _last_line(stdout) == "done: 1 urls — 0 success, 0 duplicate, 1 error"
    return get_outcome(db, f"{run}:{line}")


def test_a_line_that_is_not_utf8_ends_in_an_error_outcome(db, no_workers, run_cli):
    entry = _the_one_rejected_line(db, run_cli, b"http://example.com/caf\xe9.png\n", line=1)

    assert (entry["outcome"], entry["reason"]) == ("error", "invalid utf-8")
    assert entry["url"] == "http://example.com/caf\ufffd.png"


def test_a_rejected_line_keeps_no_credentials_however_badly_written(db, no_workers, run_cli):
    lines = b"http://user:pa/ss@host.test/a.png\nhttp://user:pa ss@host.test/b.png\nhttp://u:p#w@h/c.png\n"

    result = run_cli("enqueue", "-", "--wait", input=lines)

    assert result.exit_code == 0, result.output
    run, enqueued, rejected, _ = _enqueued(result.stdout)
    assert (enqueued, rejected) == (0, 3)
    urls = [get_outcome(db, f"{run}:{line}")["url"] for line in (1, 2, 3)]
    assert urls == ["http://***@host.test/a.png", "http://***@host.test/b.png", "http://***@h/c.png"]


def test_a_100_kb_line_ends_in_error_with_its_url_truncated(db, no_workers, run_cli):
    line = "http://example.com/" + "a" * 100_000

    entry = _the_one_rejected_line(db, run_cli, f"# a very long line\n{line}\n".encode(), line=2)

    assert (entry["outcome"], entry["reason"]) == ("error", "url too long")
    assert entry["url"].startswith(line[: outcomes.MAX_STORED_URL])
    assert entry["url"].endswith(f"({len(line)} characters)")
    assert len(entry["url"]) < 2 * outcomes.MAX_STORED_URL


def test_an_empty_file_enqueues_nothing_and_wait_returns_at_once(db, no_workers, tmp_path, run_cli, clock):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")

    result = run_cli("enqueue", str(empty), "--wait")

    assert result.exit_code == 0, result.output
    assert _enqueued(result.stdout)[1:] == (0, 0, 0)
    assert _last_line(result.stdout) == "done: 0 urls — 0 success, 0 duplicate, 0 error"
    assert clock.slept == []  # not one pause between polls


def test_wait_with_a_timeout_and_no_workers_gives_up_with_a_clear_message(db, no_workers, run_cli, clock):
    result = run_cli("enqueue", "-", "--wait", "--timeout", "1", input=b"http://example.com/a.png\n")

    assert result.exit_code == 1
    assert result.stderr == "Error: gave up after 1 s: 1 urls still have no outcome\n"
    assert sum(clock.slept) == pytest.approx(1.0)  # it waited out the timeout, and no longer
    assert max(clock.slept) <= 0.5  # polling meanwhile (every poll_interval)


def test_a_missing_file_is_a_usage_error(db, run_cli, tmp_path):
    result = run_cli("enqueue", str(tmp_path / "nowhere.txt"))

    assert result.exit_code == 2
    assert "nowhere.txt" in result.stderr


def test_a_negative_timeout_is_a_usage_error(db, run_cli):
    result = run_cli("enqueue", "-", "--wait", "--timeout", "-1", input=b"")

    assert result.exit_code == 2
    assert "--timeout" in result.stderr


def test_enqueue_holds_back_while_max_in_flight_jobs_are_unfinished(db, no_workers, monkeypatch):
    lines = "".join(f"http://example.com/{n}.png\n" for n in range(1500)).encode()
    pauses = threading.Semaphore(0)

    def pause(seconds: float) -> None:  # the sender found too many jobs unfinished, and waits
        pauses.release()
        time.sleep(seconds)

    monkeypatch.setattr(cli, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=pause))
    reports = []
    sender = threading.Thread(
        target=lambda: reports.append(
            enqueue_lines(io.BytesIO(lines), db, run="held", max_in_flight=1000, poll_interval=0.02)
        ),
        daemon=True,
    )
    sender.start()
    for _ in range(2):  # it polled twice and held back both times
        assert pauses.acquire(timeout=20), "the sender never paused"

    held_at = _queued_urls(no_workers)
    assert sender.is_alive()
    assert 1000 <= held_at < 1500

    ended = [Job.new("held", line, f"http://example.com/{line - 1}.png") for line in range(1, held_at + 1)]
    outcomes.record_outcomes(
        db, [outcomes.outcome_document(job, outcomes.ERROR, reason="x") for job in ended]
    )
    sender.join(timeout=20)

    assert not sender.is_alive()
    assert reports[0].enqueued == 1500
    assert _queued_urls(no_workers) == 1500


def test_a_file_saved_with_a_byte_order_mark_keeps_its_first_url(db, no_workers, run_cli):
    result = run_cli(
        "enqueue", "-", input=b"\xef\xbb\xbfhttp://example.com/a.png\nhttp://example.com/b.png\n"
    )

    assert result.exit_code == 0, result.output
    assert _enqueued(result.stdout)[1:] == (2, 0, 0)


def test_a_byte_order_mark_later_in_the_file_is_not_a_url(db, no_workers, run_cli):
    result = run_cli("enqueue", "-", "--wait", input=b"# list\n\xef\xbb\xbfhttp://example.com/a.png\n")

    assert result.exit_code == 0, result.output
    run, enqueued, rejected, _ = _enqueued(result.stdout)
    assert (enqueued, rejected) == (0, 1)
    assert get_outcome(db, f"{run}:2")["reason"] == "not an http(s) url"


# --- status -----------------------------------------------------------------------------


@pytest.fixture
def ledger(db):
    def record(run, line, outcome, reason=None):
        record_outcome(db, Job.new(run, line, f"http://example.com/{line}"), outcome, reason=reason)

    record("first", 1, outcomes.SUCCESS)
    record("first", 2, outcomes.DUPLICATE)
    record("first", 3, outcomes.ERROR, "http 404")
    record("first", 4, outcomes.ERROR, "http 404")
    record("first", 5, outcomes.ERROR, "timeout")
    record("second", 1, outcomes.SUCCESS)
    record("second", 2, outcomes.ERROR, "not an image")
    return db


#: What ``status`` shows of the run "second" of ``ledger``.
_SECOND_RUN_STATUS = [
    "done: 2 urls — 1 success, 0 duplicate, 1 error",
    "         1  not an image",
]


def test_status_shows_totals_and_the_most_frequent_error_reasons(ledger, run_cli):
    lines = _stdout(run_cli, "status").splitlines()

    assert lines[0] == "done: 7 urls — 2 success, 1 duplicate, 4 error"
    assert lines[1] == "         2  http 404"
    assert sorted(lines[2:]) == ["         1  not an image", "         1  timeout"]


def test_status_of_one_run(ledger, run_cli):
    assert _stdout(run_cli, "status", "--run", "second").splitlines() == _SECOND_RUN_STATUS


def test_status_of_an_empty_database(db, run_cli):
    assert _stdout(run_cli, "status") == "done: 0 urls — 0 success, 0 duplicate, 0 error\n"


def test_status_takes_the_run_as_an_argument(ledger, run_cli):
    assert _stdout(run_cli, "status", "second").splitlines() == _SECOND_RUN_STATUS


def test_status_of_a_run_enqueue_recorded_shows_its_lines_and_whether_it_is_finished(db, no_workers, run_cli):
    run = _enqueue(run_cli, "http://example.com/a.png", "http://example.com/b.png", "nope")
    _record(db, run, 1, "http://example.com/a.png", outcomes.SUCCESS)

    running = run_cli("status", run)
    _record(db, run, 2, "http://example.com/b.png", outcomes.ERROR, "http 404")
    finished = run_cli("status", run)

    assert running.exit_code == 0, running.output
    header = re.fullmatch(
        rf"run {run}: started (\S+ \S+) UTC, 3 lines, 1 in flight, running", _first(running)
    )
    assert header, running.stdout
    started = dt.datetime.fromisoformat(header.group(1)).replace(tzinfo=dt.UTC)
    assert abs(started - storage.utcnow()) < dt.timedelta(minutes=1)
    assert running.stdout.splitlines()[1] == "done: 2 urls — 1 success, 0 duplicate, 1 error"
    assert finished.stdout.splitlines()[:2] == [
        f"run {run}: started {header.group(1)} UTC, 3 lines, 0 in flight, done",
        "done: 3 urls — 1 success, 0 duplicate, 2 error",
    ]
    assert sorted(finished.stdout.splitlines()[2:]) == [
        "         1  http 404",
        "         1  not an http(s) url",
    ]


def test_status_of_an_unknown_run_says_so(db, run_cli):
    result = run_cli("status", "nope")

    assert result.exit_code == 1
    assert result.stderr == "Error: no run nope (image-crawler runs lists them)\n"


def test_status_with_the_old_run_option_still_works_but_not_with_another_run(ledger, run_cli):
    assert run_cli("status", "--run", "second").stdout == run_cli("status", "second").stdout

    both = run_cli("status", "first", "--run", "second")

    assert both.exit_code == 2
    assert "--run" in both.stderr


def test_summary_line_names_every_outcome():
    assert (
        summary_line(544, {"success": 401, "error": 44})
        == "done: 544 urls — 401 success, 0 duplicate, 44 error"
    )


# --- runs, failed, retry ---------------------------------------------------------------


def _enqueue(run_cli, *lines: str) -> str:
    """Enqueue ``lines`` (no worker takes them) and return the run."""
    text = "".join(f"{line}\n" for line in lines)
    return _enqueued(_stdout(run_cli, "enqueue", "-", input=text.encode()))[0]


def _record(db, run: str, line: int, url: str, outcome: str, reason: str | None = None, at=None) -> None:
    """The outcome of one line, as a worker records it."""
    job = Job.new(run, line, url)
    outcomes.record_outcomes(db, [outcomes.outcome_document(job, outcome, reason=reason, at=at)])


def _first(result) -> str:
    return result.stdout.splitlines()[0]


def _table(output: str) -> list[dict[str, str]]:
    """The rows of ``image-crawler runs``, keyed by their column."""
    header, *rows = output.splitlines()
    assert header.split() == [
        "RUN", "STARTED", "(UTC)", "LINES", "SUCCESS", "DUPLICATE", "ERROR", "IN", "FLIGHT", "URLS/MIN",
        "STATE", "RETRY", "OF",
    ]  # fmt: skip
    names = ["run", "date", "time", "lines", "success", "duplicate", "error", "in_flight", "rate", "state"]
    table = []
    for row in rows:
        cells = row.split()
        table.append(dict(zip([*names, "retry_of"], cells, strict=False)))
        assert len(cells) in (len(names), len(names) + 1), row
    return table


def test_enqueue_records_the_run_and_its_length_once_it_has_read_the_file(db, no_workers, run_cli):
    run = _enqueue(run_cli, "# list", "http://example.com/a.png", "nope", "", "http://example.com/b.png")

    document = storage.runs(db).find_one({"_id": run})
    assert {key: document[key] for key in ("jobs", "enqueued", "rejected", "skipped", "retry_of")} == {
        "jobs": 3,
        "enqueued": 2,
        "rejected": 1,
        "skipped": 2,
        "retry_of": None,
    }
    assert abs(document["started_at"] - storage.utcnow()) < dt.timedelta(minutes=1)
    assert document["sent_at"] >= document["started_at"]


def test_runs_lists_every_run_newest_first_with_its_outcomes_and_what_is_in_flight(db, no_workers, run_cli):
    first = _enqueue(run_cli, "http://example.com/a.png", "http://example.com/b.png", "nope")
    _record(db, first, 1, "http://example.com/a.png", outcomes.SUCCESS)
    second = _enqueue(run_cli, "http://example.com/a.png", "http://example.com/c.png")
    _record(db, second, 1, "http://example.com/a.png", outcomes.DUPLICATE)
    _record(db, second, 2, "http://example.com/c.png", outcomes.ERROR, "http 404")

    stdout = _stdout(run_cli, "runs")

    rows = _table(stdout)
    assert [row["run"] for row in rows] == [second, first]
    picked = ["lines", "success", "duplicate", "error", "in_flight", "state"]
    assert [[row[key] for key in picked] for row in rows] == [
        ["2", "0", "1", "1", "0", "done"],
        ["3", "1", "0", "1", "1", "running"],
    ]
    assert rows[0]["rate"] == "-" and float(rows[1]["rate"]) > 0  # a done run has no pace any more
    started = dt.datetime.fromisoformat(f"{rows[0]['date']} {rows[0]['time']}").replace(tzinfo=dt.UTC)
    assert abs(started - storage.utcnow()) < dt.timedelta(minutes=1)
    assert run_cli("runs", "--limit", "1").stdout.splitlines()[1:] == stdout.splitlines()[1:2]


def test_runs_shows_how_many_urls_a_run_ends_per_minute_lately(db, no_workers, run_cli):
    run = _enqueue(run_cli, *(f"http://example.com/{n}.png" for n in range(20)))
    now = storage.utcnow()
    storage.runs(db).update_one({"_id": run}, {"$set": {"started_at": now - dt.timedelta(hours=1)}})
    for line in range(1, 16):  # ten in the last minutes, five long before
        ended = now - dt.timedelta(minutes=2 if line <= 10 else 20)
        _record(db, run, line, f"http://example.com/{line}.png", outcomes.SUCCESS, at=ended)

    row = _table(run_cli("runs").stdout)[0]

    assert (row["success"], row["in_flight"], row["state"]) == ("15", "5", "running")
    assert 2.0 <= float(row["rate"]) <= 2.5  # 10 urls over the last 4 to 5 minutes


def test_a_run_still_being_sent_shows_the_lines_sent_so_far(db, no_workers, run_cli):
    lines = "".join(f"http://example.com/{n}.png\n" for n in range(1500)).encode()
    sender = threading.Thread(
        target=lambda: enqueue_lines(
            io.BytesIO(lines), db, run="sending", max_in_flight=1000, poll_interval=0.02
        ),
        daemon=True,
    )
    sender.start()
    deadline = time.monotonic() + 20
    while _queued_urls(no_workers) < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)

    rows = {row["run"]: row for row in _table(run_cli("runs").stdout)}

    assert (rows["sending"]["lines"], rows["sending"]["in_flight"], rows["sending"]["state"]) == (
        "1000+",
        "1000",
        "sending",
    )
    ended = [Job.new("sending", line, "http://example.com/x.png") for line in range(1, 1001)]
    outcomes.record_outcomes(
        db, [outcomes.outcome_document(job, outcomes.ERROR, reason="x") for job in ended]
    )
    sender.join(timeout=20)
    rows = {row["run"]: row for row in _table(run_cli("runs").stdout)}
    assert (rows["sending"]["lines"], rows["sending"]["in_flight"], rows["sending"]["state"]) == (
        "1500",
        "500",
        "running",
    )


def test_runs_of_an_empty_database(db, run_cli):
    assert _stdout(run_cli, "runs") == "no runs yet\n"


def test_failed_lists_the_urls_of_a_runs_errors_in_line_order(db, no_workers, run_cli):
    urls = [f"http://example.com/{n}.png" for n in range(1, 6)]
    run = _enqueue(run_cli, *urls)
    _record(db, run, 4, urls[3], outcomes.ERROR, "http 503")
    _record(db, run, 1, urls[0], outcomes.ERROR, "timeout")
    _record(db, run, 2, urls[1], outcomes.SUCCESS)
    _record(db, run, 3, urls[2], outcomes.ERROR, "http 404")
    _record(db, run, 5, urls[4], outcomes.DUPLICATE)

    result = run_cli("failed", run)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [urls[0], urls[2], urls[3]]
    assert result.stderr == ""


def test_failed_with_a_reason_keeps_the_errors_whose_reason_contains_it_ignoring_case(
    db, no_workers, run_cli
):
    urls = [f"http://example.com/{n}.png" for n in range(1, 6)]
    run = _enqueue(run_cli, *urls)
    for line, reason in enumerate(["http 503", "http 404", "HTTP 500", "timeout", "http 502"], start=1):
        _record(db, run, line, urls[line - 1], outcomes.ERROR, reason)

    fives = run_cli("failed", run, "--reason", "http 5")
    either = run_cli("failed", run, "--reason", "timeout", "--reason", "404")
    none = run_cli("failed", run, "--reason", "not an image")

    assert fives.stdout.splitlines() == [urls[0], urls[2], urls[4]]
    assert either.stdout.splitlines() == [urls[1], urls[3]]
    assert (none.exit_code, none.stdout) == (0, "")


def test_failed_writes_what_cannot_be_retried_as_comments_and_says_why_on_stderr(db, no_workers, run_cli):
    secret = "http://bob:hunter2@example.com/private.png"
    long = "http://example.com/" + "a" * 3000
    plain = "http://example.com/plain.png"
    run = _enqueue(run_cli, secret, long, "nope", plain)
    _record(db, run, 1, secret, outcomes.ERROR, "http 401")
    _record(db, run, 2, long, outcomes.ERROR, "http 414")
    _record(db, run, 4, plain, outcomes.ERROR, "timeout")

    result = run_cli("failed", run)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[3] == plain
    assert (
        lines[0]
        == "# line 1, http 401: credentials redacted in the ledger: http://***@example.com/private.png"
    )
    assert lines[1].startswith("# line 2, http 414: url truncated in the ledger: http://example.com/aaa")
    assert lines[1].endswith(f"({len(long)} characters)")
    assert lines[2] == "# line 3, not an http(s) url: not a url enqueue takes: nope"
    assert "hunter2" not in result.output
    assert result.stderr == (
        "left out 3 of 4 failed lines, as # comments: 1 credentials redacted in the ledger,"
        " 1 url truncated in the ledger, 1 not a url enqueue takes\n"
    )


def test_what_failed_prints_is_a_url_list_enqueue_takes(db, no_workers, run_cli):
    secret = "http://bob:hunter2@example.com/private.png"
    run = _enqueue(run_cli, "http://example.com/a.png", secret, "nope", "http://example.com/b.png")
    _record(db, run, 1, "http://example.com/a.png", outcomes.ERROR, "http 500")
    _record(db, run, 2, secret, outcomes.ERROR, "http 500")
    _record(db, run, 4, "http://example.com/b.png", outcomes.ERROR, "timeout")
    listed = run_cli("failed", run).stdout.encode()

    again = run_cli("enqueue", "-", input=listed)

    assert _enqueued(again.stdout)[1:] == (2, 0, 2)  # 2 urls, 2 comment lines


def test_failed_of_a_run_still_running_says_more_may_come(db, no_workers, run_cli):
    run = _enqueue(run_cli, "http://example.com/a.png", "http://example.com/b.png")
    _record(db, run, 1, "http://example.com/a.png", outcomes.ERROR, "http 404")

    result = run_cli("failed", run)

    assert result.stdout == "http://example.com/a.png\n"
    assert result.stderr == f"run {run} is not finished: 1 lines in flight may still fail\n"


def test_failed_of_an_unknown_run_says_so(db, run_cli):
    result = run_cli("failed", "nope")

    assert result.exit_code == 1
    assert result.stderr == "Error: no run nope (image-crawler runs lists them)\n"


def test_retry_enqueues_the_failed_urls_as_a_new_run_that_names_the_one_it_retries(db, no_workers, run_cli):
    secret = "http://bob:hunter2@example.com/private.png"
    urls = ["http://example.com/a.png", "http://example.com/b.png", secret, "http://example.com/c.png"]
    run = _enqueue(run_cli, *urls, "nope")
    _record(db, run, 1, urls[0], outcomes.ERROR, "http 503")
    _record(db, run, 2, urls[1], outcomes.SUCCESS)
    _record(db, run, 3, urls[2], outcomes.ERROR, "http 503")
    _record(db, run, 4, urls[3], outcomes.ERROR, "timeout")
    actors.broker.flush_all()

    result = run_cli("retry", run)

    assert result.exit_code == 0, result.output
    retry, enqueued, rejected, skipped = _enqueued(result.stdout)
    assert retry != run and (enqueued, rejected, skipped) == (2, 0, 0)
    assert _queued_urls(no_workers) == 2
    assert result.stderr == (
        "left out 2 of 4 failed lines, not retried: 1 credentials redacted in the ledger,"
        " 1 not a url enqueue takes\n"
    )
    assert storage.runs(db).find_one({"_id": retry})["retry_of"] == run
    rows = {row["run"]: row for row in _table(run_cli("runs").stdout)}
    assert rows[retry]["retry_of"] == run and "retry_of" not in rows[run]
    assert _first(run_cli("status", retry)).endswith(", retry of " + run)


def test_retry_with_reason_and_wait_ends_what_failed_before(make_pipeline, db, server, run_cli):
    make_pipeline(threads=4)
    server.add("/a.png", png_bytes(30, 20, seed=11), content_type="image/png")
    urls = [server.url("/a.png"), server.url("/late.png"), server.url("/gone.png")]
    first = run_cli("enqueue", "-", "--wait", "--timeout", "60", input="\n".join(urls).encode())
    run = _enqueued(first.stdout)[0]
    assert _last_line(first.stdout) == "done: 3 urls — 1 success, 0 duplicate, 2 error"
    server.add("/late.png", png_bytes(30, 20, seed=12), content_type="image/png")

    result = run_cli("retry", run, "--reason", "404", "--wait", "--timeout", "60")

    assert result.exit_code == 0, result.output
    assert _enqueued(result.stdout)[1:] == (2, 0, 0)
    assert _last_line(result.stdout) == "done: 2 urls — 1 success, 0 duplicate, 1 error"


def test_retry_of_a_run_without_errors_enqueues_nothing(db, no_workers, run_cli):
    run = _enqueue(run_cli, "http://example.com/a.png", "http://bob:pw@example.com/b.png")
    _record(db, run, 1, "http://example.com/a.png", outcomes.SUCCESS)
    _record(db, run, 2, "http://bob:pw@example.com/b.png", outcomes.ERROR, "http 401")
    before, queued = storage.runs(db).count_documents({}), _queued_urls(no_workers)

    result = run_cli("retry", run)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"nothing to retry in run {run}\n"
    assert "1 credentials redacted in the ledger" in result.stderr
    assert storage.runs(db).count_documents({}) == before
    assert _queued_urls(no_workers) == queued


def test_a_line_enqueue_rejected_is_never_listed_as_a_url_even_if_its_text_now_looks_like_one(
    db, no_workers, run_cli
):
    result = run_cli("enqueue", "-", input=b"http://example.com/caf\xe9.png\n")  # not UTF-8
    run = _enqueued(result.stdout)[0]

    listed = run_cli("failed", run)

    assert (
        listed.stdout
        == "# line 1, invalid utf-8: not a url enqueue takes: http://example.com/caf\ufffd.png\n"
    )
    assert listed.stderr == "left out 1 of 1 failed lines, as # comments: 1 not a url enqueue takes\n"


def test_a_comment_line_cannot_be_broken_by_what_the_ledger_holds(db, no_workers, run_cli):
    run = _enqueue(run_cli, "http://example.com/a.png")
    outcomes.record_outcomes(
        db,
        [
            outcomes.outcome_document(
                Job.new(run, 1, "not\ra url\u2028http://example.com/b.png"), outcomes.ERROR, reason="x\ny"
            )
        ],
    )

    listed = run_cli("failed", run).stdout

    assert listed == "# line 1, x\\ny: not a url enqueue takes: not\\ra url\\u2028http://example.com/b.png\n"


def test_a_run_whose_enqueue_stopped_half_way_says_so(db, no_workers, run_cli):
    def broken_file():
        for n in range(2500):  # the third batch of lines cannot be read
            yield f"http://example.com/{n}.png\n".encode()
        raise OSError("input/output error")  # the disk, or the pipe, gave out

    with pytest.raises(OSError):
        enqueue_lines(broken_file(), db, run="halfway")

    row = {row["run"]: row for row in _table(run_cli("runs").stdout)}["halfway"]
    # It will send no more: its length is known (no "+"), its lines may still end.
    assert (row["lines"], row["in_flight"], row["state"]) == ("1000", "1000", "interrupted")
    assert _queued_urls(no_workers) == 1000  # what was sent gets its outcomes; the rest never comes


def test_a_crawled_run_is_listed_done_with_the_counts_of_its_ledger(make_pipeline, db, server, run_cli):
    make_pipeline(threads=4)
    server.add("/a.png", png_bytes(30, 20, seed=21), content_type="image/png")
    server.add("/b.png", png_bytes(30, 20, seed=21), content_type="image/png")
    urls = [server.url("/a.png"), server.url("/b.png"), server.url("/gone.png"), "nope"]
    crawl = run_cli("enqueue", "-", "--wait", "--timeout", "60", input="\n".join(urls).encode())
    run = _enqueued(crawl.stdout)[0]

    row = {row["run"]: row for row in _table(run_cli("runs").stdout)}[run]

    assert [row[key] for key in ("lines", "success", "duplicate", "error", "in_flight", "state")] == [
        "4", "1", "1", "2", "0", "done",
    ]  # fmt: skip
    assert outcomes.run_totals(db, [run])[run] == outcomes.count_outcomes(db, run)


def test_reconcile_counts_what_the_counters_missed(db, run_cli):
    old = storage.utcnow() - dt.timedelta(hours=3)
    missed = [outcomes.outcome_document(Job.new("r", n, "http://x.test/"), "success", at=old) for n in (1, 2)]
    storage.ledger(db).insert_many(missed)  # as a version without counters left them

    first = run_cli("reconcile")
    storage.minute_counts(db).delete_many({})
    again = run_cli("reconcile")
    everything = run_cli("reconcile", "--all")

    assert first.stdout == "recounted 1 minutes that had outcomes\n"
    assert again.stdout == "recounted 0 minutes that had outcomes\n"  # already recounted
    assert everything.stdout == "recounted 1 minutes that had outcomes\n"
    assert outcomes.run_totals(db, ["r"])["r"] == {"success": 2, "duplicate": 0, "error": 0}


def test_runs_failed_and_retry_through_a_mongodb_endpoint(crawl_env):
    env, database = crawl_env
    listed = subprocess.run(
        [sys.executable, "-m", "image_crawler", "enqueue", "-"],
        input="http://example.com/a.png\nnope\nhttp://bob:pw@example.com/b.png\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    run = _enqueued(listed.stdout)[0]
    _record(database, run, 1, "http://example.com/a.png", outcomes.ERROR, "http 503")
    _record(database, run, 3, "http://bob:pw@example.com/b.png", outcomes.SUCCESS)

    def command(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "image_crawler", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done

    rows = _table(command("runs").stdout)
    failed = command("failed", run)
    retried = command("retry", run)

    assert [rows[0][key] for key in ("run", "lines", "success", "error", "in_flight", "state")] == [
        run, "3", "1", "2", "0", "done",
    ]  # fmt: skip
    assert failed.stdout.splitlines() == [
        "http://example.com/a.png",
        "# line 2, not an http(s) url: not a url enqueue takes: nope",
    ]
    retry = _enqueued(retried.stdout)[0]
    assert database[storage.RUNS_COLLECTION].find_one({"_id": retry})["retry_of"] == run


# --- settings ---------------------------------------------------------------------------


@pytest.fixture
def bad_setting(monkeypatch):
    get_settings.cache_clear()
    monkeypatch.setenv("FETCH_RETRIES", "x")
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.parametrize("args", [("status",), ("enqueue", "-", "--wait")])
def test_a_bad_setting_is_a_clean_error_not_a_traceback(bad_setting, db, run_cli, args):
    result = run_cli(*args, input=b"http://example.com/a.png\n")

    assert result.exit_code in (1, 2)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == "Error: FETCH_RETRIES='x' is invalid: must be an integer in [0, 100]\n"
    assert result.stdout == ""


def test_a_bad_setting_stops_the_real_command_with_one_line(tmp_path):
    env = {**os.environ, "FETCH_RETRIES": "x"}

    finished = subprocess.run(
        [sys.executable, "-m", "image_crawler", "status"], env=env, capture_output=True, text=True, timeout=60
    )

    assert finished.returncode in (1, 2)
    assert finished.stderr == "Error: FETCH_RETRIES='x' is invalid: must be an integer in [0, 100]\n"
    assert finished.stdout == ""


def test_version(run_cli):
    result = run_cli("--version")

    assert result.exit_code == 0
    assert re.fullmatch(r".+, version \d+\.\d+\S*\n", result.stdout)


def test_progress_polls_leave_mongodb_idle_twenty_times_as_long_as_a_count_takes(db, monkeypatch, clock):
    class SlowLedger:
        def count_documents(self, query):
            clock.now += 0.05  # a run large enough that counting it takes 50 ms
            return 7

    assert cli._poll_done(db, "quick", poll_interval=0.5) == (0, 0.5)  # a count that takes no time
    monkeypatch.setattr(storage, "ledger", lambda database: SlowLedger())
    done, pause = cli._poll_done(db, "large", poll_interval=0.5)
    assert done == 7
    assert pause == pytest.approx(20 * 0.05)


# --- unreachable services -----------------------------------------------------------------

#: How long a test lets the real command run before it calls it hung (it used to wait minutes, or
#: hours): a guard, not a measurement. How long the command rides out an outage is tested in-process.
_BOUND_S = 30
_SECRET = "hunter2-secret"


@pytest.fixture
def url_file(tmp_path) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("http://example.com/a.png\n")
    return path


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run the real ``image-crawler ARGS``; what it did."""
    return run_bounded(image_crawler_command(*map(str, args)), env, _BOUND_S)


def _the_one_error_line(finished: subprocess.CompletedProcess) -> str:
    """The command's only line on stderr (no traceback), with the exit code of an unreachable service."""
    assert "Traceback" not in finished.stderr, finished.stderr
    assert len(finished.stderr.splitlines()) == 1, finished.stderr
    assert _SECRET not in finished.stderr
    assert finished.returncode == 2, finished.stderr
    return finished.stderr.rstrip("\n")


def test_enqueue_with_redis_down_says_so_in_one_line(dead_port, url_file):
    redis_url = f"redis://:{_SECRET}@127.0.0.1:{dead_port}/0"

    finished = _command({"REDIS_URL": redis_url}, "enqueue", url_file)

    line = _the_one_error_line(finished)
    where = rf"redis://\*\*\*@127\.0\.0\.1:{dead_port}/0"
    assert re.fullmatch(rf"Error: cannot reach Redis at {where}: .*Connection refused\.?", line), line
    assert finished.stdout == ""


def test_the_commands_redis_client_rides_out_a_blip_of_its_budget_and_no_more(
    db, dead_port, run_cli, monkeypatch
):
    budget_clock = FakeClock()  # the outage budget's, moved by redis-py's waits between tries
    monkeypatch.setattr(broker_module, "time", budget_clock)
    monkeypatch.setattr(redis.retry, "sleep", budget_clock.sleep)
    # The actors' broker was made at collection, outside any command: this client is made inside
    # the command, as the broker's is when the command is the first to import the actors.
    monkeypatch.setattr(cli, "_check_redis", lambda: connect_redis(f"redis://127.0.0.1:{dead_port}/0").ping())

    started = budget_clock.now

    result = run_cli("enqueue", "-", input=b"http://example.com/a.png\n")

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: cannot reach Redis at ")
    tried = budget_clock.now - started
    assert cli.OUTAGE_BUDGET_S <= tried < cli.OUTAGE_BUDGET_S + max(budget_clock.slept)


def test_enqueue_with_a_redis_that_never_answers_says_so_in_one_line(silent_port, url_file):
    redis_url = f"redis://:{_SECRET}@127.0.0.1:{silent_port}/0"

    finished = _command({"REDIS_URL": redis_url}, "enqueue", url_file, "--wait")

    line = _the_one_error_line(finished)
    assert re.fullmatch(
        rf"Error: cannot reach Redis at redis://\*\*\*@127\.0\.0\.1:{silent_port}/0: Timeout .+", line
    ), line
    assert finished.stdout == ""


@pytest.mark.parametrize("args", [("enqueue", "URLS"), ("enqueue", "URLS", "--wait"), ("status",)])
def test_mongodb_down_is_one_line_naming_it_without_its_password(
    redis_url, no_workers, dead_port, url_file, args
):
    mongo_uri = f"mongodb://crawler:{_SECRET}@127.0.0.1:{dead_port}/image_crawler"
    args = tuple(url_file if arg == "URLS" else arg for arg in args)

    finished = _command({"REDIS_URL": redis_url, "MONGO_URI": mongo_uri}, *args)

    assert _the_one_error_line(finished) == (
        f"Error: cannot reach MongoDB at mongodb://***@127.0.0.1:{dead_port}/image_crawler:"
        f" 127.0.0.1:{dead_port}: [Errno 111] Connection refused"
    )
    assert finished.stdout == ""
    assert _queued_urls(no_workers) == 0  # nothing was sent that could never be recorded


def test_status_with_a_mongodb_that_never_answers_says_so_in_one_line(silent_port):
    mongo_uri = f"mongodb://127.0.0.1:{silent_port}/image_crawler"

    finished = _command({"MONGO_URI": mongo_uri}, "status")

    line = _the_one_error_line(finished)
    assert line.startswith(f"Error: cannot reach MongoDB at {mongo_uri}: 127.0.0.1:{silent_port}: "), line
    assert "timed out" in line


def test_the_commands_mongodb_client_gives_up_within_its_budget(dead_port):
    settings = dataclasses.replace(get_settings(), mongo_uri=f"mongodb://127.0.0.1:{dead_port}/image_crawler")

    database = cli._connect_database(settings)
    try:
        assert database.client.options.server_selection_timeout == cli.OUTAGE_BUDGET_S
        assert database.client.options.pool_options.connect_timeout < cli.OUTAGE_BUDGET_S
        assert database.name == "image_crawler"
    finally:
        database.client.close()


def test_the_command_leaves_the_workers_redis_budget_to_the_rest_of_the_process(db, no_workers, run_cli):
    result = run_cli("enqueue", "-", input=b"http://example.com/a.png\n")

    assert result.exit_code == 0, result.output
    client = connect_redis(actors.settings.redis_url)
    assert client.get_retry().budget_s == REDIS_OUTAGE_BUDGET_S
    client.close()


class _Relay:
    """A TCP relay to ``upstream`` that can be cut, as a failing network or server would be."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            with self.lock:
                self.sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_wait_when_mongodb_goes_away_mid_run_is_one_line(mongo_uri, redis_url, no_workers, url_file):
    parts = urlsplit(mongo_uri)
    relay = _Relay((parts.hostname or "127.0.0.1", parts.port or 27017))
    database = f"cli_{uuid.uuid4().hex[:8]}"
    relayed_uri = f"mongodb://127.0.0.1:{relay.port}/{database}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": redis_url, "MONGO_URI": relayed_uri}
    command = subprocess.Popen(
        [sys.executable, "-m", "image_crawler", "enqueue", str(url_file), "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + _BOUND_S
        while _queued_urls(no_workers) < 1 and command.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _queued_urls(no_workers) == 1  # sent, and now waiting for outcomes in MongoDB
        relay.cut()
        stdout, stderr = command.communicate(timeout=_BOUND_S)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        pymongo.MongoClient(mongo_uri).drop_database(database)

    finished = subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr)
    assert _the_one_error_line(finished).startswith(f"Error: cannot reach MongoDB at {relayed_uri}: ")
    assert _enqueued(stdout)[1:] == (1, 0, 0)
