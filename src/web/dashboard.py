"""The dashboard blueprint: totals, the histogram, the latest errors and a gallery, kept current."""

from __future__ import annotations

import datetime as dt
import math

from flask import Blueprint, current_app, render_template, url_for

from .db import (
    as_utc,
    count_images,
    get_db,
    latest_errors,
    latest_images,
    latest_minute,
    outcome_totals,
    settle_counters,
)
from .monitoring import requested_minutes, this_minute
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
    page = whole_number("page", default=1, highest=int(config["MAX_PAGE"]))
    db = get_db()

    settle_counters(db)  # totals come from the counters: a crashed writer's outcomes count within minutes
    totals = outcome_totals(db)
    # Up to the next minute, like the chart: an outcome from a worker whose clock runs far ahead
    # would otherwise keep the page "live" (and refreshing every few seconds) until that date.
    now = this_minute()
    latest = latest_minute(db, until=now + dt.timedelta(minutes=1))
    live = latest is not None and now - latest <= dt.timedelta(minutes=config["LIVE_MINUTES"])
    page_size = int(config["GALLERY_PAGE_SIZE"])
    image_count = count_images(db)
    # Changes whenever an outcome or an image is added: the page script swaps content only then.
    version = f"{sum(totals.values())}.{image_count}"
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
        errors=latest_errors(db, int(config["RECENT_ERRORS"])),
        images=latest_images(db, skip=(page - 1) * page_size, limit=page_size),
        image_count=image_count,
        page=page,
        pages=max(1, math.ceil(image_count / page_size)),
    )
