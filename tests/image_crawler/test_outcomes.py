"""The job ledger: one terminal outcome per job, the first one recorded wins."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

import pytest

from image_crawler import outcomes, storage
from image_crawler.broker import PROCESS_QUEUE
from image_crawler.outcomes import Job
from support.images import png_bytes
from support.stores import get_outcome, record_outcome


@pytest.fixture
def db(mongo_db):
    storage.ensure_indexes(mongo_db)
    return mongo_db


@pytest.fixture(autouse=True)
def writers_pass_not_due(monkeypatch):
    """``record_outcomes`` runs a pass now and then, by the real clock, on a schedule the process
    shares: the first call in a process runs one. These tests date outcomes in the past and run
    the passes they mean themselves, so whether that one lands in a test must not depend on
    which test runs first (one run alone used to fail)."""
    schedule = outcomes.Schedule()
    schedule.due()  # the first call is due: spent, so the next is a minute away
    monkeypatch.setattr(outcomes, "_writers_schedule", schedule)


def _errors(run: str, lines: range, reason: str = "http 404") -> list[dict]:
    return [
        outcomes.outcome_document(Job.new(run, n, f"http://example.com/{n}"), outcomes.ERROR, reason=reason)
        for n in lines
    ]


def test_a_job_is_identified_by_run_and_line():
    job = Job.new("abc123", 7, "http://example.com/a.png")

    assert job.id == "abc123:7"
    assert (job.run, job.line, job.url) == ("abc123", 7, "http://example.com/a.png")


def test_the_first_outcome_wins_and_a_second_is_refused(db):
    job = Job.new("run", 1, "http://example.com/a.png")

    assert record_outcome(db, job, outcomes.SUCCESS, md5="d41d8cd98f00b204e9800998ecf8427e") is True
    assert record_outcome(db, job, outcomes.ERROR, reason="grayscale image expired") is False

    entry = get_outcome(db, job.id)
    assert entry["outcome"] == "success"
    assert entry["md5"] == "d41d8cd98f00b204e9800998ecf8427e"
    assert entry["reason"] is None
    assert storage.ledger(db).count_documents({}) == 1


def test_the_ledger_entry_describes_the_job(db):
    job = Job.new("run", 12, "http://example.com/missing")

    record_outcome(db, job, outcomes.ERROR, reason="http 404")

    entry = get_outcome(db, "run:12")
    assert {key: entry[key] for key in ("run", "line", "url", "outcome", "reason", "md5")} == {
        "run": "run",
        "line": 12,
        "url": "http://example.com/missing",
        "outcome": "error",
        "reason": "http 404",
        "md5": None,
    }
    assert abs(entry["ended_at"] - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)


def test_a_running_job_has_no_outcome(db):
    assert get_outcome(db, "run:1") is None


def test_the_minute_is_the_utc_minute_the_job_ended_in():
    job = Job.new("run", 1, "http://example.com/a.png")
    ended = dt.datetime(2024, 3, 9, 23, 59, 59, 999_000, tzinfo=dt.UTC)

    document = outcomes.outcome_document(job, outcomes.SUCCESS, at=ended)

    assert document["ended_at"] == ended
    assert document["minute"] == dt.datetime(2024, 3, 9, 23, 59, tzinfo=dt.UTC)


def test_a_recorded_outcome_carries_the_minute_of_its_end(db):
    record_outcome(db, Job.new("run", 1, "http://example.com/a.png"), outcomes.DUPLICATE)

    entry = get_outcome(db, "run:1")
    assert entry["minute"] == entry["ended_at"].replace(second=0, microsecond=0)
    assert entry["minute"].utcoffset() == dt.timedelta(0)


def test_a_long_url_is_kept_truncated_with_its_length():
    url = "http://example.com/" + "a" * 99_981  # 100,000 characters
    document = outcomes.outcome_document(Job.new("run", 1, url), outcomes.ERROR, reason="url too long")

    stored = document["url"]
    assert stored.startswith(url[: outcomes.MAX_STORED_URL])
    assert stored.endswith("(100000 characters)")
    assert len(stored) < outcomes.MAX_STORED_URL + 40


def test_a_url_at_the_limit_is_kept_as_is():
    url = "http://example.com/" + "a" * (outcomes.MAX_STORED_URL - 19)

    assert len(url) == outcomes.MAX_STORED_URL
    assert outcomes.outcome_document(Job.new("run", 1, url), outcomes.ERROR)["url"] == url


def test_an_unknown_outcome_name_is_rejected(db):
    job = Job.new("run", 1, "http://example.com/a.png")

    with pytest.raises(ValueError, match="unknown outcome 'failed'"):
        record_outcome(db, job, "failed")
    assert get_outcome(db, job.id) is None


def test_record_outcomes_counts_only_the_new_ones(db):
    assert outcomes.record_outcomes(db, _errors("run", range(1, 4))) == 3

    mixed = _errors("run", range(1, 7), reason="another reason")  # lines 1-3 already have an outcome
    assert outcomes.record_outcomes(db, mixed) == 3

    assert storage.ledger(db).count_documents({"run": "run"}) == 6
    assert get_outcome(db, "run:2")["reason"] == "http 404"
    assert get_outcome(db, "run:5")["reason"] == "another reason"


def test_record_outcomes_of_nothing_or_only_duplicates_is_zero(db):
    outcomes.record_outcomes(db, _errors("run", range(1, 3)))

    assert outcomes.record_outcomes(db, []) == 0
    assert outcomes.record_outcomes(db, _errors("run", range(1, 3))) == 0


def test_count_outcomes_per_run_and_overall(db):
    for line in range(1, 4):
        record_outcome(db, Job.new("first", line, "u"), outcomes.SUCCESS)
    record_outcome(db, Job.new("first", 4, "u"), outcomes.ERROR, reason="timeout")
    record_outcome(db, Job.new("second", 1, "u"), outcomes.DUPLICATE)
    record_outcome(db, Job.new("second", 2, "u"), outcomes.ERROR, reason="http 404")

    assert outcomes.count_outcomes(db, "first") == {"success": 3, "duplicate": 0, "error": 1}
    assert outcomes.count_outcomes(db, "second") == {"success": 0, "duplicate": 1, "error": 1}
    assert outcomes.count_outcomes(db) == {"success": 3, "duplicate": 1, "error": 2}
    assert outcomes.count_outcomes(db, "unknown") == {"success": 0, "duplicate": 0, "error": 0}


# --- the ledger when messages are redelivered (a real worker, the suite's Redis) --------


def _parcel(run: str, line: int, url: str, body: bytes) -> dict:
    """What fetch hands md5 and grayscale for one downloaded line, under a fresh claim."""
    from image_crawler import claims

    return {"run": run, "claim": claims.new_claim(), "lines": [[line, url]], "sizes": [len(body)]}


def _processed(pipeline, parcel: dict, body: bytes) -> tuple[dict, list, dict]:
    """Park the parcel's body and run its md5 and grayscale members as fetch would; returns
    the collector's arguments once both results are stored."""
    from dramatiq.results import Results

    from image_crawler import actors, claims

    pipeline.context.claims.put(parcel["claim"], claims.BODIES, {0: body})
    digest, gray = actors.md5.send(parcel), actors.grayscale.send(parcel)
    backend = next(m.backend for m in pipeline.broker.middleware if isinstance(m, Results))
    assert digest.get_result(backend=backend, block=True, timeout=20_000) == [hashlib.md5(body).hexdigest()]
    sizes = gray.get_result(backend=backend, block=True, timeout=20_000)
    assert [(size["width"], size["height"]) for size in sizes] == [(32, 24)]
    meta = [["image/png", len(body)]]
    return parcel, meta, {"md5": digest.message_id, "grayscale": gray.message_id}


