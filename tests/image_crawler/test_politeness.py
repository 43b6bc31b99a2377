"""Politeness: per-host turns shared through Redis, Retry-After, and an honest User-Agent."""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import time
import uuid
from contextlib import ExitStack

import pytest

from image_crawler import outcomes, politeness, storage
from image_crawler.fetching import parse_retry_after
from image_crawler.politeness import HostBusy, HostGate, host_of
from support.http_server import LocalHttpServer, Response
from support.images import png_bytes


@pytest.fixture
def host() -> str:
    return f"host-{uuid.uuid4().hex[:8]}.test"


def gate(client, **options) -> HostGate:
    defaults = {"concurrency": 2, "delay_ms": 0, "turn_ms": 10_000, "patience_s": 0.2, "longest_pause_s": 600}
    return HostGate(client, **{**defaults, **options})


def turns_at_once(polite: HostGate, host: str, most: int) -> int:
    """How many turns of ``host`` can be held at once right now, up to ``most`` (0: it is paused)."""
    with ExitStack() as held:
        for taken in range(most):
            try:
                held.enter_context(polite.turn(host))
            except HostBusy:
                return taken
    return most


def levels_until(polite: HostGate, host: str, most: int, full: int, timeout: float = 30.0):
    """``(time.monotonic(), turns at once)`` each time the number of turns at once changes, until ``full``."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1][1] != full:
        assert time.monotonic() < deadline, f"the host never got back to {full} at once: {seen}"
        level = turns_at_once(polite, host, most)
        if not seen or seen[-1][1] != level:
            seen.append((time.monotonic(), level))
        time.sleep(0.02)
    return seen


# --- HostGate -----------------------------------------------------------------------------


def test_no_more_turns_than_the_host_concurrency_are_held_at_once(redis_client, host):
    first, second = gate(redis_client), gate(redis_client)  # two workers

    with first.turn(host), second.turn(host):
        with pytest.raises(HostBusy) as busy, first.turn(host):
            pass
        assert busy.value.wait_ms > 0
    with first.turn(host):  # given back
        pass


def test_a_host_concurrency_of_zero_is_no_limit(redis_client, host):
    unlimited = gate(redis_client, concurrency=0)
    entered = False

    with unlimited.turn(host), unlimited.turn(host), unlimited.turn(host):
        entered = True  # three at once, where a limit of 1 (below) refuses the second

    limited = gate(redis_client, concurrency=1)
    with limited.turn(host), pytest.raises(HostBusy), limited.turn(host):
        pass
    assert entered


def test_another_host_has_turns_of_its_own(redis_client, host):
    limited = gate(redis_client, concurrency=1)
    other = "other-" + host

    with limited.turn(host):
        with pytest.raises(HostBusy), limited.turn(host):  # this host's only turn is taken…
            pass
        with limited.turn(other):  # …and the other host's is not
            entered_other = True
    assert entered_other


def test_the_turn_of_a_worker_that_died_comes_back(redis_client, host):
    dying = gate(redis_client, concurrency=1, turn_ms=300)
    held = dying.turn(host)
    held.__enter__()  # and never left: the worker died

    with pytest.raises(HostBusy), dying.turn(host):
        pass
    time.sleep(0.35)
    with dying.turn(host):
        pass


def test_requests_to_a_host_start_at_least_the_host_delay_apart(redis_client, host):
    spaced = gate(redis_client, concurrency=0, delay_ms=300, patience_s=2.0)
    starts = []

    for _ in range(3):
        with spaced.turn(host):
            starts.append(time.monotonic())

    assert all(later - earlier >= 0.28 for earlier, later in itertools.pairwise(starts))


def test_a_host_that_waits_longer_than_the_patience_is_busy_for_that_long(redis_client, host):
    spaced = gate(redis_client, concurrency=0, delay_ms=5_000, patience_s=0.1)
    with spaced.turn(host):
        pass

    with pytest.raises(HostBusy) as busy, spaced.turn(host):
        pass

    assert 4_000 <= busy.value.wait_ms <= 5_000


def test_an_overloaded_host_is_paused_then_served_at_half_its_concurrency(redis_client, host):
    polite = gate(redis_client, concurrency=8, patience_s=0.1)

    assert polite.slow_down(host, retry_after_s=1) == 4
    with pytest.raises(HostBusy) as busy, polite.turn(host):
        pass
    assert 500 <= busy.value.wait_ms <= 1_000
    time.sleep(1.05)
    held = [polite.turn(host) for _ in range(4)]
    for turn in held:
        turn.__enter__()
    with pytest.raises(HostBusy), polite.turn(host):
        pass
    for turn in held:
        turn.__exit__(None, None, None)
    assert polite.slow_down(host, retry_after_s=None) == 4  # the same burst of 429s: halved once
    time.sleep(2.05)
    assert polite.slow_down(host, retry_after_s=None) == 2  # a new one: halved again


def test_after_its_pause_a_host_is_still_at_half_for_the_throttle_period(redis_client, host, monkeypatch):
    monkeypatch.setattr(politeness, "THROTTLE_MS", 1_000)  # shorter than the pause it asked for
    polite = gate(redis_client, concurrency=4, patience_s=0.0)

    before = time.monotonic()
    assert polite.slow_down(host, retry_after_s=2) == 2
    seen = levels_until(polite, host, most=8, full=4)

    assert [level for _, level in seen] == [0, 2, 4]  # paused, half, full
    assert seen[1][0] - before >= 1.95  # the pause it asked for
    assert seen[2][0] - before >= 2.95  # then half for THROTTLE_MS after the pause


def test_a_host_halved_twice_recovers_doubling_each_throttle_period(redis_client, host, monkeypatch):
    monkeypatch.setattr(politeness, "THROTTLE_MS", 800)
    monkeypatch.setattr(politeness, "HALVE_ONCE_MS", 0)  # two 429s of two bursts, without waiting
    polite = gate(redis_client, concurrency=8, patience_s=0.0)

    before = time.monotonic()
    assert polite.slow_down(host, retry_after_s=None) == 4
    assert polite.slow_down(host, retry_after_s=None) == 2
    seen = levels_until(polite, host, most=16, full=8)

    assert [level for _, level in seen] == [2, 4, 8]
    assert seen[1][0] - before >= 0.75  # half of half for THROTTLE_MS after the last 429
    assert seen[2][0] - before >= 1.55  # then half, for THROTTLE_MS more


def test_a_host_without_a_limit_is_halved_from_what_it_had_in_flight_and_recovers_to_none(
    redis_client, host, monkeypatch
):
    monkeypatch.setattr(politeness, "THROTTLE_MS", 800)
    monkeypatch.setattr(politeness, "HALVE_ONCE_MS", 0)
    polite = gate(redis_client, concurrency=0, patience_s=0.0)

    with ExitStack() as held:
        for _ in range(8):
            held.enter_context(polite.turn(host))
        assert polite.slow_down(host, retry_after_s=None) == 4
        assert polite.slow_down(host, retry_after_s=None) == 2
    seen = levels_until(polite, host, most=32, full=32)

    assert [level for _, level in seen] == [2, 4, 32]  # then no limit again


def test_the_hosts_state_outlives_its_pause_and_its_recovery(redis_client, host, monkeypatch):
    monkeypatch.setattr(politeness, "HALVE_ONCE_MS", 0)
    polite = gate(redis_client, concurrency=8, delay_ms=100, patience_s=0.0)
    state = f"image-crawler:host:{host}"

    before = time.monotonic()
    for _ in range(2):
        polite.slow_down(host, retry_after_s=None)
    assert polite.slow_down(host, retry_after_s=1) == 1  # 8 → 4 → 2 → 1, paused 1 s
    # Paused, then at 1 for THROTTLE_MS, at 2 for THROTTLE_MS, at 4 for THROTTLE_MS: then back at 8.
    recovered = before + 1 + 3 * politeness.THROTTLE_MS / 1000

    assert redis_client.pttl(state) / 1000 >= recovered - time.monotonic()
    while turns_at_once(polite, host, most=1) == 0:  # the pause ends: a turn sets the next start…
        time.sleep(0.02)
    assert redis_client.pttl(state) / 1000 >= recovered - time.monotonic()  # …and keeps the rest


@pytest.mark.parametrize(
    ("url", "host"),
    [("http://User:pw@Images.Example.:8080/a.png", "images.example"), ("https://[::1]/a", "::1")],
)
def test_host_of_is_the_lower_case_name(url: str, host: str):
    assert host_of(url) == host


# --- Retry-After ----------------------------------------------------------------------------


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    later = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120), usegmt=True)

    assert parse_retry_after("7") == 7.0
    assert 110 <= parse_retry_after(later) <= 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("\u00b2") is None  # a digit, but not one float() reads
    assert parse_retry_after("9" * 400) is None  # not a delay anyone means


def test_a_host_asking_for_centuries_is_paused_no_longer_than_the_longest_pause(redis_client, host):
    polite = gate(redis_client, concurrency=8, patience_s=0.1, longest_pause_s=600)

    polite.slow_down(host, retry_after_s=1e15)

    with pytest.raises(HostBusy) as busy, polite.turn(host):
        pass
    assert 590_000 <= busy.value.wait_ms <= 600_000
    # Paused 600 s, then at half for THROTTLE_MS, then back at 8: forgotten a minute after that.
    assert 0 < redis_client.pttl(f"image-crawler:host:{host}") <= 600_000 + politeness.THROTTLE_MS + 60_000


# --- through the pipeline -------------------------------------------------------------------


@pytest.fixture
def server():
    with LocalHttpServer() as running:
        yield running


def test_the_host_limit_holds_over_two_workers_of_eight_threads(make_pipeline, server):
    pipeline = make_pipeline(threads=8, host_concurrency=3, batch_size=4)
    make_pipeline(threads=8, host_concurrency=3, batch_size=4)
    for n in range(24):
        server.add_sequence(f"/slow/{n}.png", [Response(body=png_bytes(20, 20, seed=n), delay=0.2)])
        server.add(f"/other/{n}.png", body=png_bytes(20, 20, seed=100 + n))
    lines = [server.url(f"/slow/{n}.png") for n in range(24)]
    lines += [server.url(f"/other/{n}.png").replace("127.0.0.1", "localhost") for n in range(24)]

    report = pipeline.enqueue_text("\n".join(lines))
    pipeline.wait_for(report.run, 48, timeout=120)

    assert outcomes.count_outcomes(pipeline.db, report.run) == {"success": 48, "duplicate": 0, "error": 0}
    assert server.most_in_flight(f"127.0.0.1:{server.port}") == 3
    assert server.most_in_flight(f"localhost:{server.port}") <= 3


def test_a_429_with_retry_after_is_retried_no_sooner_and_pauses_its_host(make_pipeline, server):
    pipeline = make_pipeline(threads=2, host_concurrency=2, batch_size=1, fetch_retries=2)
    server.add_sequence(
        "/wall.png",
        [
            # Longer than the backoff of a first retry (2 to 4 s): only Retry-After explains the wait.
            Response(status=429, headers={"Retry-After": "5"}, content_type="text/plain"),
            Response(body=png_bytes(20, 20, seed=1)),
        ],
    )
    server.add("/after.png", body=png_bytes(20, 20, seed=2))

    report = pipeline.enqueue_text(server.url("/wall.png"))
    deadline = time.monotonic() + 30
    while server.hits("/wall.png") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the 429 has been answered: another URL of the host now waits for the pause
    second = pipeline.enqueue_text(server.url("/after.png"))
    pipeline.wait_for(report.run, 1, timeout=60)
    pipeline.wait_for(second.run, 1, timeout=60)

    times: dict[str, list[float]] = {}
    for at, _, path, _ in server.requests():
        times.setdefault(path, []).append(at)
    assert outcomes.count_outcomes(pipeline.db, report.run)["success"] == 1
    assert times["/wall.png"][1] - times["/wall.png"][0] >= 4.95  # no sooner than Retry-After
    assert times["/after.png"][0] - times["/wall.png"][0] >= 4.95  # the host was paused for all


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_longer_than_the_maximum_ends_the_url_naming_it(make_pipeline, server, status):
    pipeline = make_pipeline(retry_after_max=600)
    server.add("/later.png", status=status, headers={"Retry-After": "3600"}, content_type="text/plain")

    report = pipeline.enqueue_text(server.url("/later.png"))
    pipeline.wait_for(report.run, 1)

    entry = storage.ledger(pipeline.db).find_one({"run": report.run})
    assert (entry["outcome"], entry["reason"]) == (
        "error",
        f"http {status}: retry-after 3600 s is over RETRY_AFTER_MAX",
    )
    assert server.hits("/later.png") == 1


def test_every_request_says_who_is_asking(make_pipeline, server):
    pipeline = make_pipeline(user_agent="acme-crawler/2 (+mailto:crawl@acme.test)")
    server.add("/ua.png", body=png_bytes(20, 20, seed=3))

    report = pipeline.enqueue_text(server.url("/ua.png"))
    pipeline.wait_for(report.run, 1)

    assert [agent for _, _, path, agent in server.requests() if path == "/ua.png"] == [
        "acme-crawler/2 (+mailto:crawl@acme.test)"
    ]


def test_the_default_user_agent_names_the_crawler_and_where_to_read_about_it():
    from image_crawler.fetching import PROJECT_URL, default_user_agent

    assert default_user_agent().startswith("image-crawler/")
    assert default_user_agent().endswith(f"(+{PROJECT_URL})")


# --- robots.txt and X-Robots-Tag, with OBEY_ROBOTS=1 ----------------------------------------


def test_with_obey_robots_disallowed_urls_are_never_requested(make_pipeline, server):
    pipeline = make_pipeline(obey_robots=True)
    server.add("/robots.txt", body=b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    server.add("/private/a.png", body=png_bytes(20, 20, seed=4))
    server.add("/public/b.png", body=png_bytes(20, 20, seed=5))
    server.add(
        "/public/ai.png", body=png_bytes(20, 20, seed=6), headers={"X-Robots-Tag": "image-crawler: noai"}
    )

    urls = [server.url(path) for path in ("/private/a.png", "/public/b.png", "/public/ai.png")]
    report = pipeline.enqueue_text("\n".join(urls))
    pipeline.wait_for(report.run, 3)

    ledger = {doc["line"]: doc for doc in storage.ledger(pipeline.db).find({"run": report.run})}
    assert (ledger[1]["outcome"], ledger[1]["reason"]) == ("error", "disallowed by robots.txt")
    assert ledger[2]["outcome"] == "success"
    assert (ledger[3]["outcome"], ledger[3]["reason"]) == ("error", "disallowed by x-robots-tag")
    assert server.hits("/private/a.png") == 0
    assert server.hits("/robots.txt") == 1


def test_without_obey_robots_robots_txt_is_not_even_asked_for(make_pipeline, server):
    pipeline = make_pipeline()
    server.add("/robots.txt", body=b"User-agent: *\nDisallow: /\n", content_type="text/plain")
    server.add("/any.png", body=png_bytes(20, 20, seed=7))

    report = pipeline.enqueue_text(server.url("/any.png"))
    pipeline.wait_for(report.run, 1)

    assert outcomes.count_outcomes(pipeline.db, report.run)["success"] == 1
    assert server.hits("/robots.txt") == 0
