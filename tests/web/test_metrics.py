"""GET /metrics: the crawl in Prometheus' text format, read from MongoDB and Redis at each scrape."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import logging

import dramatiq
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from image_crawler import outcomes, storage
from image_crawler.broker import ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE, create_broker
from image_crawler.config import get_settings
from image_crawler.context import DOWNLOADED_BODIES_KEY, DOWNLOADED_BYTES_KEY
from image_crawler.outcomes import OUTCOMES, Job
from support.http_server import LocalHttpServer
from support.images import png_bytes
from web import create_app
from web import metrics as web_metrics

QUEUES = (ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE)
RUN_STATES = ("sending", "stalled", "running", "interrupted")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client, **kwargs) -> Samples:
    """GET /metrics and parse it as Prometheus would: ``(sample name, sorted labels) → value``."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    return parse(response.text)


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of ``name`` keyed by the value of their one label ``label``."""
    return {dict(labels)[label]: value for labels, value in labelled(samples, name).items()}


@pytest.fixture
def broker(redis_url):
    """The workers' broker on the suite's Redis, its three queues empty before and after."""
    created = create_broker(dataclasses.replace(get_settings(), redis_url=redis_url))
    for queue in QUEUES:
        created.flush(queue)
    yield created
    for queue in QUEUES:
        created.flush(queue)
    created.close()


def message(queue: str, actor: str) -> dramatiq.Message:
    return dramatiq.Message(queue_name=queue, actor_name=actor, args=(), kwargs={}, options={})


# --- the format --------------------------------------------------------------------------


def test_metrics_are_prometheus_text_with_help_for_every_family(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert response.cache_control.no_store
    families = list(text_string_to_metric_families(response.text))
    assert families
    for family in families:
        assert family.name.startswith("image_crawler_"), family.name
        assert family.documentation, f"{family.name} has no HELP"


def test_an_empty_crawl_reports_zeros_not_gaps(client, broker, download_counters):
    samples = scrape(client)

    assert by(samples, "image_crawler_up", "store") == {"mongo": 1, "redis": 1}
    assert by(samples, "image_crawler_outcomes_total", "outcome") == dict.fromkeys(OUTCOMES, 0)
    assert labelled(samples, "image_crawler_images_stored") == {(): 0}
    assert labelled(samples, "image_crawler_recent_errors") == {}
    queued = labelled(samples, "image_crawler_queue_messages")
    assert queued == {
        (("queue", queue), ("state", state)): 0
        for queue in QUEUES
        for state in ("waiting", "delayed", "in_flight")
    }
    assert by(samples, "image_crawler_queue_dead_messages", "queue") == dict.fromkeys(QUEUES, 0)
    assert by(samples, "image_crawler_runs", "state") == dict.fromkeys(RUN_STATES, 0)
    assert labelled(samples, "image_crawler_lines_in_flight") == {(): 0}
    assert labelled(samples, "image_crawler_downloaded_bytes_total") == {(): 0}
    assert labelled(samples, "image_crawler_downloads_total") == {(): 0}


# --- from MongoDB ------------------------------------------------------------------------


def test_outcomes_are_counted_by_outcome(client, seed):
    seed.outcome("success", count=3)
    seed.outcome("duplicate", minutes_ago=30, count=2)
    seed.outcome("error", minutes_ago=600, reason="http 404")

    outcomes = by(scrape(client), "image_crawler_outcomes_total", "outcome")

    assert outcomes == {"success": 3, "duplicate": 2, "error": 1}


def test_images_stored_counts_distinct_images(client, seed):
    seed.image(1)
    seed.image(2)

    assert labelled(scrape(client), "image_crawler_images_stored") == {(): 2}


def test_recent_errors_are_counted_by_reason_without_the_detail_after_a_colon(client, seed):
    seed.outcome("error", reason="too many pixels: 3000x3000")
    seed.outcome("error", reason="too many pixels: 5000x4000", count=2)
    seed.outcome("error", reason="http 404", count=4)
    seed.outcome("error", reason="http 429: retry-after 900 s is over RETRY_AFTER_MAX")
    seed.outcome("success", count=5)

    reasons = by(scrape(client), "image_crawler_recent_errors", "reason")

    assert reasons == {"too many pixels": 3, "http 404": 4, "http 429": 1}


def test_errors_older_than_the_window_are_not_recent_but_still_counted(client, seed):
    seed.outcome("error", reason="timeout", count=2)
    seed.outcome("error", reason="not an image", minutes_ago=web_metrics.RECENT_ERROR_MINUTES + 5)

    samples = scrape(client)

    assert by(samples, "image_crawler_recent_errors", "reason") == {"timeout": 2}
    assert by(samples, "image_crawler_outcomes_total", "outcome")["error"] == 3


def test_only_the_most_frequent_reasons_are_named_and_the_rest_are_other(client, seed):
    top = web_metrics.METRIC_REASONS
    for rank in range(top + 5):
        # Reason r0 is the most frequent, then r1…; each name is a different reason class.
        seed.outcome("error", reason=f"reason {rank}", count=top + 5 - rank)

    reasons = by(scrape(client), "image_crawler_recent_errors", "reason")

    assert len(reasons) == top + 1
    assert {f"reason {rank}" for rank in range(top)} | {"other"} == set(reasons)
    assert reasons["reason 0"] == top + 5
    assert reasons["other"] == sum(top + 5 - rank for rank in range(top, top + 5))


def test_recent_errors_are_read_from_the_reason_counters_not_the_ledger(client, seed, mongo_db):
    # Exact however many there are, at the cost of the window's counters: the ledger is not read.
    seed.outcome("error", reason="timeout", count=25)
    storage.ledger(mongo_db).delete_many({})

    reasons = by(scrape(client), "image_crawler_recent_errors", "reason")

    assert reasons == {"timeout": 25}


def _run(db, run: str, *, lines: int, ended: int = 0, sent: bool = False, interrupted: bool = False) -> None:
    """A run as ``enqueue`` records it: ``lines`` lines sent so far, ``ended`` of them with an outcome."""
    outcomes.start_run(db, run)
    outcomes.run_progress(db, run, enqueued=lines, rejected=0, skipped=0, sent=sent, interrupted=interrupted)
    documents = [
        outcomes.outcome_document(Job.new(run, line, f"http://images.test/{run}/{line}.png"), "success")
        for line in range(1, ended + 1)
    ]
    outcomes.record_outcomes(db, documents)


def test_unfinished_runs_are_counted_by_state_with_their_lines_in_flight(client, mongo_db):
    _run(mongo_db, "reading", lines=5)  # enqueue is still sending
    _run(mongo_db, "crawling", lines=5, ended=2, sent=True)
    _run(mongo_db, "crawling-too", lines=1, sent=True)
    _run(mongo_db, "stopped", lines=3, ended=1, interrupted=True)
    _run(mongo_db, "finished", lines=2, ended=2, sent=True)  # done: not in flight
    _run(mongo_db, "abandoned", lines=4)  # its enqueue died long ago without a word
    long_ago = storage.utcnow() - outcomes.STALLED_AFTER - dt.timedelta(minutes=5)
    storage.runs(mongo_db).update_one(
        {"_id": "abandoned"}, {"$set": {"started_at": long_ago, "updated_at": long_ago}}
    )

    samples = scrape(client)

    assert by(samples, "image_crawler_runs", "state") == {
        "sending": 1,
        "stalled": 1,
        "running": 2,
        "interrupted": 1,
    }
    # 5 (reading) + 3 + 1 (crawling) + 2 (stopped) + 4 (abandoned)
    assert labelled(samples, "image_crawler_lines_in_flight") == {(): 15}


def test_a_run_leaves_the_runs_gauges_once_every_line_has_its_outcome(client, mongo_db):
    _run(mongo_db, "run", lines=2, ended=1, sent=True)
    assert by(scrape(client), "image_crawler_runs", "state")["running"] == 1

    outcomes.record_outcomes(
        mongo_db, [outcomes.outcome_document(Job.new("run", 2, "http://images.test/2.png"), "error")]
    )
    samples = scrape(client)

    assert by(samples, "image_crawler_runs", "state") == dict.fromkeys(RUN_STATES, 0)
    assert labelled(samples, "image_crawler_lines_in_flight") == {(): 0}


# --- from Redis --------------------------------------------------------------------------


def test_queue_messages_are_counted_by_queue_and_state(client, broker):
    for _ in range(3):
        broker.enqueue(message(FETCH_QUEUE, "fetch"))
    broker.enqueue(message(ADMIT_QUEUE, "admit"))
    broker.enqueue(message(PROCESS_QUEUE, "md5"), delay=600_000)  # a retry waiting for its backoff
    consumer = broker.consume(FETCH_QUEUE, prefetch=2, timeout=100)
    taken = [next(consumer) for _ in range(2)]  # a worker took two: one running, one prefetched
    assert all(taken)

    try:
        queued = labelled(scrape(client), "image_crawler_queue_messages")

        assert queued[(("queue", FETCH_QUEUE), ("state", "waiting"))] == 1
        assert queued[(("queue", FETCH_QUEUE), ("state", "in_flight"))] == 2
        assert queued[(("queue", ADMIT_QUEUE), ("state", "waiting"))] == 1
        assert queued[(("queue", PROCESS_QUEUE), ("state", "delayed"))] == 1
        assert queued[(("queue", PROCESS_QUEUE), ("state", "waiting"))] == 0
        assert sum(queued.values()) == 5

        consumer.ack(taken[0])
        consumer.nack(taken[1])  # failed for good: dead-lettered
        samples = scrape(client)
        queued = labelled(samples, "image_crawler_queue_messages")
        assert queued[(("queue", FETCH_QUEUE), ("state", "in_flight"))] == 0
        assert queued[(("queue", FETCH_QUEUE), ("state", "waiting"))] == 1
        assert by(samples, "image_crawler_queue_dead_messages", "queue")[FETCH_QUEUE] == 1
    finally:
        consumer.close()


def test_downloads_are_the_workers_counters(client, download_counters):
    download_counters.set(DOWNLOADED_BYTES_KEY, 12 * 1024**4)  # 12 TiB: past any 32-bit count
    download_counters.set(DOWNLOADED_BODIES_KEY, 3_000_000)

    samples = scrape(client)

    assert labelled(samples, "image_crawler_downloaded_bytes_total") == {(): 12 * 1024**4}
    assert labelled(samples, "image_crawler_downloads_total") == {(): 3_000_000}


def test_downloads_count_the_bodies_a_real_crawl_fetched_in_full(
    make_pipeline, mongo_db, redis_url, download_counters
):
    bodies = {f"/img/{n}.png": png_bytes(40 + n, 30, seed=n) for n in range(3)}
    with LocalHttpServer() as server:
        for path, body in bodies.items():
            server.add(path, body=body, content_type="image/png")
        server.add("/missing.png", status=404)  # nothing downloaded
        pipeline = make_pipeline()
        text = "".join(f"{server.url(path)}\n" for path in [*bodies, "/missing.png"])
        report = pipeline.enqueue_text(text)
        pipeline.wait_for(report.run, report.jobs)

    app = create_app({"TESTING": True, "MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url})
    samples = scrape(app.test_client())

    assert labelled(samples, "image_crawler_downloaded_bytes_total") == {
        (): sum(len(body) for body in bodies.values())
    }
    assert labelled(samples, "image_crawler_downloads_total") == {(): len(bodies)}
    assert by(samples, "image_crawler_runs", "state") == dict.fromkeys(RUN_STATES, 0), "the run is done"
    assert labelled(samples, "image_crawler_lines_in_flight") == {(): 0}


# --- a store is down ---------------------------------------------------------------------


def test_with_mongo_down_the_scrape_answers_with_redis_metrics_and_mongo_up_0(redis_url, dead_port, broker):
    app = create_app(
        {
            "MONGO_URI": f"mongodb://127.0.0.1:{dead_port}/image_crawler",
            "REDIS_URL": redis_url,
            "SERVICE_TIMEOUT": 0.3,
        }
    )

    samples = scrape(app.test_client())

    assert by(samples, "image_crawler_up", "store") == {"mongo": 0, "redis": 1}
    assert labelled(samples, "image_crawler_queue_messages")
    assert not labelled(samples, "image_crawler_outcomes_total"), "no made-up zeros for an unread store"
    assert not labelled(samples, "image_crawler_images_stored")
    assert not labelled(samples, "image_crawler_runs")
    assert not labelled(samples, "image_crawler_lines_in_flight")
    assert labelled(samples, "image_crawler_downloads_total"), "the downloads are read from Redis"


def test_with_redis_down_the_scrape_answers_with_mongo_metrics_and_redis_up_0(mongo_db, seed, dead_port):
    seed.outcome("success", count=2)
    app = create_app(
        {"MONGO_DATABASE": mongo_db, "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0", "SERVICE_TIMEOUT": 0.3}
    )

    samples = scrape(app.test_client())

    assert by(samples, "image_crawler_up", "store") == {"mongo": 1, "redis": 0}
    assert by(samples, "image_crawler_outcomes_total", "outcome")["success"] == 2
    assert not labelled(samples, "image_crawler_queue_messages")
    assert not labelled(samples, "image_crawler_queue_dead_messages")
    assert not labelled(samples, "image_crawler_downloaded_bytes_total")
    assert not labelled(samples, "image_crawler_downloads_total")
    assert by(samples, "image_crawler_runs", "state") == dict.fromkeys(RUN_STATES, 0)


def test_with_both_down_the_scrape_still_answers_and_names_no_internals(
    app_with_stores_down, dead_port, caplog
):
    app = app_with_stores_down
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get("/metrics")

    assert response.status_code == 200
    assert by(parse(response.text), "image_crawler_up", "store") == {"mongo": 0, "redis": 0}
    for internal in (str(dead_port), "refused", "secret"):
        assert internal not in response.text, internal
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "mongo" in logged and "redis" in logged
    assert "secret" not in logged


# --- access and isolation ----------------------------------------------------------------


def test_metrics_ask_for_the_credentials_when_they_are_set(mongo_db, redis_url):
    storage.ensure_indexes(mongo_db)
    app = create_app(
        {"MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url, "WEB_USER": "prom", "WEB_PASSWORD": "scrape-me"}
    )
    client = app.test_client()

    def basic(credentials: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}

    refused = client.get("/metrics")
    wrong = client.get("/metrics", headers=basic(b"prom:wrong"))
    allowed = client.get("/metrics", headers=basic(b"prom:scrape-me"))

    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    assert "image_crawler" not in refused.text
    assert wrong.status_code == 401
    assert allowed.status_code == 200 and "image_crawler_up" in allowed.text


def test_each_app_has_its_own_registry_and_the_global_one_stays_clean(mongo_db, redis_url, seed):
    import mongomock

    seed.outcome("success", count=4)
    other_db = mongomock.MongoClient(tz_aware=True)["elsewhere"]
    first = create_app({"MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url})
    second = create_app({"MONGO_DATABASE": other_db, "REDIS_URL": redis_url})

    assert by(scrape(first.test_client()), "image_crawler_outcomes_total", "outcome")["success"] == 4
    assert by(scrape(second.test_client()), "image_crawler_outcomes_total", "outcome")["success"] == 0
    global_names = {metric.name for metric in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("image_crawler") for name in global_names)
