"""GET /: totals, the embedded histogram, the latest errors and the gallery."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from image_crawler import storage
from support.pages import HOSTILE_REASON, HOSTILE_URL, Elements


def test_empty_database_shows_an_empty_dashboard(client):
    response = client.get("/")

    assert response.status_code == 200 and response.mimetype == "text/html"
    assert "No outcomes yet" in response.text
    assert "No images yet" in response.text and "No errors." in response.text


def test_totals_count_every_outcome(client, seed):
    seed.outcome("success", count=1234)
    seed.outcome("duplicate", minutes_ago=4, count=5)
    seed.outcome("error", minutes_ago=200, reason="timeout", count=7)

    page = client.get("/").text

    totals = dict(re.findall(r'<span class="count">([\d,]+)</span> (\w+)', page))
    assert totals == {"1,234": "success", "5": "duplicate", "7": "error", "1,246": "urls"}


def test_histogram_is_embedded_for_the_chosen_window(client, seed):
    seed.outcome("success")

    page = Elements(client.get("/?minutes=180").text)

    charts = [img["src"] for img in page.all("img") if (img["src"] or "").startswith("/monitoring?")]
    assert len(charts) == 1 and "minutes=180" in charts[0]
    assert client.get(charts[0]).mimetype == "image/svg+xml"


def test_latest_errors_show_url_and_reason_escaped(client, seed):
    seed.outcome("error", url=HOSTILE_URL, reason=HOSTILE_REASON)
    seed.outcome("error", minutes_ago=1, url="http://ok.test/missing.png", reason="http 404")

    response = client.get("/")

    page = response.text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;url&#34;)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(&#39;reason&#39;)&lt;/script&gt;" in page
    assert "http://ok.test/missing.png" in page and "http 404" in page
    assert page.index(HOSTILE_URL[:15]) < page.index("http://ok.test/missing.png")  # newest first
    elements = Elements(page)
    assert not [attrs for _, attrs in elements.tags if "onmouseover" in attrs or "onerror" in attrs]
    scripts = elements.all("script")
    assert [s["src"] for s in scripts] == ["/static/dashboard.js"]


def test_gallery_links_each_image_and_shows_its_hostile_source_escaped(client, seed):
    md5 = seed.image(1, url=HOSTILE_URL)

    page = client.get("/").text

    links = [a["href"] for a in Elements(page).all("a")]
    assert f"/image/{md5}" in links and f"/image/{md5}.json" in links
    assert f'src="/image/{md5}"' in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page


def test_gallery_is_paginated_newest_first(app, client, seed, mongo_db):
    app.config["GALLERY_PAGE_SIZE"] = 4
    md5s = [seed.image(n) for n in range(10)]
    start = dt.datetime(2026, 11, 27, 21, 0, tzinfo=dt.UTC)
    for n, md5 in enumerate(md5s):  # one second apart, so md5s[-1] is the newest
        storage.images(mongo_db).update_one(
            {"_id": md5}, {"$set": {"inserted_at": start + n * dt.timedelta(seconds=1)}}
        )

    def gallery(page: int) -> list[str]:
        html = client.get(f"/?page={page}").text
        return re.findall(r'<img src="/image/([0-9a-f]{32})"', html)

    first, second, third = gallery(1), gallery(2), gallery(3)
    assert (first, second, third) == (md5s[9:5:-1], md5s[5:1:-1], md5s[1::-1])
    assert "page 1 of 3" in client.get("/").text
    assert 'rel="next"' in client.get("/?page=1").text and 'rel="prev"' not in client.get("/?page=1").text
    assert "No images on page 4" in client.get("/?page=4").text


@pytest.mark.parametrize("query", ["page=0", "page=-1", "page=x", "page=100001", "minutes=0", "minutes=all"])
def test_bad_query_is_400_html(client, query):
    response = client.get(f"/?{query}")

    assert response.status_code == 400 and response.mimetype == "text/html"
    assert "must be a whole number" in response.text


def test_refreshes_fast_while_outcomes_are_coming_in(client, seed):
    seed.outcome("success", minutes_ago=1)

    page = client.get("/").text

    main = Elements(page).all("main")[0]
    assert main["data-refresh-seconds"] == "5"
    assert '<meta http-equiv="refresh" content="5">' in page  # inside <noscript>, for browsers without JS
    assert "live" in page


def test_refreshes_slowly_when_idle(client, seed):
    seed.outcome("success", minutes_ago=30)

    page = client.get("/").text

    assert Elements(page).all("main")[0]["data-refresh-seconds"] == "30"
    assert 'http-equiv="refresh"' not in page and "Idle" in page


def test_an_outcome_from_a_clock_far_ahead_does_not_keep_the_page_live(client, seed):
    seed.outcome("success", minutes_ago=30)
    seed.outcome("success", minutes_ago=-30 * 24 * 60)  # a worker whose clock runs a month ahead

    page = client.get("/").text

    assert Elements(page).all("main")[0]["data-refresh-seconds"] == "30"
    assert 'http-equiv="refresh"' not in page and "Idle" in page
    assert '<span class="count">2</span> urls' in page


def test_outcomes_all_dated_ahead_are_not_called_none(client, seed):
    seed.outcome("error", minutes_ago=-600, reason="timeout")

    page = client.get("/").text

    assert "No outcomes yet" not in page and "Idle" in page and "ahead" in page


def test_version_changes_with_new_outcomes(client, seed):
    before = Elements(client.get("/").text).all("main")[0]["data-version"]
    seed.outcome("error", reason="timeout")
    after = Elements(client.get("/").text).all("main")[0]["data-version"]

    assert before != after


def test_credentials_stored_by_an_earlier_version_are_never_shown(client, seed, mongo_db):
    md5 = seed.image(2)
    seed.outcome("error", reason="http 404")
    # As versions before the redaction wrote them: the URL as it was in the list.
    storage.images(mongo_db).update_one(
        {"_id": md5}, {"$set": {"source_url": "http://bob:hunter2@old.test/a.png"}}
    )
    storage.ledger(mongo_db).update_many({}, {"$set": {"url": "http://bob:hunter2@old.test/b.png"}})

    page = client.get("/").text
    details = client.get(f"/image/{md5}.json").get_json()

    assert "hunter2" not in page and "bob" not in page
    assert "http://***@old.test/a.png" in page and "http://***@old.test/b.png" in page
    assert details["source_url"] == "http://***@old.test/a.png"


def test_totals_include_outcomes_a_crash_left_uncounted_once_their_minute_has_settled(client, seed, mongo_db):
    from image_crawler import outcomes
    from image_crawler.outcomes import Job

    seed.outcome("success", minutes_ago=45, count=3)
    at = seed.now - dt.timedelta(minutes=45)
    lost = [outcomes.outcome_document(Job.new("lost", n, "http://x.test/"), "error", at=at) for n in (1, 2)]
    storage.ledger(mongo_db).insert_many(lost)  # its worker died before counting them

    page = client.get("/").text

    totals = dict(re.findall(r'<span class="count">([\d,]+)</span> (\w+)', page))
    assert totals == {"3": "success", "0": "duplicate", "2": "error", "5": "urls"}
