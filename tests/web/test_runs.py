"""The runs on the dashboard, /runs, a page per run, and a run's failed URLs as a URL list."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from image_crawler import outcomes, storage
from image_crawler.outcomes import Job
from support.pages import HOSTILE_REASON, HOSTILE_URL, Elements


def _run(db, run: str, *, lines: int, sent: bool = True, retry_of: str | None = None) -> None:
    outcomes.start_run(db, run, retry_of=retry_of)
    outcomes.run_progress(db, run, enqueued=lines, rejected=0, skipped=0, sent=sent)


def _ended(
    db, run: str, lines: range, outcome: str, *, reason: str | None = None, url: str | None = None
) -> None:
    documents = [
        outcomes.outcome_document(
            Job.new(run, n, url or f"http://images.test/{run}/{n}.png"), outcome, reason=reason
        )
        for n in lines
    ]
    outcomes.record_outcomes(db, documents)


def _rows(html: str) -> dict[str, str]:
    """The runs table: each run id and its row's text, tags stripped."""
    rows = re.findall(r'<tr class="\w+">(.*?)</tr>', html, re.S)
    found = {}
    for row in rows:
        run = re.search(r'<a href="/runs/([^"]+)">', row)
        if run:
            found[run.group(1)] = " ".join(re.sub(r"<[^>]+>", " ", row).split())
    return found


def test_the_dashboard_shows_runs_going_with_progress_pace_and_time_left(client, mongo_db):
    _run(mongo_db, "going", lines=100)
    _ended(mongo_db, "going", range(1, 31), "success")
    _ended(mongo_db, "going", range(31, 41), "error", reason="http 404")
    _run(mongo_db, "over", lines=2)
    _ended(mongo_db, "over", range(1, 3), "success")

    page = client.get("/").text

    rows = _rows(page)
    assert list(rows) == ["going"]  # a finished run is not among the runs going
    assert "running" in rows["going"] and "40 of 100" in rows["going"]
    cells = dict(re.findall(r'<td class="num (success|duplicate|error)">([\d,]+)</td>', page))
    assert cells == {"success": "30", "duplicate": "0", "error": "10"}
    # 40 outcomes in the run's first minute: 40 a minute, 60 lines to go.
    assert "40.0" in rows["going"] and "~2 min" in rows["going"]
    bars = Elements(page).all("progress")
    assert bars == [{"max": "100", "value": "40", "aria-label": "40 of 100 lines have their outcome"}]


def test_with_no_run_going_the_dashboard_shows_the_latest_runs(client, mongo_db):
    for n in range(5):
        _run(mongo_db, f"run{n}", lines=1)
        _ended(mongo_db, f"run{n}", range(1, 2), "success")
        storage.runs(mongo_db).update_one(
            {"_id": f"run{n}"}, {"$set": {"started_at": storage.utcnow() - dt.timedelta(minutes=10 - n)}}
        )

    page = client.get("/").text

    assert "Latest runs" in page
    assert list(_rows(page)) == ["run4", "run3", "run2"]
    assert "done" in _rows(page)["run4"]


def test_the_dashboard_shows_top_error_reasons_for_the_window(client, seed):
    seed.outcome("error", reason="http 404", count=3)
    seed.outcome("error", reason="timeout", minutes_ago=30, count=2)
    seed.outcome("error", reason="not an image", minutes_ago=200, count=9)

    def reasons(query: str) -> list[tuple[str, str]]:
        section = client.get(f"/{query}").text.split('<section class="reasons">')[1].split("</section>")[0]
        return re.findall(r'<td class="num">([\d,]+)</td><td class="reason">([^<]*)</td>', section)

    assert reasons("?minutes=60") == [("3", "http 404"), ("2", "timeout")]
    assert reasons("?minutes=720") == [("9", "not an image"), ("3", "http 404"), ("2", "timeout")]