def _snapshot(db, run: str) -> tuple[list, list, list]:
    return (
        list(storage.ledger(db).find({"run": run})),
        list(storage.images(db).find()),
        list(db["gray.files"].find()),
    )


def test_a_collect_redelivered_after_success_changes_nothing(make_pipeline):
    from image_crawler import actors, claims

    pipeline = make_pipeline(threads=2)
    body = png_bytes(32, 24, seed=5)
    args = _processed(pipeline, _parcel(uuid.uuid4().hex[:12], 1, "http://example.com/a.png", body), body)
    run, claim = args[0]["run"], args[0]["claim"]

    actors.collect.fn(*args)
    before = _snapshot(pipeline.db, run)
    assert [entry["outcome"] for entry in before[0]] == ["success"]
    client = pipeline.context.claims.client
    assert not client.exists(claims.claim_key(claim, claims.BODIES), claims.claim_key(claim, claims.PNGS))

    actors.collect.fn(*args)  # the parked PNG and the results are gone by now
    actors.collect.send(*args)  # and once more through the worker
    pipeline.broker.join(PROCESS_QUEUE, timeout=20_000)
    pipeline.worker.join()

    assert _snapshot(pipeline.db, run) == before


def test_a_failure_recorded_after_a_success_does_not_overwrite_it(make_pipeline):
    from image_crawler import actors

    pipeline = make_pipeline(threads=2)
    body = png_bytes(32, 24, seed=5)
    parcel = _parcel(uuid.uuid4().hex[:12], 1, "http://example.com/a.png", body)
    actors.collect.fn(*_processed(pipeline, parcel, body))

    actors.record_failure.fn(parcel, "time limit exceeded")
    actors.record_failure.send(parcel, "redis unavailable")
    pipeline.broker.join(PROCESS_QUEUE, timeout=20_000)
    pipeline.worker.join()

    entry = get_outcome(pipeline.db, f"{parcel['run']}:1")
    assert (entry["outcome"], entry["reason"]) == ("success", None)
    assert outcomes.count_outcomes(pipeline.db, parcel["run"]) == {"success": 1, "duplicate": 0, "error": 0}


def test_a_redelivered_collect_of_a_duplicate_stays_a_duplicate(make_pipeline):
    from image_crawler import actors

    pipeline = make_pipeline(threads=2)
    run = uuid.uuid4().hex[:12]
    body = png_bytes(32, 24, seed=5)
    first = _parcel(run, 1, "http://example.com/a.png", body)
    second = _parcel(run, 2, "http://mirror.example.com/a.png", body)
    actors.collect.fn(*_processed(pipeline, first, body))
    second_args = _processed(pipeline, second, body)

    actors.collect.fn(*second_args)
    actors.collect.fn(*second_args)

    assert get_outcome(pipeline.db, f"{run}:2")["outcome"] == "duplicate"
    assert outcomes.count_outcomes(pipeline.db, run) == {"success": 1, "duplicate": 1, "error": 0}
    assert storage.images(pipeline.db).find_one()["source_url"] == "http://example.com/a.png"


# --- per-minute counters: written with the outcomes, recounted from the ledger once settled --

MINUTE = dt.datetime(2026, 11, 27, 21, 5, tzinfo=dt.UTC)


def _at(run: str, lines: range, outcome: str, minute: dt.datetime, reason: str | None = None) -> list[dict]:
    """Outcome documents of ``lines`` of ``run`` that ended 30 s into ``minute``."""
    at = minute + dt.timedelta(seconds=30)
    return [
        outcomes.outcome_document(Job.new(run, n, f"http://example.com/{n}"), outcome, reason=reason, at=at)
        for n in lines
    ]


def _counted(db, run: str | None = None) -> dict:
    """The counters per minute (of one run, or of all), without the empty ones."""
    per_minute = outcomes.counts_per_minute(db) if run is None else outcomes.counts_per_minute(db, run=run)
    return {minute: counts for minute, counts in per_minute.items() if any(counts.values())}


def test_recorded_outcomes_are_counted_in_their_run_and_minute(db):
    later = MINUTE + dt.timedelta(minutes=1)
    outcomes.record_outcomes(db, _at("first", range(1, 4), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("first", range(4, 5), outcomes.ERROR, MINUTE, "http 404"))
    outcomes.record_outcomes(db, _at("first", range(5, 7), outcomes.DUPLICATE, later))
    outcomes.record_outcomes(db, _at("second", range(1, 3), outcomes.ERROR, MINUTE, "timeout"))

    assert _counted(db, "first") == {
        MINUTE: {"success": 3, "duplicate": 0, "error": 1},
        later: {"success": 0, "duplicate": 2, "error": 0},
    }
    assert _counted(db) == {
        MINUTE: {"success": 3, "duplicate": 0, "error": 3},
        later: {"success": 0, "duplicate": 2, "error": 0},
    }
    assert outcomes.run_totals(db, ["first", "second", "none"]) == {
        "first": {"success": 3, "duplicate": 2, "error": 1},
        "second": {"success": 0, "duplicate": 0, "error": 2},
        "none": {"success": 0, "duplicate": 0, "error": 0},
    }
    assert outcomes.counted_totals(db) == {"success": 3, "duplicate": 2, "error": 3}


def test_an_outcome_recorded_again_is_not_counted_again(db):
    assert outcomes.record_outcomes(db, _at("run", range(1, 4), outcomes.ERROR, MINUTE, "http 404")) == 3

    # A redelivered collector, a crash handler after a success: lines 1-3 already have theirs.
    assert outcomes.record_outcomes(db, _at("run", range(1, 4), outcomes.SUCCESS, MINUTE)) == 0
    assert outcomes.record_outcomes(db, _at("run", range(1, 6), outcomes.SUCCESS, MINUTE)) == 2
    assert record_outcome(db, Job.new("run", 5, "u"), outcomes.ERROR, reason="x") is False

    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 2, "duplicate": 0, "error": 3}
    assert outcomes.counted_totals(db) == outcomes.count_outcomes(db)


