"""What a dashboard or chart request costs does not grow with the ledger.

mongomock has no ``explain`` (and scans whole collections whatever the indexes), so the
database here notes, for every read a request makes, how many documents it selects: what
MongoDB examines through the index that serves it (a range scan reads the keys in the range;
``limit`` stops it early; ``estimated_document_count`` reads only metadata). On a real MongoDB,
``benchmarks/counter_reads.py --explain`` reports ``totalDocsExamined`` and
``totalKeysExamined`` for the same requests.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from image_crawler import outcomes, storage
from web import create_app
from web.monitoring import minute_buckets


class _CountingCollection:
    """A collection that adds up the documents its reads select into ``examined``."""

    def __init__(self, collection: Any, examined: Counter[str]) -> None:
        self._collection = collection
        self._examined = examined

    def _note(self, query: dict[str, Any] | None, limit: int = 0) -> None:
        selected = self._collection.count_documents(query or {})
        self._examined[self._collection.name] += min(selected, limit) if limit else selected

    def find(self, filter: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        self._note(filter, kwargs.get("limit", 0))
        return self._collection.find(filter, *args, **kwargs)

    def find_one(self, filter: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        self._note(filter, 1)
        return self._collection.find_one(filter, *args, **kwargs)

    def count_documents(self, filter: dict[str, Any], **kwargs: Any) -> int:
        self._note(filter, kwargs.get("limit", 0))
        return self._collection.count_documents(filter, **kwargs)

    def aggregate(self, pipeline: list[dict[str, Any]], **kwargs: Any) -> Any:
        first = pipeline[0] if pipeline else {}
        self._note(first.get("$match"))
        return self._collection.aggregate(pipeline, **kwargs)

    def estimated_document_count(self, **kwargs: Any) -> int:
        return self._collection.estimated_document_count(**kwargs)

    def __getattr__(self, name: str) -> Any:  # writes, and whatever else, as they are
        return getattr(self._collection, name)


class CountingDatabase:
    """``db`` whose collections count what their reads select."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.examined: Counter[str] = Counter()

    def __getitem__(self, name: str) -> _CountingCollection:
        return _CountingCollection(self._db[name], self.examined)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def reads(self, request: Any) -> Counter[str]:
        """What ``request()`` examined, per collection."""
        self.examined.clear()
        request()
        return Counter(self.examined)


def _crawl(seed: Any, per_minute: int) -> None:
    """Two runs' worth of outcomes in each of the last 30 minutes, ``per_minute`` a minute."""
    for minute in range(30):
        seed.outcome("success", minutes_ago=minute, count=per_minute // 2)
        seed.outcome("error", minutes_ago=minute, reason="http 404", count=per_minute - per_minute // 2)


@pytest.fixture
def counting(mongo_db) -> CountingDatabase:
    storage.ensure_indexes(mongo_db)
    return CountingDatabase(mongo_db)


def test_the_chart_and_the_totals_read_counters_only_and_as_many_as_before(counting, mongo_db, seed):
    from image_crawler.outcomes import counted_totals

    _crawl(seed, per_minute=20)

    def chart_and_totals() -> None:
        minute_buckets(counting, 60, now=seed.now)
        minute_buckets(counting, None, now=seed.now)
        counted_totals(counting)

    small = counting.reads(chart_and_totals)
    _crawl(seed, per_minute=200)  # eleven times the ledger, over the same minutes
    large = counting.reads(chart_and_totals)

    assert storage.ledger(mongo_db).count_documents({}) == 30 * 220
    assert small[storage.OUTCOMES_COLLECTION] == 0 and large[storage.OUTCOMES_COLLECTION] == 0
    assert large == small
    assert (
        0 < small[storage.MINUTE_COUNTS_COLLECTION] <= 3 * 30
    )  # a counter per minute (one run here), per read


def test_a_dashboard_request_costs_the_same_with_ten_times_the_ledger(counting, mongo_db, redis_url, seed):
    app = create_app({"TESTING": True, "MONGO_DATABASE": counting, "REDIS_URL": redis_url})
    client = app.test_client()
    _crawl(seed, per_minute=20)

    def dashboard() -> None:
        for path in ("/", "/monitoring.json?minutes=60", "/monitoring?minutes=60", "/runs", "/runs/seed"):
            assert client.get(path).status_code == 200

    dashboard()  # the first request of the app also recounts settled minutes (below)
    small = counting.reads(dashboard)
    _crawl(seed, per_minute=200)
    large = counting.reads(dashboard)

    assert large == small
    # The ledger is read only for the latest errors (RECENT_ERRORS of them) and the latest minute,
    # and on the run's page for its first errors (one more, to tell whether there are more).
    assert small[storage.OUTCOMES_COLLECTION] <= 2 * (app.config["RECENT_ERRORS"] + 1) + 1
    assert 0 < small[storage.REASON_COUNTS_COLLECTION] <= 2 * 30  # a reason counter per minute, per read


def test_a_recount_with_nothing_settled_to_recount_reads_almost_nothing(counting, mongo_db, seed):
    _crawl(seed, per_minute=20)
    while outcomes.reconcile(counting, now=seed.now):  # recounts the settled minutes once
        pass

    again = counting.reads(lambda: outcomes.reconcile(counting, now=seed.now))

    assert sum(again.values()) <= 2  # the mark of what is recounted, and one index probe