def test_a_run_page_shows_its_totals_chart_reasons_errors_and_the_failed_list(client, mongo_db):
    _run(mongo_db, "abc123", lines=10)
    _ended(mongo_db, "abc123", range(1, 6), "success")
    _ended(mongo_db, "abc123", range(6, 8), "duplicate")
    _ended(mongo_db, "abc123", range(8, 10), "error", reason="http 404")
    _run(mongo_db, "other", lines=3)
    _ended(mongo_db, "other", range(1, 4), "error", reason="timeout")

    response = client.get("/runs/abc123")

    assert response.status_code == 200
    page = response.text
    assert re.findall(r'<span class="count">([\d,]+)</span> (\w+)', page) == [
        ("5", "success"),
        ("2", "duplicate"),
        ("2", "error"),
        ("9", "urls"),
    ]
    assert '<span class="badge running">running</span>' in page
    elements = Elements(page)
    charts = [img["src"] for img in elements.all("img") if (img["src"] or "").startswith("/monitoring?")]
    assert len(charts) == 1 and "run=abc123" in charts[0] and "minutes=all" in charts[0]
    assert client.get(charts[0]).mimetype == "image/svg+xml"
    assert '<td class="num">2</td><td class="reason">http 404</td>' in page
    assert "timeout" not in page  # another run's errors
    assert [a["href"] for a in elements.all("a") if "failed.txt" in (a["href"] or "")] == [
        "/runs/abc123/failed.txt"
    ]
    assert "http://images.test/abc123/8.png" in page and "http://images.test/abc123/9.png" in page


def test_a_run_page_says_where_the_run_stands(client, mongo_db):
    _run(mongo_db, "abc123", lines=10, retry_of="base")
    _run(mongo_db, "base", lines=1)
    _run(mongo_db, "later", lines=1, retry_of="abc123")
    _ended(mongo_db, "abc123", range(1, 5), "success")

    page = " ".join(re.sub(r"<[^>]+>", " ", client.get("/runs/abc123").text).split())

    assert "in flight 6 lines" in page
    assert "retries base" in page and "retried by later" in page
    assert "about 2 min at this pace" in page


def test_the_failed_list_of_a_run_not_finished_says_so_last(client, mongo_db):
    _run(mongo_db, "abc123", lines=5)
    _ended(mongo_db, "abc123", range(1, 3), "error", reason="http 404")

    lines = client.get("/runs/abc123/failed.txt").text.splitlines()

    assert lines == [
        "http://images.test/abc123/1.png",
        "http://images.test/abc123/2.png",
        "# run abc123 is not finished: 3 lines in flight may still fail",
        "# end: 2 failed lines",
    ]


def test_an_unknown_run_is_404(client):
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/runs/nope/failed.txt").status_code == 404
    assert client.get("/runs/" + "x" * 500).status_code == 404


def test_a_run_from_before_runs_were_recorded_has_a_page_from_its_outcomes(client, seed):
    seed.outcome("success", count=2)
    seed.outcome("error", reason="http 500", count=1)

    page = client.get("/runs/seed").text

    assert "did not record runs" in page
    assert re.findall(r'<span class="count">([\d,]+)</span> (\w+)', page)[-1] == ("3", "urls")


def test_the_failed_list_is_a_url_list_of_the_runs_errors_in_line_order(client, mongo_db):
    _run(mongo_db, "abc123", lines=6)
    _ended(mongo_db, "abc123", range(4, 6), "error", reason="http 404")
    _ended(mongo_db, "abc123", range(1, 3), "error", reason="timeout")
    _ended(mongo_db, "abc123", range(3, 4), "success")
    _ended(
        mongo_db, "abc123", range(6, 7), "error", reason="http 500", url="http://user:pw@images.test/6.png"
    )

    response = client.get("/runs/abc123/failed.txt")

    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert response.headers["Content-Disposition"] == 'attachment; filename="failed-abc123.txt"'
    assert response.text.splitlines() == [
        "http://images.test/abc123/1.png",
        "http://images.test/abc123/2.png",
        "http://images.test/abc123/4.png",
        "http://images.test/abc123/5.png",
        "# line 6, http 500: credentials redacted in the ledger: http://***@images.test/6.png",
        "# left out 1 of 5 failed lines, as # comments: 1 credentials redacted in the ledger",
        "# end: 5 failed lines",  # a download cut short lacks it
    ]
    only = client.get("/runs/abc123/failed.txt?reason=404&reason=TIMEOUT").text.splitlines()
    assert only == [*(f"http://images.test/abc123/{n}.png" for n in (1, 2, 4, 5)), "# end: 4 failed lines"]
    assert client.get("/runs/abc123/failed.txt?reason=a%00b").status_code == 400