def test_record_outcome_counts_its_outcome_too(db):
    record_outcome(db, Job.new("run", 1, "http://example.com/a.png"), outcomes.DUPLICATE)

    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 0, "duplicate": 1, "error": 0}


def test_outcomes_a_crash_left_uncounted_are_counted_once_their_minute_has_settled(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    # A worker died after its outcomes were inserted and before it counted them: the ledger
    # holds them, the counters do not.
    storage.ledger(db).insert_many(_at("run", range(3, 6), outcomes.ERROR, MINUTE, "http 404"))
    storage.ledger(db).insert_many(_at("other", range(1, 2), outcomes.DUPLICATE, MINUTE))
    assert outcomes.counted_totals(db) == {"success": 2, "duplicate": 0, "error": 0}

    soon = MINUTE + outcomes.SETTLE_AFTER  # still open to late writers: not recounted yet
    assert outcomes.reconcile(db, now=soon) == 0
    assert outcomes.counted_totals(db) == {"success": 2, "duplicate": 0, "error": 0}

    settled = MINUTE + outcomes.SETTLE_AFTER + dt.timedelta(minutes=1)
    assert outcomes.reconcile(db, now=settled) == 1

    assert outcomes.run_totals(db, ["run", "other"]) == {
        "run": {"success": 2, "duplicate": 0, "error": 3},
        "other": {"success": 0, "duplicate": 1, "error": 0},
    }
    assert outcomes.counted_totals(db) == outcomes.count_outcomes(db)
    assert outcomes.reconcile(db, now=settled) == 0  # every settled minute is recounted once


def test_a_counter_that_says_more_than_the_ledger_is_set_right(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    storage.ledger(db).delete_one({"_id": "run:2"})  # the ledger is the truth

    outcomes.reconcile(db, now=MINUTE + dt.timedelta(hours=1))

    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 1, "duplicate": 0, "error": 0}


def test_reconciliation_walks_only_the_minutes_that_had_outcomes_a_few_at_a_time(db):
    busy = [MINUTE + dt.timedelta(days=n) for n in range(5)]  # years of minutes between them
    for n, minute in enumerate(busy):
        storage.ledger(db).insert_many(_at("run", range(10 * n + 1, 10 * n + 3), outcomes.SUCCESS, minute))
    now = busy[-1] + dt.timedelta(hours=1)

    assert outcomes.reconcile(db, now=now, max_minutes=2) == 2
    assert outcomes.run_totals(db, ["run"])["run"]["success"] == 4
    assert outcomes.reconcile(db, now=now, max_minutes=2) == 2
    assert outcomes.reconcile(db, now=now, max_minutes=2) == 1
    assert outcomes.reconcile(db, now=now, max_minutes=2) == 0
    assert outcomes.run_totals(db, ["run"])["run"]["success"] == 10


def test_an_outcome_recorded_late_into_a_settled_minute_is_recounted_even_after_a_crash(db, monkeypatch):
    import pymongo.errors

    now = storage.utcnow()
    old = now.replace(second=0, microsecond=0) - dt.timedelta(hours=2)
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, old))
    outcomes.reconcile(db, now=now)  # the minute is settled and recounted: 2

    class CounterGone:
        """The counters' collection when MongoDB went away right after the ledger insert."""

        def __getattr__(self, name):
            raise pymongo.errors.AutoReconnect("connection reset (injected)")

    # An outcome dated two hours ago (a fetch that waited that long to record its failures)
    # arrives, and its writer loses MongoDB before counting it.
    real = storage.minute_counts
    monkeypatch.setattr(storage, "minute_counts", lambda database: CounterGone())
    with pytest.raises(pymongo.errors.AutoReconnect):
        outcomes.record_outcomes(db, _at("run", range(3, 4), outcomes.ERROR, old, "timeout"))
    monkeypatch.setattr(storage, "minute_counts", real)
    assert get_outcome(db, "run:3") is not None
    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 2, "duplicate": 0, "error": 0}

    outcomes.reconcile(db, now=now)

    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 2, "duplicate": 0, "error": 1}


def test_reconciliation_runs_now_and_then_and_never_fails_the_caller(db, dead_mongodb):
    schedule = outcomes.Schedule(every_s=3600)
    storage.ledger(db).insert_many(_at("run", range(1, 3), outcomes.SUCCESS, MINUTE))

    assert outcomes.reconcile_if_due(db, schedule) is True
    assert outcomes.run_totals(db, ["run"])["run"]["success"] == 2
    assert outcomes.reconcile_if_due(db, schedule) is False  # not due for an hour

    # The outcomes were recorded; a pass that cannot reach MongoDB is tried again later.
    assert outcomes.reconcile_if_due(dead_mongodb, outcomes.Schedule(every_s=3600)) is False


@pytest.fixture
def dead_mongodb():
    """A database on a port where nothing listens, which gives up within a fraction of a second."""
    import pymongo

    from support.services import free_port

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{free_port()}/x", serverSelectionTimeoutMS=200)
    yield client["x"]
    client.close()


def test_failed_outcomes_come_in_line_order_a_page_at_a_time(db):
    outcomes.record_outcomes(db, _errors("run", range(7, 0, -1)))  # recorded in reverse
    outcomes.record_outcomes(db, _at("run", range(8, 9), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _errors("other", range(1, 3)))

    listed = list(outcomes.failed_outcomes(db, "run", page=3))

    assert [entry["line"] for entry in listed] == [1, 2, 3, 4, 5, 6, 7]
    assert listed[0] == {"line": 1, "url": "http://example.com/1", "reason": "http 404"}


# --- error reasons, counted -------------------------------------------------------------


def test_error_reasons_are_counted_per_run_and_window_most_frequent_first(db):
    earlier = MINUTE - dt.timedelta(minutes=90)
    outcomes.record_outcomes(db, _at("first", range(1, 4), outcomes.ERROR, MINUTE, "http 404"))
    outcomes.record_outcomes(db, _at("first", range(4, 6), outcomes.ERROR, earlier, "timeout"))
    outcomes.record_outcomes(db, _at("first", range(6, 9), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("second", range(1, 5), outcomes.ERROR, MINUTE, "not an image"))
    outcomes.record_outcomes(db, _at("second", range(5, 6), outcomes.ERROR, earlier, "http 404"))

    assert outcomes.top_error_reasons(db) == [("http 404", 4), ("not an image", 4), ("timeout", 2)]
    assert outcomes.top_error_reasons(db, run="first") == [("http 404", 3), ("timeout", 2)]
    assert outcomes.top_error_reasons(db, since=MINUTE) == [("not an image", 4), ("http 404", 3)]
    assert outcomes.top_error_reasons(db, since=MINUTE, run="second") == [("not an image", 4)]
    assert outcomes.top_error_reasons(db, limit=1) == [("http 404", 4)]
    assert outcomes.top_error_reasons(db, run="none") == []


def test_an_error_recorded_again_adds_nothing_to_its_reason(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.ERROR, MINUTE, "http 404"))
    outcomes.record_outcomes(db, _at("run", range(1, 4), outcomes.ERROR, MINUTE, "timeout"))  # 1-2 known

    assert outcomes.top_error_reasons(db) == [("http 404", 2), ("timeout", 1)]


def test_reasons_a_crash_left_uncounted_are_recounted_once_their_minute_has_settled(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.ERROR, MINUTE, "http 404"))
    storage.ledger(db).insert_many(_at("run", range(3, 6), outcomes.ERROR, MINUTE, "timeout"))
    storage.ledger(db).delete_one({"_id": "run:2"})  # and the ledger is the truth
    assert outcomes.top_error_reasons(db) == [("http 404", 2)]

    outcomes.reconcile(db, now=MINUTE + outcomes.SETTLE_AFTER + dt.timedelta(minutes=1))

    assert outcomes.top_error_reasons(db) == [("timeout", 3), ("http 404", 1)]


