"""GET /monitoring (pygal SVG) and /monitoring.json: outcomes per UTC minute."""

from __future__ import annotations

import datetime as dt
import itertools
import xml.etree.ElementTree as ET

import pytest

from web.monitoring import minute_buckets

SVG = "{http://www.w3.org/2000/svg}"


def parse_minute(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def buckets_of(client, query: str = "") -> list[dict]:
    response = client.get(f"/monitoring.json{query}")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()["buckets"]


def by_minutes_ago(buckets: list[dict]) -> dict[int, dict]:
    """Buckets keyed by how many minutes before the last one they are."""
    last = parse_minute(buckets[-1]["minute"])
    return {(last - parse_minute(b["minute"])) // dt.timedelta(minutes=1): b for b in buckets}


def test_outcomes_are_counted_in_the_minute_they_ended_and_empty_minutes_are_zero(client, seed):
    seed.outcome("success", minutes_ago=5, count=3)
    seed.outcome("duplicate", minutes_ago=5)
    seed.outcome("error", minutes_ago=5, reason="http 404", count=2)
    seed.outcome("success", minutes_ago=2, count=4)
    seed.outcome("error", minutes_ago=0, reason="timeout")

    buckets = buckets_of(client, "?minutes=10")

    assert len(buckets) == 10
    assert list(buckets[0]) == ["minute", "success", "duplicate", "error"]
    minutes = [parse_minute(b["minute"]) for b in buckets]
    assert all(b - a == dt.timedelta(minutes=1) for a, b in itertools.pairwise(minutes))
    shift = (minutes[-1] - seed.now) // dt.timedelta(minutes=1)  # the clock may have turned meanwhile
    assert shift in (0, 1)
    ago = by_minutes_ago(buckets)
    counts = {n: (b["success"], b["duplicate"], b["error"]) for n, b in ago.items()}
    assert counts[5 + shift] == (3, 1, 2)
    assert counts[2 + shift] == (4, 0, 0)
    assert sum(map(sum, counts.values())) == 11
    assert sorted(n for n, c in counts.items() if c == (0, 0, 0)) == [
        n for n in range(10) if n not in {5 + shift, 2 + shift, 0 + shift}
    ]


def test_default_window_is_60_minutes_and_older_outcomes_fall_out(client, seed):
    seed.outcome("success", minutes_ago=30)
    seed.outcome("success", minutes_ago=90)

    buckets = buckets_of(client)

    assert len(buckets) == 60
    assert sum(b["success"] for b in buckets) == 1


def test_all_covers_every_minute_from_the_first_outcome(client, seed):
    seed.outcome("success", minutes_ago=100)
    seed.outcome("error", minutes_ago=3, reason="not an image")

    buckets = buckets_of(client, "?minutes=all")

    assert parse_minute(buckets[0]["minute"]) == seed.now - dt.timedelta(minutes=100)
    minutes = [parse_minute(b["minute"]) for b in buckets]
    assert all(b - a == dt.timedelta(minutes=1) for a, b in itertools.pairwise(minutes))
    assert len(buckets) in (101, 102)  # the clock may have turned meanwhile
    assert sum(b["success"] for b in buckets) == 1 and sum(b["error"] for b in buckets) == 1


def test_all_lists_only_the_busy_minutes_before_the_last_day(mongo_db, seed):
    five_years = 5 * 365 * 24 * 60
    seed.outcome("success", minutes_ago=five_years, count=2)
    seed.outcome("duplicate", minutes_ago=five_years - 1)
    seed.outcome("success", minutes_ago=1500)
    seed.outcome("error", minutes_ago=3, reason="not an image")

    buckets = minute_buckets(mongo_db, None, now=seed.now, longest=1440)

    minutes = [bucket.minute for bucket in buckets]
    assert minutes[:3] == [seed.now - dt.timedelta(minutes=n) for n in (five_years, five_years - 1, 1500)]
    assert minutes[3:] == [seed.now - dt.timedelta(minutes=n) for n in range(1439, -1, -1)]
    assert [buckets[0].counts, buckets[1].counts, buckets[2].counts] == [
        {"success": 2, "duplicate": 0, "error": 0},
        {"success": 0, "duplicate": 1, "error": 0},
        {"success": 1, "duplicate": 0, "error": 0},
    ]
    assert sum(bucket.counts["error"] for bucket in buckets) == 1


def test_all_answers_a_bounded_list_however_old_the_first_outcome(client, seed):
    seed.outcome("success", minutes_ago=5 * 365 * 24 * 60)
    seed.outcome("success", minutes_ago=0)

    buckets = buckets_of(client, "?minutes=all")

    assert len(buckets) <= 1 + 1440 + 1
    assert sum(b["success"] for b in buckets) == 2


def test_empty_database_gives_zero_buckets_or_none(client):
    assert {(b["success"], b["duplicate"], b["error"]) for b in buckets_of(client)} == {(0, 0, 0)}
    assert buckets_of(client, "?minutes=all") == []


def test_outcome_from_a_clock_running_ahead_is_counted_in_the_next_minute(mongo_db, seed):
    seed.outcome("success", minutes_ago=-2)

    buckets = minute_buckets(mongo_db, 5, now=seed.now)

    assert len(buckets) == 6
    assert buckets[-1].minute == seed.now + dt.timedelta(minutes=1)
    assert buckets[-1].counts == {"success": 1, "duplicate": 0, "error": 0}


def test_outcome_in_the_next_minute_gets_its_own_bucket(mongo_db, seed):
    seed.outcome("error", minutes_ago=-1, reason="timeout")

    buckets = minute_buckets(mongo_db, 5, now=seed.now)

    assert [bucket.minute for bucket in buckets][-2:] == [seed.now, seed.now + dt.timedelta(minutes=1)]
    assert buckets[-1].counts["error"] == 1


def test_a_clock_a_month_ahead_does_not_stretch_the_window(client, mongo_db, seed):
    month = 30 * 24 * 60
    seed.outcome("success", minutes_ago=-month, count=3)
    seed.outcome("duplicate", minutes_ago=-month - 7)
    seed.outcome("success", minutes_ago=10)

    buckets = minute_buckets(mongo_db, 60, now=seed.now)
    answered = buckets_of(client, "?minutes=60")

    assert len(buckets) == 61 and buckets[-1].minute == seed.now + dt.timedelta(minutes=1)
    assert buckets[-1].counts == {"success": 3, "duplicate": 1, "error": 0}
    assert len(answered) == 61
    assert sum(b["success"] for b in answered) == 4 and sum(b["duplicate"] for b in answered) == 1


def test_a_clock_a_year_ahead_does_not_stretch_all_or_the_chart(client, seed):
    seed.outcome("success", minutes_ago=-365 * 24 * 60)
    seed.outcome("success", minutes_ago=2)

    everything = buckets_of(client, "?minutes=all")
    assert len(everything) <= 5 and sum(b["success"] for b in everything) == 2

    chart = client.get("/monitoring?minutes=5")
    assert chart.status_code == 200 and len(chart.data) < 50_000


@pytest.mark.parametrize("minutes", ["1", "1440", "007"])
def test_window_bounds_are_accepted(client, minutes):
    assert len(buckets_of(client, f"?minutes={minutes}")) == int(minutes)
    assert client.get(f"/monitoring?minutes={minutes}").status_code == 200


@pytest.mark.parametrize(
    "minutes", ["0", "1441", "-1", "1.5", "abc", "1e3", " 60", "٣", "99999999999999999999", "%00"]
)
def test_window_out_of_bounds_is_400(client, minutes):
    svg = client.get(f"/monitoring?minutes={minutes}")
    json = client.get(f"/monitoring.json?minutes={minutes}")

    assert svg.status_code == 400 and svg.mimetype == "text/html"
    assert json.status_code == 400 and "1440" in json.get_json()["message"]


def test_svg_chart_cannot_draw_everything(client):
    assert client.get("/monitoring?minutes=all").status_code == 400


def bars(svg: bytes) -> list[ET.Element]:
    """The drawn bars (a <rect> with a positive height) of a pygal chart."""
    root = ET.fromstring(svg)
    return [
        rect
        for rect in root.iter(f"{SVG}rect")
        if "rect" in (rect.get("class") or "").split() and float(rect.get("height", 0)) > 0
    ]


def test_svg_is_a_stacked_bar_chart_with_legend_labels_and_tooltips(client, seed):
    seed.outcome("success", minutes_ago=3, count=5)
    seed.outcome("duplicate", minutes_ago=3, count=2)
    seed.outcome("error", minutes_ago=1, reason="http 500", count=3)

    response = client.get("/monitoring?minutes=30")

    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert response.cache_control.no_cache
    root = ET.fromstring(response.data)
    assert root.tag == f"{SVG}svg"
    assert len(bars(response.data)) == 3  # success and duplicate stacked in one minute, error in another
    texts = {el.text for el in root.iter() if el.text}
    assert {"success", "duplicate", "error"} <= texts  # the legend
    assert any(t.startswith("Outcomes per minute (UTC)") for t in texts)
    assert sum(1 for t in texts if len(t) == 5 and t[2] == ":") >= 5  # HH:MM minute labels
    titles = [el.text for el in root.iter(f"{SVG}title") if el.text and "UTC —" in el.text]
    assert sorted(t.split("— ")[1] for t in titles) == ["2 duplicate", "3 error", "5 success"]


def test_svg_is_self_contained(client, seed):
    seed.outcome("success")

    response = client.get("/monitoring")

    root = ET.fromstring(response.data)
    assert not list(root.iter(f"{SVG}script"))
    for element in root.iter():
        for value in element.attrib.values():
            assert not value.startswith(("http:", "https:", "//")), (element.tag, value)
        if element.tag == f"{SVG}style":
            assert "url(" not in (element.text or "") and "@import" not in (element.text or "")
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_empty_database_gives_an_empty_chart(client):
    response = client.get("/monitoring")

    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert bars(response.data) == []


def _uncounted(mongo_db, outcome: str, *, at: dt.datetime, count: int, run: str = "crashed") -> None:
    """Outcomes in the ledger whose worker died before counting them (the counters miss them)."""
    from image_crawler import outcomes, storage
    from image_crawler.outcomes import Job

    documents = [
        outcomes.outcome_document(Job.new(run, n, f"http://images.test/{n}.png"), outcome, at=at)
        for n in range(1, count + 1)
    ]
    storage.ledger(mongo_db).insert_many(documents)


def test_outcomes_a_crash_left_uncounted_are_charted_once_their_minute_has_settled(client, mongo_db, seed):
    seed.outcome("success", minutes_ago=30, count=2)
    _uncounted(mongo_db, "error", at=seed.now - dt.timedelta(minutes=30, seconds=-20), count=3)

    ago = by_minutes_ago(buckets_of(client, "?minutes=60"))

    settled = [b for b in ago.values() if b["success"] or b["error"]]
    assert [(b["success"], b["error"]) for b in settled] == [(2, 3)]


def test_the_chart_counts_the_current_minute_from_the_counters_the_writers_keep(client, mongo_db, seed):
    seed.outcome("success", minutes_ago=0, count=4)
    _uncounted(mongo_db, "error", at=seed.now + dt.timedelta(seconds=10), count=3)  # open: not recounted yet

    buckets = buckets_of(client, "?minutes=5")

    assert sum(b["success"] for b in buckets) == 4
    assert sum(b["error"] for b in buckets) == 0


def test_the_chart_of_a_month_long_run_shows_its_last_day_up_to_its_last_outcome(mongo_db):
    from image_crawler import outcomes, storage
    from image_crawler.outcomes import Job

    storage.ensure_indexes(mongo_db)
    last = storage.this_minute() - dt.timedelta(days=2)
    documents = []
    for day in range(30):  # an outcome a day for a month, ending two days ago
        at = last - dt.timedelta(days=29 - day) + dt.timedelta(seconds=5)
        documents.append(
            outcomes.outcome_document(Job.new("long", day + 1, "http://x.test/a"), "success", at=at)
        )
    outcomes.record_outcomes(mongo_db, documents)

    chart = minute_buckets(mongo_db, None, longest=1440, run="long", earlier=False)
    everything = minute_buckets(mongo_db, None, longest=1440, run="long")

    assert len(chart) == 1440 and chart[-1].minute == last and chart[-1].counts["success"] == 1
    assert sum(bucket.counts["success"] for bucket in chart) == 1  # the day before is one minute too far
    assert sum(bucket.counts["success"] for bucket in everything) == 30  # the JSON keeps every one


def test_the_chart_of_a_short_run_starts_at_its_first_outcome(mongo_db):
    from image_crawler import outcomes, storage
    from image_crawler.outcomes import Job

    storage.ensure_indexes(mongo_db)
    first = storage.this_minute() - dt.timedelta(hours=3)
    documents = [
        outcomes.outcome_document(
            Job.new("short", n, "http://x.test/a"), "success", at=first + dt.timedelta(minutes=n)
        )
        for n in (0, 10)
    ]
    outcomes.record_outcomes(mongo_db, documents)

    chart = minute_buckets(mongo_db, None, longest=1440, run="short", earlier=False)

    assert [bucket.minute for bucket in (chart[0], chart[-1])] == [first, first + dt.timedelta(minutes=10)]
    assert len(chart) == 11