def test_a_hostile_run_page_is_escaped(client, mongo_db):
    _run(mongo_db, "abc123", lines=2)
    _ended(mongo_db, "abc123", range(1, 3), "error", reason=HOSTILE_REASON, url=HOSTILE_URL)

    page = client.get("/runs/abc123").text

    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;reason&#39;)&lt;/script&gt;" in page
    assert (
        "http://evil.test/&lt;script&gt;alert(&#34;url&#34;)&lt;/script&gt;&#34;onmouseover=&#34;alert(1)"
        in page
    )


def test_the_runs_page_lists_every_run_a_page_at_a_time(app, client, mongo_db):
    app.config["RUNS_PAGE_SIZE"] = 2
    for n in range(5):
        _run(mongo_db, f"run{n}", lines=1)
        storage.runs(mongo_db).update_one(
            {"_id": f"run{n}"}, {"$set": {"started_at": storage.utcnow() - dt.timedelta(minutes=10 - n)}}
        )

    first, third = client.get("/runs").text, client.get("/runs?page=3").text

    assert list(_rows(first)) == ["run4", "run3"] and "page 1 of 3" in first and "5 in all" in first
    assert list(_rows(third)) == ["run0"]
    assert client.get("/runs?page=0").status_code == 400


@pytest.mark.parametrize("query", ["run=" + "x" * 101, "run=a%0Ab"])
def test_a_bad_run_in_the_chart_query_is_400(client, query):
    assert client.get(f"/monitoring.json?{query}").status_code == 400


def test_the_chart_of_a_run_counts_its_outcomes_only_over_its_own_minutes(client, seed, mongo_db):
    seed.outcome("success", minutes_ago=100, count=4)
    _run(mongo_db, "abc123", lines=3)
    at = seed.now - dt.timedelta(minutes=300) + dt.timedelta(seconds=10)
    docs = [
        outcomes.outcome_document(Job.new("abc123", n, "http://x.test/a"), "error", reason="x", at=at)
        for n in (1, 2)
    ]
    docs += [
        outcomes.outcome_document(
            Job.new("abc123", 3, "http://x.test/b"), "success", at=at + dt.timedelta(minutes=2)
        )
    ]
    outcomes.record_outcomes(mongo_db, docs)

    buckets = client.get("/monitoring.json?run=abc123&minutes=all").json["buckets"]

    assert [(b["success"], b["duplicate"], b["error"]) for b in buckets] == [(0, 0, 2), (0, 0, 0), (1, 0, 0)]
    window = client.get("/monitoring.json?run=abc123&minutes=60").json["buckets"]
    assert len(window) == 60 and not any(b["success"] + b["error"] for b in window)
    assert client.get("/monitoring?run=abc123&minutes=all").mimetype == "image/svg+xml"
    assert client.get("/monitoring?minutes=all").status_code == 400  # every run: a window only


def test_a_run_an_earlier_version_gave_another_id_still_has_its_pages(client, seed, mongo_db):
    docs = [
        outcomes.outcome_document(Job.new("legacy run", 1, "http://x.test/a.png"), "error", reason="http 404")
    ]
    outcomes.record_outcomes(mongo_db, docs)

    assert client.get("/runs/legacy run").status_code == 200
    listed = client.get("/runs/legacy run/failed.txt")
    assert (
        listed.status_code == 200
        and listed.headers["Content-Disposition"] == 'attachment; filename="failed.txt"'
    )
    assert listed.text.splitlines()[0] == "http://x.test/a.png"
    assert client.get("/monitoring.json?run=legacy run&minutes=all").json["buckets"][0]["error"] == 1