# --- runs --------------------------------------------------------------------------------


def _run(db, run: str, *, lines: int, sent: bool = True, started: dt.datetime | None = None, **kw) -> None:
    outcomes.start_run(db, run, retry_of=kw.pop("retry_of", None))
    outcomes.run_progress(db, run, enqueued=lines, rejected=0, skipped=0, sent=sent, **kw)
    if started is not None:  # as if enqueue ran then, whatever the clock says now
        storage.runs(db).update_one({"_id": run}, {"$set": {"started_at": started, "updated_at": started}})


def test_unfinished_runs_are_those_with_lines_to_go_and_a_finished_run_is_marked_once(db):
    now = MINUTE + dt.timedelta(minutes=2)
    _run(db, "going", lines=10, started=MINUTE)
    _run(db, "over", lines=3, started=MINUTE)
    _run(db, "sending", lines=5, sent=False, started=MINUTE)
    outcomes.record_outcomes(db, _at("going", range(1, 5), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("over", range(1, 4), outcomes.ERROR, MINUTE, "http 404"))

    going = {summary.run: summary for summary in outcomes.unfinished_runs(db, now=now)}

    assert sorted(going) == ["going", "sending"]
    assert (going["going"].state, going["going"].in_flight) == ("running", 6)
    assert going["sending"].state == "sending"
    assert storage.runs(db).find_one({"_id": "over"})["finished_at"] is not None
    assert storage.runs(db).count_documents({"finished_at": None}) == 2
    assert outcomes.get_run(db, "over", now=now).finished


def test_an_interrupted_run_whose_lines_all_ended_is_finished(db):
    _run(db, "cut", lines=2, sent=False, interrupted=True)
    outcomes.record_outcomes(db, _at("cut", range(1, 3), outcomes.SUCCESS, MINUTE))

    assert outcomes.unfinished_runs(db) == []


def test_the_time_left_follows_the_recent_pace_once_the_length_is_known(db):
    now = MINUTE + dt.timedelta(minutes=5)
    _run(db, "run", lines=100, started=MINUTE)
    for minute in range(5):  # 10 outcomes a minute, 30 s into each of five minutes
        at = MINUTE + dt.timedelta(minutes=minute)
        outcomes.record_outcomes(
            db, _at("run", range(1 + 10 * minute, 11 + 10 * minute), outcomes.SUCCESS, at)
        )

    summary = outcomes.get_run(db, "run", now=now)

    # The pace's window is this minute and the four before: 40 outcomes over 4 minutes.
    assert (summary.in_flight, summary.rate, summary.pace) == (50, 10.0, 10.0)
    assert summary.eta == dt.timedelta(minutes=5)
    storage.runs(db).update_one({"_id": "run"}, {"$set": {"sent_at": None}})
    assert outcomes.get_run(db, "run", now=now).eta is None  # its length is not known yet
    storage.runs(db).update_one({"_id": "run"}, {"$set": {"interrupted_at": now}})
    assert outcomes.get_run(db, "run", now=now).eta == dt.timedelta(minutes=5)  # stopped: known again


def test_a_done_run_has_no_pace(db):
    _run(db, "run", lines=2, started=MINUTE)
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))

    summary = outcomes.get_run(db, "run", now=MINUTE + dt.timedelta(minutes=1))

    assert (summary.state, summary.pace, summary.eta) == ("done", None, None)
    assert summary.rate > 0 and summary.not_finished_note() is None


def test_a_run_still_sending_with_nothing_happening_for_long_is_stalled(db):
    _run(db, "run", lines=5, sent=False, started=MINUTE)
    storage.runs(db).update_one({"_id": "run"}, {"$set": {"updated_at": MINUTE}})

    soon = MINUTE + outcomes.STALLED_AFTER - dt.timedelta(minutes=1)
    later = MINUTE + outcomes.STALLED_AFTER

    assert outcomes.get_run(db, "run", now=soon).state == "sending"
    assert outcomes.get_run(db, "run", now=later).state == "stalled"
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, later))  # something happens
    assert outcomes.get_run(db, "run", now=later).state == "sending"


def test_a_stalled_run_whose_lines_all_ended_is_finished_until_its_enqueue_sends_again(db):
    _run(db, "run", lines=2, sent=False, started=MINUTE)
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    much_later = MINUTE + outcomes.STALLED_AFTER + dt.timedelta(minutes=outcomes.RATE_MINUTES)

    assert outcomes.unfinished_runs(db, now=much_later) == []  # its enqueue is gone: it is over
    assert outcomes.get_run(db, "run", now=much_later).state == "stalled"  # and says how it ended

    outcomes.run_progress(db, "run", enqueued=4, rejected=0, skipped=0)  # it was only slow after all
    assert [summary.run for summary in outcomes.unfinished_runs(db)] == ["run"]


def test_the_runs_retrying_a_run_are_listed_oldest_first(db):
    _run(db, "base", lines=3, started=MINUTE)
    _run(db, "again", lines=1, started=MINUTE + dt.timedelta(minutes=5), retry_of="base")
    _run(db, "first", lines=2, started=MINUTE + dt.timedelta(minutes=1), retry_of="base")

    assert outcomes.retries_of(db, "base") == ["first", "again"]
    assert outcomes.retries_of(db, "first") == []


def test_failed_lines_list_retryable_urls_and_comment_the_rest(db):
    docs = _errors("run", range(1, 3))
    docs += [
        outcomes.outcome_document(Job.new("run", 3, "http://u:p@example.com/3"), outcomes.ERROR, reason="x"),
        outcomes.outcome_document(
            Job.new("run", 4, "ftp://example.com/4"), outcomes.ERROR, reason="bad", rejected=True
        ),
    ]
    outcomes.record_outcomes(db, docs)
    failures = outcomes.FailedLines(db, "run")

    lines = list(failures.lines())

    assert lines == [
        ("http://example.com/1", True),
        ("http://example.com/2", True),
        ("# line 3, x: credentials redacted in the ledger: http://***@example.com/3", False),
        ("# line 4, bad: not a url enqueue takes: ftp://example.com/4", False),
    ]
    assert failures.left_out_note() == (
        "left out 2 of 4 failed lines, as # comments:"
        " 1 credentials redacted in the ledger, 1 not a url enqueue takes"
    )


