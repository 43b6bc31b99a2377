"""What the dashboard's totals and chart read as the ledger grows: counters against the ledger.

    python -m benchmarks.counter_reads [--sizes 10000,100000,1000000] [--minutes 30] [--runs 2]

For each size, a fresh database gets that many outcomes over the last ``--minutes`` minutes,
spread over ``--runs`` runs, written as the collectors write them (``record_outcomes``, 1,000
at a time, so the per-minute counters are kept). Then each read the web app and
``image-crawler runs`` make is timed (best of 3), next to the ledger reads they replaced
("before"). Every command a read sends is captured (pymongo command monitoring) and, on a real
MongoDB, explained (``executionStats``): the table shows the index keys and documents it
examined. The counters' rows stay flat while the ledger's grow with the size.

It needs a MongoDB: ``MONGO_URI`` when set (a database ``counter_reads_<random>`` is made and
dropped on that server), else the MongoDB stand-in ``$MONGO_SHIM`` (tests/support/services.py),
started for the run and stopped by its process group. The shim cannot ``explain`` (nor use
indexes: it scans), so with it the table shows times and the collections each read touched;
run it against a real MongoDB for the examined counts. The default sizes suit the shim; a real
server takes millions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
from pymongo import monitoring
from pymongo.database import Database
from pymongo.errors import OperationFailure
from tests.support.services import mongo_endpoint

from benchmarks import services
from image_crawler import outcomes, storage
from image_crawler.outcomes import Job

_READS = {"aggregate", "find", "count", "distinct"}
_SESSION_FIELDS = {"lsid", "$db", "$clusterTime", "$readPreference", "txnNumber", "apiVersion"}


class _Commands(monitoring.CommandListener):
    """Remembers the read commands sent while ``capturing``."""

    def __init__(self) -> None:
        self.capturing = False
        self.sent: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.capturing and event.command_name in _READS:
            self.sent.append({k: v for k, v in event.command.items() if k not in _SESSION_FIELDS})

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _examined(explained: Any) -> tuple[int, int]:
    """Index keys and documents examined, summed over every ``executionStats`` in an explain answer."""
    keys = docs = 0
    if isinstance(explained, dict):
        stats = explained.get("executionStats")
        if isinstance(stats, dict):
            keys += int(stats.get("totalKeysExamined", 0))
            docs += int(stats.get("totalDocsExamined", 0))
        for name, value in explained.items():
            if name != "executionStats":
                more = _examined(value)
                keys, docs = keys + more[0], docs + more[1]
    elif isinstance(explained, list):
        for value in explained:
            more = _examined(value)
            keys, docs = keys + more[0], docs + more[1]
    return keys, docs


def _fill(db: Database, size: int, minutes: int, runs: int) -> None:
    now = storage.utcnow().replace(second=0, microsecond=0)
    names = [f"run{n}" for n in range(runs)]
    batch: list[dict[str, Any]] = []
    for line in range(size):
        at = now - dt.timedelta(minutes=minutes - 1 - line * minutes // size, seconds=-30)
        outcome = outcomes.OUTCOMES[line % 7 % 3]
        job = Job.new(names[line % runs], line, f"http://images.example/{line}.jpg")
        reason = "http 404" if outcome == outcomes.ERROR else None
        batch.append(outcomes.outcome_document(job, outcome, reason=reason, at=at))
        if len(batch) == 1000:
            outcomes.record_outcomes(db, batch)
            batch = []
    outcomes.record_outcomes(db, batch)
    for name in names:
        outcomes.start_run(db, name)
        outcomes.run_progress(db, name, enqueued=size // runs, rejected=0, skipped=0, sent=True)


def _reads(now: dt.datetime) -> dict[str, Callable[[Database], Any]]:
    since = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=59)
    ledger_chart = [
        {"$match": {"minute": {"$gte": since}}},
        {"$group": {"_id": {"minute": "$minute", "outcome": "$outcome"}, "n": {"$sum": 1}}},
    ]
    return {
        "totals": outcomes.counted_totals,
        "chart, 60 minutes": lambda db: outcomes.counts_per_minute(db, since),
        "chart, all": outcomes.counts_per_minute,
        "runs (20 latest)": lambda db: outcomes.recent_runs(db, 20),
        "recount, nothing due": lambda db: outcomes.reconcile(db, max_minutes=outcomes.RECONCILE_MINUTES),
        "before: totals from the ledger": lambda db: [
            storage.ledger(db).count_documents({"outcome": name}) for name in outcomes.OUTCOMES
        ],
        "before: chart from the ledger": lambda db: list(storage.ledger(db).aggregate(ledger_chart)),
    }


def _measure(db: Database, commands: _Commands, read: Callable[[Database], Any]) -> dict[str, Any]:
    best = float("inf")
    for _ in range(3):
        commands.sent, commands.capturing = [], True
        started = time.perf_counter()
        read(db)
        best = min(best, time.perf_counter() - started)
        commands.capturing = False
    sent = list(commands.sent)
    keys = docs = 0
    explained = True
    for command in sent:
        try:
            answer = db.command({"explain": command, "verbosity": "executionStats"})
        except OperationFailure:
            explained = False
            break
        more = _examined(answer)
        keys, docs = keys + more[0], docs + more[1]
    collections = sorted({str(command.get(next(iter(command)))) for command in sent})
    return {
        "ms": best * 1000,
        "keys": keys if explained else None,
        "docs": docs if explained else None,
        "collections": collections,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000", help="ledger sizes, comma-separated")
    parser.add_argument("--minutes", type=int, default=30, help="minutes the outcomes are spread over")
    parser.add_argument("--runs", type=int, default=2, help="runs the outcomes belong to")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="counter-reads-")))
        shim, uri = mongo_endpoint(work)
        if shim is not None:
            stack.callback(services.stop_group, shim)
            print("MongoDB: the mongo shim (no explain, no indexes: times and collections only)")
        commands = _Commands()
        client: pymongo.MongoClient = pymongo.MongoClient(uri, tz_aware=True, event_listeners=[commands])
        stack.callback(client.close)
        print(f"{'outcomes':>10}  {'read':<32} {'ms':>9} {'keys':>9} {'docs':>9}  collections")
        for size in sizes:
            name = f"counter_reads_{uuid.uuid4().hex[:8]}"
            db = client[name]
            try:
                storage.ensure_indexes(db)
                _fill(db, size, args.minutes, args.runs)
                outcomes.reconcile(db)
                for label, read in _reads(storage.utcnow()).items():
                    row = _measure(db, commands, read)
                    keys = "n/a" if row["keys"] is None else f"{row['keys']:,}"
                    docs = "n/a" if row["docs"] is None else f"{row['docs']:,}"
                    print(
                        f"{size:>10,}  {label:<32} {row['ms']:>9.1f} {keys:>9} {docs:>9}  "
                        + ", ".join(row["collections"])
                    )
            finally:
                client.drop_database(name)


if __name__ == "__main__":
    main()
