"""The dashboard blueprint: totals, runs, the histogram, top and latest errors, a gallery, kept current."""

from __future__ import annotations

import datetime as dt
import math

from flask import Blueprint, current_app, render_template, url_for

from image_crawler import outcomes, storage
from image_crawler.storage import as_utc

from .db import get_db, settle_counters
from .monitoring import requested_minutes
from .params import whole_number

bp = Blueprint("dashboard", __name__)

#: Minute windows offered next to the histogram.
WINDOWS = {"1 h": 60, "3 h": 180, "12 h": 720, "24 h": 1440}


@bp.app_template_filter("utc")
def utc(moment: dt.datetime | None) -> str:
    """``2026-11-27 21:05:03`` (UTC) for a datetime, ``—`` for none."""
    return "—" if moment is None else f"{as_utc(moment):%Y-%m-%d %H:%M:%S}"


@bp.get("/")
def index() -> str:
    """The dashboard; it refreshes itself quickly while outcomes keep coming, slowly otherwise."""
    config = current_app.config
    minutes = requested_minutes(allow_all=False)
    assert minutes is not None  # "all" is not offered here
    page = whole_number("page", default=1, highest=int(config["MAX_PAGE"]))
    db = get_db()

    settle_counters(db)  # totals come from the counters: a crashed writer's outcomes count within minutes
    totals = outcomes.counted_totals(db)
    # Up to the next minute, like the chart: an outcome from a worker whose clock runs far ahead
    # would otherwise keep the page "live" (and refreshing every few seconds) until that date.
    now = storage.this_minute()
    latest = outcomes.latest_minute(db, until=now + dt.timedelta(minutes=1))
    live = latest is not None and now - latest <= dt.timedelta(minutes=config["LIVE_MINUTES"])
    page_size = int(config["GALLERY_PAGE_SIZE"])
    image_count = storage.count_images(db)
    shown_runs = int(config["DASHBOARD_RUNS"])
    running = outcomes.unfinished_runs(db)
    # With no run going, the latest few: what just ended stays in view.
    runs = running[:shown_runs] if running else outcomes.recent_runs(db, 3)
    # Changes whenever an outcome, an image or a line sent is added: the page script swaps content only then.
    sent = sum(summary.jobs for summary in running)
    states = "".join(summary.state[0] for summary in running)  # a run turning stalled changes the page
    version = f"{sum(totals.values())}.{image_count}.{sent}.{states}"
    return render_template(
        "dashboard/index.html",
        totals=totals,
        total=sum(totals.values()),
        latest=latest,
        live=live,
        refresh_seconds=config["REFRESH_SECONDS"] if live else config["IDLE_REFRESH_SECONDS"],
        version=version,
        minutes=minutes,
        windows=WINDOWS,
        chart_url=url_for("monitoring.histogram", minutes=minutes, v=version),
        runs=runs,
        runs_going=len(running),
        more_runs=max(0, len(running) - shown_runs),
        reasons=outcomes.top_error_reasons(
            db, since=now - dt.timedelta(minutes=minutes - 1), limit=int(config["TOP_REASONS"])
        ),
        errors=outcomes.latest_errors(db, int(config["RECENT_ERRORS"])),
        images=storage.latest_images(db, skip=(page - 1) * page_size, limit=page_size),
        image_count=image_count,
        page=page,
        pages=max(1, math.ceil(image_count / page_size)),
    )