def test_a_run_is_not_marked_finished_while_the_ledger_says_lines_are_in_flight(db):
    now = MINUTE + dt.timedelta(minutes=2)
    _run(db, "run", lines=3, started=MINUTE)
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    # A late outcome counted twice (a recount between its insert and its count): the counters
    # say every line ended, the ledger knows better.
    storage.minute_counts(db).update_one({"run": "run"}, {"$inc": {"success": 1}})
    assert outcomes.get_run(db, "run", now=now).finished

    assert [summary.run for summary in outcomes.unfinished_runs(db, now=now)] == ["run"]
    assert storage.runs(db).find_one({"_id": "run"})["finished_at"] is None


def test_a_run_quiet_for_a_day_with_lines_in_flight_is_abandoned(db):
    _run(db, "lost", lines=5, started=MINUTE)
    outcomes.record_outcomes(db, _at("lost", range(1, 3), outcomes.SUCCESS, MINUTE))
    _run(db, "slow", lines=5, started=MINUTE)
    late = MINUTE + outcomes.ABANDONED_AFTER  # slow but alive: an outcome now and then
    outcomes.record_outcomes(db, _at("slow", range(1, 2), outcomes.SUCCESS, late))
    now = late + dt.timedelta(minutes=outcomes.RATE_MINUTES + 1)

    assert [summary.run for summary in outcomes.unfinished_runs(db, now=now)] == ["slow"]
    assert storage.runs(db).find_one({"_id": "lost"})["finished_at"] is not None
    assert outcomes.get_run(db, "lost", now=now).state == "running"  # still says where it stopped


def test_errors_whose_reasons_differ_only_in_numbers_a_server_picks_are_counted_together(db):
    outcomes.record_outcomes(
        db, _at("run", range(1, 3), outcomes.ERROR, MINUTE, "too many pixels: 3000x3000")
    )
    outcomes.record_outcomes(db, _at("run", range(3, 4), outcomes.ERROR, MINUTE, "too many pixels: 90x90000"))
    outcomes.record_outcomes(db, _at("run", range(4, 5), outcomes.ERROR, MINUTE, "http 404"))
    outcomes.record_outcomes(db, _at("run", range(5, 6), outcomes.ERROR, MINUTE, "http 500"))
    outcomes.record_outcomes(db, _at("run", range(6, 7), outcomes.ERROR, MINUTE, None))
    outcomes.record_outcomes(db, _at("run", range(7, 8), outcomes.ERROR, MINUTE, "None"))
    counted = outcomes.top_error_reasons(db, limit=0)

    outcomes.reconcile(db, now=MINUTE + dt.timedelta(hours=1))  # a recount gives the same

    assert sorted(counted, key=str) == sorted(
        [("too many pixels: NxN", 3), ("http 404", 1), ("http 500", 1), (None, 1), ("None", 1)], key=str
    )
    assert sorted(outcomes.top_error_reasons(db, limit=0), key=str) == sorted(counted, key=str)
    assert storage.reason_counts(db).count_documents({}) == 5


@pytest.mark.parametrize("run", ["", "a b", "a\nb", "x" * 65, "run/1", "ünï"])
def test_a_run_id_that_could_be_misread_is_refused(db, run):
    with pytest.raises(ValueError, match="run id"):
        outcomes.start_run(db, run)


# --- what make mutate found untested ------------------------------------------------------


def test_records_outcomes_runs_a_pass_when_one_is_due(db, monkeypatch):
    monkeypatch.setattr(outcomes, "_writers_schedule", outcomes.Schedule())  # due at once
    storage.ledger(db).insert_many(_at("run", range(1, 3), outcomes.SUCCESS, MINUTE))  # uncounted

    outcomes.record_outcomes(db, _at("run", range(3, 4), outcomes.SUCCESS, MINUTE))

    assert outcomes.run_totals(db, ["run"])["run"]["success"] == 3  # MINUTE settled long ago


def test_a_rejected_line_says_so_in_the_ledger_and_others_do_not():
    job = Job.new("run", 1, "ftp://example.com/a")
    assert outcomes.outcome_document(job, outcomes.ERROR, reason="x", rejected=True)["rejected"] is True
    assert "rejected" not in outcomes.outcome_document(job, outcomes.ERROR, reason="x")


def test_an_insert_refused_for_another_reason_than_a_duplicate_is_raised_once_the_rest_is_counted(
    db, monkeypatch
):
    from pymongo.errors import BulkWriteError

    documents = _at("run", range(1, 3), outcomes.SUCCESS, MINUTE)
    real = storage.ledger

    class RefusingSecond:
        """The ledger, inserting the first document and refusing the second (not as a duplicate)."""

        def __init__(self, collection):
            self._collection = collection

        def insert_many(self, batch, **options):
            self._collection.insert_one(batch[0])
            raise BulkWriteError({"writeErrors": [{"index": 1, "code": 121, "errmsg": "validation failed"}]})

        def __getattr__(self, name):
            return getattr(self._collection, name)

    monkeypatch.setattr(storage, "ledger", lambda database: RefusingSecond(real(database)))
    with pytest.raises(BulkWriteError):
        outcomes.record_outcomes(db, documents)
    monkeypatch.setattr(storage, "ledger", real)

    assert outcomes.run_totals(db, ["run"])["run"]["success"] == 1


def test_an_outcome_stored_without_its_minute_is_counted_in_the_minute_it_ended(db):
    # An earlier version stored no "minute": the end says which minute it belongs to.
    document = _at("run", range(1, 2), outcomes.SUCCESS, MINUTE)[0]
    del document["minute"]
    naive = _at("run", range(2, 3), outcomes.SUCCESS, MINUTE)[0]
    naive["minute"] = MINUTE.replace(tzinfo=None)  # a client without tz_aware

    outcomes.record_outcomes(db, [document, naive])

    assert outcomes.counts_per_minute(db) == {MINUTE: {"success": 2, "duplicate": 0, "error": 0}}


def test_a_reason_counter_is_keyed_by_its_minute_run_and_reason(db):
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.ERROR, MINUTE, "http 404"))

    counter = storage.reason_counts(db).find_one()

    assert counter["_id"] == {"minute": MINUTE, "run": "run", "reason": "http 404"}
    assert (counter["run"], counter["reason"], counter["n"]) == ("run", "http 404", 1)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("http 404", "http 404"),
        ("too many pixels: 3000x3000", "too many pixels"),
        ("http 429: retry-after 900 s: over 600", "http 429"),
        ("  timeout  ", "timeout"),
        (": nothing before", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
        (404, "unknown"),
    ],
)
def test_the_kind_of_a_reason_is_its_text_before_any_colon(reason, kind):
    assert outcomes.reason_kind(reason) == kind


@pytest.mark.parametrize(
    ("reason", "counted"),
    [
        ("http 429: retry-after 900 s: over 600", "http 429: retry-after N s: over N"),
        ("unsupported format: JPEG2000", "unsupported format: JPEGN"),
        ("http 404", "http 404"),
        (None, None),
    ],
)
def test_numbers_after_the_first_colon_are_counted_as_n(reason, counted):
    assert outcomes.counted_reason(reason) == counted


def test_only_an_outcome_dated_more_than_late_after_before_now_moves_the_mark_back(db, monkeypatch):
    now = MINUTE + dt.timedelta(hours=1)
    monkeypatch.setattr(storage, "this_minute", lambda: now)
    mark = now - dt.timedelta(minutes=1)
    storage.reconciled(db).insert_one({"_id": "minute_counts", "through": mark})

    def through():
        return storage.as_utc(storage.reconciled(db).find_one()["through"])

    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, now))
    outcomes.record_outcomes(db, _at("run", range(2, 3), outcomes.SUCCESS, now - outcomes.LATE_AFTER))
    assert through() == mark

    late = now - outcomes.LATE_AFTER - dt.timedelta(minutes=1)
    outcomes.record_outcomes(db, _at("run", range(3, 4), outcomes.SUCCESS, late))
    assert through() == late


def test_forgetting_the_reconciliation_recounts_every_minute_again(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    now = MINUTE + dt.timedelta(hours=1)
    assert outcomes.reconcile(db, now=now) == 1
    assert outcomes.reconcile(db, now=now) == 0

    outcomes.forget_reconciliation(db)

    assert outcomes.reconcile(db, now=now) == 1


def test_the_counts_per_minute_start_at_since(db):
    outcomes.record_outcomes(db, _at("run", range(1, 3), outcomes.SUCCESS, MINUTE))
    later = MINUTE + dt.timedelta(minutes=3)
    outcomes.record_outcomes(db, _at("run", range(3, 4), outcomes.ERROR, later, "timeout"))

    assert outcomes.counts_per_minute(db, since=later) == {later: {"success": 0, "duplicate": 0, "error": 1}}
    assert set(outcomes.counts_per_minute(db)) == {MINUTE, later}


def test_the_latest_minute_is_that_of_the_newest_outcome_at_or_before_until(db):
    assert outcomes.latest_minute(db) is None
    later = MINUTE + dt.timedelta(minutes=3)
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("run", range(2, 3), outcomes.SUCCESS, later))

    assert outcomes.latest_minute(db) == later
    assert outcomes.latest_minute(db, until=later - dt.timedelta(minutes=1)) == MINUTE
    assert outcomes.latest_minute(db, until=later) == later
    assert outcomes.latest_minute(db, until=MINUTE - dt.timedelta(minutes=1)) is None


def test_the_latest_errors_are_the_newest_errors_without_credentials(db):
    for n in range(1, 5):
        at = MINUTE + dt.timedelta(minutes=n)
        job = Job.new("run", n, f"http://user:pw@example.com/{n}")
        outcomes.record_outcomes(db, [outcomes.outcome_document(job, outcomes.ERROR, reason=f"r{n}", at=at)])
    outcomes.record_outcomes(db, _at("run", range(9, 10), outcomes.SUCCESS, MINUTE + dt.timedelta(hours=1)))
    storage.ledger(db).update_one({"_id": "run:4"}, {"$set": {"url": "http://user:pw@example.com/4"}})

    latest = outcomes.latest_errors(db, 2)

    assert latest == [
        {
            "url": "http://***@example.com/4",
            "reason": "r4",
            "ended_at": MINUTE + dt.timedelta(minutes=4, seconds=0),
        },
        {
            "url": "http://***@example.com/3",
            "reason": "r3",
            "ended_at": MINUTE + dt.timedelta(minutes=3, seconds=0),
        },
    ]


def test_ended_jobs_are_those_of_the_ids_asked_that_have_an_outcome(db):
    outcomes.record_outcomes(db, _errors("run", range(1, 4)))

    assert outcomes.ended_jobs(db, ["run:2", "run:3", "run:7", "other:1"]) == {"run:2", "run:3"}
    assert outcomes.ended_jobs(db, []) == set()
    assert outcomes.has_outcomes(db, "run") and not outcomes.has_outcomes(db, "other")


def test_a_new_run_starts_with_nothing_sent_and_is_read_back_as_started(db):
    outcomes.start_run(db, "new", retry_of="old")

    document = storage.runs(db).find_one({"_id": "new"})
    assert {
        key: document[key] for key in ("jobs", "enqueued", "rejected", "skipped", "sent_at", "finished_at")
    } == {
        "jobs": 0,
        "enqueued": 0,
        "rejected": 0,
        "skipped": 0,
        "sent_at": None,
        "finished_at": None,
    }
    summary = outcomes.get_run(db, "new")
    assert (summary.retry_of, summary.jobs, summary.state, summary.updated_at) == ("old", 0, "sending", None)
    assert summary.started_at == storage.as_utc(document["started_at"])
    assert outcomes.get_run(db, "never") is None
    assert outcomes.count_runs(db) == 1


def test_progress_counts_the_lines_sent_and_says_when_sending_ended(db):
    outcomes.start_run(db, "run")
    outcomes.run_progress(db, "run", enqueued=7, rejected=2, skipped=3)

    document = storage.runs(db).find_one({"_id": "run"})
    assert (document["jobs"], document["enqueued"], document["rejected"], document["skipped"]) == (9, 7, 2, 3)
    assert document["sent_at"] is None and "interrupted_at" not in document
    assert isinstance(document["updated_at"], dt.datetime)

    outcomes.run_progress(db, "run", enqueued=8, rejected=2, skipped=3, sent=True)
    assert storage.runs(db).find_one({"_id": "run"})["sent_at"] is not None
    outcomes.run_progress(db, "run", enqueued=8, rejected=2, skipped=3, interrupted=True)
    assert outcomes.get_run(db, "run").state == "interrupted"


def test_recent_runs_are_the_latest_started_first_a_page_at_a_time(db):
    for n in range(4):
        _run(db, f"r{n}", lines=1, started=MINUTE + dt.timedelta(minutes=n))

    assert [summary.run for summary in outcomes.recent_runs(db)] == ["r3", "r2", "r1", "r0"]
    assert [summary.run for summary in outcomes.recent_runs(db, 2, skip=1)] == ["r2", "r1"]
    now = MINUTE + dt.timedelta(hours=1)
    assert {summary.now for summary in outcomes.recent_runs(db, now=now)} == {now}


def test_unfinished_runs_lists_the_runs_going_newest_first_and_not_those_seen_finished(db):
    now = MINUTE + dt.timedelta(minutes=10)
    _run(db, "older", lines=3, started=MINUTE)
    _run(db, "newer", lines=3, started=MINUTE + dt.timedelta(minutes=1))
    _run(db, "done", lines=1, started=MINUTE + dt.timedelta(minutes=2))
    outcomes.record_outcomes(db, _at("done", range(1, 2), outcomes.SUCCESS, MINUTE))

    assert [summary.run for summary in outcomes.unfinished_runs(db, now=now)] == ["newer", "older"]
    # "done" is marked finished: counting it again would show it going, a day on.
    storage.minute_counts(db).delete_many({"run": "done"})
    assert [summary.run for summary in outcomes.unfinished_runs(db, now=now)] == ["newer", "older"]


def test_a_runs_counts_come_from_its_summary_or_else_its_counters(db):
    _run(db, "run", lines=3, started=MINUTE)
    outcomes.record_outcomes(db, _at("old", range(1, 3), outcomes.DUPLICATE, MINUTE))
    summary = outcomes.get_run(db, "run")

    assert outcomes.run_counts(db, "run", summary) is summary.counts
    assert outcomes.run_counts(db, "old", None) == {"success": 0, "duplicate": 2, "error": 0}


def test_the_pace_counts_the_current_minute_and_the_four_before(db):
    now = MINUTE + dt.timedelta(minutes=10, seconds=30)
    _run(db, "run", lines=100, started=MINUTE)
    window = storage.minute_of(now) - dt.timedelta(minutes=outcomes.RATE_MINUTES - 1)
    outcomes.record_outcomes(db, _at("run", range(1, 9), outcomes.SUCCESS, window))  # counted
    outcomes.record_outcomes(db, _at("run", range(9, 30), outcomes.SUCCESS, window - dt.timedelta(minutes=1)))

    assert outcomes.get_run(db, "run", now=now).rate == 8 / 4.5


def test_a_run_started_less_than_a_minute_ago_has_the_pace_of_a_whole_minute(db):
    now = MINUTE + dt.timedelta(seconds=50)
    _run(db, "run", lines=10, started=MINUTE + dt.timedelta(seconds=20))
    outcomes.record_outcomes(db, _at("run", range(1, 4), outcomes.SUCCESS, MINUTE))

    assert outcomes.get_run(db, "run", now=now).rate == 3.0


def test_a_run_is_quiet_only_unfinished_without_pace_for_the_whole_span(db):
    _run(db, "run", lines=5, started=MINUTE)
    span = dt.timedelta(hours=1)

    assert outcomes.get_run(db, "run", now=MINUTE + span).quiet_for(span)
    assert not outcomes.get_run(db, "run", now=MINUTE + span - dt.timedelta(seconds=1)).quiet_for(span)
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, MINUTE + span))
    assert not outcomes.get_run(db, "run", now=MINUTE + span).quiet_for(span)  # it has a pace
    outcomes.record_outcomes(db, _at("run", range(2, 6), outcomes.SUCCESS, MINUTE))
    much_later = MINUTE + 3 * span
    assert outcomes.get_run(db, "run", now=much_later).finished
    assert not outcomes.get_run(db, "run", now=much_later).quiet_for(span)  # it is over


def test_failed_outcomes_filter_by_reason_ignoring_case_and_reading_text_as_text(db):
    outcomes.record_outcomes(db, _errors("run", range(1, 3), reason="http 404"))
    outcomes.record_outcomes(db, _errors("run", range(3, 5), reason="too many pixels: 9x9"))
    outcomes.record_outcomes(db, _errors("run", range(5, 6), reason="http 4.4"))

    def lines(*reasons):
        return [entry["line"] for entry in outcomes.failed_outcomes(db, "run", reasons)]

    assert lines("HTTP 404") == [1, 2]
    assert lines("http 4.4") == [5]  # a dot is a dot, not any character
    assert lines("pixels", "404") == [1, 2, 3, 4]
    assert lines() == [1, 2, 3, 4, 5]
    assert next(iter(outcomes.failed_outcomes(db, "run", ("pixels",)))) == {
        "line": 3,
        "url": "http://example.com/3",
        "reason": "too many pixels: 9x9",
    }


def test_a_failed_line_the_ledger_cannot_give_back_is_tallied_by_why(db):
    docs = [
        outcomes.outcome_document(
            Job.new("run", n, f"http://u:p@example.com/{n}"), outcomes.ERROR, reason="x"
        )
        for n in (1, 2)
    ]
    docs.append(
        outcomes.outcome_document(Job.new("run", 3, "http://example.com/ok"), outcomes.ERROR, reason="x")
    )
    docs.append(
        outcomes.outcome_document(
            Job.new("run", 4, "http://example.com/4"), outcomes.ERROR, reason="a\nb", rejected=True
        )
    )
    outcomes.record_outcomes(db, docs)
    storage.ledger(db).update_one({"_id": "run:4"}, {"$set": {"reason": "two\nlines"}})
    storage.ledger(db).insert_one(
        {"_id": "run:5", "run": "run", "line": 5, "outcome": "error", "reason": "y"}
    )
    failures = outcomes.FailedLines(db, "run")

    lines = list(failures.lines())

    assert lines[3] == ("# line 4, two\\nlines: not a url enqueue takes: http://example.com/4", False)
    assert lines[4] == ("# line 5, y: not a url enqueue takes: ", False)
    assert failures.left_out == {"credentials redacted in the ledger": 2, "not a url enqueue takes": 2}
    assert failures.left_out_note(retrying=True) == (
        "left out 4 of 5 failed lines, not retried:"
        " 2 credentials redacted in the ledger, 2 not a url enqueue takes"
    )


def test_a_url_at_the_ledgers_limit_is_retried_and_a_longer_one_is_not():
    at_limit = "http://example.com/" + "a" * (outcomes.MAX_STORED_URL - len("http://example.com/"))
    assert outcomes.left_out_because({"url": at_limit}) is None
    assert outcomes.left_out_because({"url": at_limit + "a"}) == outcomes.TRUNCATED
    assert outcomes.left_out_because({"url": "http://example.com/", "rejected": True}) == outcomes.NOT_A_URL


def test_the_top_error_reasons_are_ten_by_default_ties_in_reason_order(db):
    for n in reversed(range(12)):
        outcomes.record_outcomes(
            db, _at("run", range(10 * n, 10 * n + 1), outcomes.ERROR, MINUTE, f"r{n:02}")
        )

    top = outcomes.top_error_reasons(db)

    assert top == [(f"r{n:02}", 1) for n in range(10)]


# --- recounting a settled minute: what it sets, and what it leaves alone --------------------


def test_a_recount_zeroes_what_was_counted_but_is_not_in_the_ledger_and_only_in_its_minute(db):
    later = MINUTE + dt.timedelta(minutes=30)  # not settled when MINUTE is recounted
    outcomes.record_outcomes(db, _at("real", range(1, 3), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("ghost", range(1, 4), outcomes.ERROR, MINUTE, "timeout"))
    outcomes.record_outcomes(db, _at("elsewhere", range(1, 2), outcomes.ERROR, later, "http 404"))
    storage.ledger(db).delete_many({"run": "ghost"})  # counted, then lost from the ledger

    assert outcomes.reconcile(db, now=MINUTE + outcomes.SETTLE_AFTER + dt.timedelta(minutes=1)) == 1

    assert outcomes.run_totals(db, ["real", "ghost", "elsewhere"]) == {
        "real": {"success": 2, "duplicate": 0, "error": 0},
        "ghost": {"success": 0, "duplicate": 0, "error": 0},
        "elsewhere": {"success": 0, "duplicate": 0, "error": 1},
    }
    assert outcomes.top_error_reasons(db) == [("http 404", 1)]
    # Nothing of the runs counted in other minutes is written into the minute recounted.
    assert sorted(storage.minute_counts(db).distinct("run", {"minute": MINUTE})) == ["ghost", "real"]
    assert storage.reason_counts(db).count_documents({"minute": MINUTE}) == 1
    ghost = storage.reason_counts(db).find_one({"minute": MINUTE})
    assert (ghost["run"], ghost["reason"], ghost["n"]) == ("ghost", "timeout", 0)


def test_a_recount_writes_the_runs_only_the_ledger_knew_as_counters_of_their_minute(db):
    storage.ledger(db).insert_many(_at("unseen", range(1, 3), outcomes.ERROR, MINUTE, "http 500: x 12"))

    outcomes.reconcile(db, now=MINUTE + dt.timedelta(hours=1))

    assert outcomes.counts_per_minute(db, run="unseen") == {
        MINUTE: {"success": 0, "duplicate": 0, "error": 2}
    }
    assert outcomes.top_error_reasons(db, run="unseen", since=MINUTE) == [("http 500: x N", 2)]


def test_a_ledger_entry_with_an_outcome_of_no_known_kind_is_not_counted(db):
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, MINUTE))
    storage.ledger(db).insert_one(
        {"_id": "run:2", "run": "run", "line": 2, "outcome": "odd", "minute": MINUTE}
    )

    outcomes.reconcile(db, now=MINUTE + dt.timedelta(hours=1))

    assert outcomes.run_totals(db, ["run"])["run"] == {"success": 1, "duplicate": 0, "error": 0}


def test_a_pass_recounts_the_earliest_busy_minutes_first(db):
    later = MINUTE + dt.timedelta(hours=2)
    storage.ledger(db).insert_many(_at("run", range(1, 2), outcomes.SUCCESS, later))  # written first
    storage.ledger(db).insert_many(_at("run", range(2, 3), outcomes.SUCCESS, MINUTE))

    assert outcomes.reconcile(db, now=later + dt.timedelta(hours=1), max_minutes=1) == 1

    assert outcomes.counts_per_minute(db) == {MINUTE: {"success": 1, "duplicate": 0, "error": 0}}


def test_a_pass_that_finds_the_first_mark_made_by_another_keeps_the_others(db, monkeypatch):
    storage.ledger(db).insert_many(_at("run", range(1, 2), outcomes.SUCCESS, MINUTE))
    theirs = MINUTE + dt.timedelta(minutes=1)
    storage.reconciled(db).insert_one({"_id": "minute_counts", "through": theirs})
    real = storage.reconciled

    class NotYetThere:
        """The marks as they were when this pass read them: none yet."""

        def __init__(self, collection):
            self._collection = collection

        def find_one(self, *args, **kwargs):
            return None

        def __getattr__(self, name):
            return getattr(self._collection, name)

    monkeypatch.setattr(storage, "reconciled", lambda database: NotYetThere(real(database)))
    assert outcomes.reconcile(db, now=MINUTE + dt.timedelta(hours=1)) == 1
    monkeypatch.setattr(storage, "reconciled", real)

    assert storage.as_utc(storage.reconciled(db).find_one()["through"]) == theirs


def test_the_first_and_last_counted_minutes_of_a_run(db):
    later = MINUTE + dt.timedelta(minutes=7)
    outcomes.record_outcomes(db, _at("run", range(1, 2), outcomes.SUCCESS, later))
    outcomes.record_outcomes(db, _at("run", range(2, 3), outcomes.SUCCESS, MINUTE))
    outcomes.record_outcomes(db, _at("other", range(1, 2), outcomes.SUCCESS, later + dt.timedelta(hours=1)))

    assert outcomes.last_counted_minute(db, "run") == later
    assert outcomes.last_counted_minute(db, "run", first=True) == MINUTE
    assert outcomes.last_counted_minute(db, "none") is None


def test_a_printable_reason_in_any_script_is_listed_as_written(db):
    outcomes.record_outcomes(db, _errors("run", range(1, 2), reason="café: zu groß"))
    storage.ledger(db).update_one({"_id": "run:1"}, {"$set": {"rejected": True}})

    (line,) = outcomes.FailedLines(db, "run").lines()

    assert line == ("# line 1, café: zu groß: not a url enqueue takes: http://example.com/1", False)


def test_a_known_run_is_one_enqueue_recorded_or_one_with_outcomes_and_any_other_is_unknown(db):
    _run(db, "recorded", lines=2)
    record_outcome(db, Job.new("legacy", 1, "http://example.com/a.png"), outcomes.SUCCESS)

    assert outcomes.known_run(db, "recorded").jobs == 2
    assert outcomes.known_run(db, "legacy") is None  # enqueued before runs were recorded
    with pytest.raises(outcomes.UnknownRun):
        outcomes.known_run(db, "nope")


# --- what collect and the benchmarks read and write --------------------------------------


def test_an_image_outcome_is_a_success_for_the_job_that_stored_it_and_a_duplicate_for_others():
    first, second = Job.new("run", 1, "http://a.example/x.png"), Job.new("run", 2, "http://b.example/x.png")
    stored_by = {"d41d8cd98f00b204e9800998ecf8427e": first.id}

    won = outcomes.image_outcome(first, "d41d8cd98f00b204e9800998ecf8427e", stored_by)
    lost = outcomes.image_outcome(second, "d41d8cd98f00b204e9800998ecf8427e", stored_by)

    assert (won["_id"], won["outcome"], won["md5"]) == (
        first.id,
        "success",
        "d41d8cd98f00b204e9800998ecf8427e",
    )
    assert (lost["_id"], lost["outcome"], lost["md5"]) == (
        second.id,
        "duplicate",
        "d41d8cd98f00b204e9800998ecf8427e",
    )


def test_the_last_outcome_of_a_run_says_when_it_ended(db):
    ended = dt.datetime(2026, 3, 1, 12, 0, 30, 250_000, tzinfo=dt.UTC)
    documents = [
        outcomes.outcome_document(
            Job.new("run", n, "u"), outcomes.SUCCESS, at=ended - dt.timedelta(seconds=n)
        )
        for n in range(1, 4)
    ]
    outcomes.record_outcomes(db, documents)

    assert outcomes.last_ended_at(db, "run") == ended - dt.timedelta(seconds=1)
    assert outcomes.last_ended_at(db, "other") is None
