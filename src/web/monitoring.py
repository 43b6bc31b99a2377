"""The monitoring blueprint: outcomes per UTC minute, as a pygal SVG and as JSON."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request
from pymongo.database import Database

from image_crawler import storage
from image_crawler.outcomes import OUTCOMES

from . import charts
from .db import count_by_minute, get_db
from .params import whole_number

bp = Blueprint("monitoring", __name__)

_MINUTE = dt.timedelta(minutes=1)

#: The chart has an inline stylesheet and no script; opened on its own it needs nothing else.
_SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"


@dataclass(frozen=True)
class Bucket:
    """How many jobs ended in each outcome during one UTC minute."""

    minute: dt.datetime
    counts: dict[str, int]

    def to_json(self) -> dict[str, str | int]:
        """``{"minute": "2026-11-27T21:05:00Z", "success": n, "duplicate": n, "error": n}``."""
        return {"minute": self.minute.strftime("%Y-%m-%dT%H:%M:%SZ"), **self.counts}


def this_minute() -> dt.datetime:
    """The current UTC minute."""
    return storage.utcnow().replace(second=0, microsecond=0)


def minute_buckets(db: Database, minutes: int | None, now: dt.datetime | None = None) -> list[Bucket]:
    """One bucket per UTC minute, oldest first, empty minutes included.

    The window is the ``minutes`` minutes ending with the current one, or with ``None`` every
    minute from the first outcome on. It is stretched to the newest outcome should a worker's
    clock run ahead of ours, so that no recorded outcome is left out.
    """
    now = (now or this_minute()).replace(second=0, microsecond=0)
    since = None if minutes is None else now - (minutes - 1) * _MINUTE
    counts = count_by_minute(db, since)
    if since is None:
        if not counts:
            return []
        since = min(counts)
    until = max(now, *counts) if counts else now
    buckets = []
    minute = since
    while minute <= until:
        buckets.append(Bucket(minute, counts.get(minute, dict.fromkeys(OUTCOMES, 0))))
        minute += _MINUTE
    return buckets


def requested_minutes(*, allow_all: bool) -> int | None:
    """The window in ``?minutes=`` (default ``DEFAULT_MINUTES``, at most ``MAX_MINUTES``).

    ``all`` (answered with None: every minute) is accepted where ``allow_all``.
    """
    if allow_all and request.args.get("minutes") == "all":
        return None
    return whole_number(
        "minutes",
        default=int(current_app.config["DEFAULT_MINUTES"]),
        highest=int(current_app.config["MAX_MINUTES"]),
        or_word="all" if allow_all else None,
    )


@bp.get("/monitoring")
def histogram() -> Response:
    """The StackedBar chart of success, duplicate and error per minute (``image/svg+xml``)."""
    buckets = minute_buckets(get_db(), requested_minutes(allow_all=False))
    svg = charts.outcomes_per_minute_svg(
        [bucket.minute for bucket in buckets],
        {name: [bucket.counts[name] for bucket in buckets] for name in OUTCOMES},
    )
    response = Response(svg, mimetype="image/svg+xml")
    response.headers["Content-Security-Policy"] = _SVG_CSP
    # It changes with the data and the clock: a browser asks again on every view.
    response.cache_control.no_cache = True
    return response


@bp.get("/monitoring.json")
def histogram_json() -> Response:
    """The same buckets as JSON: ``{"buckets": [{"minute": …, "success": n, …}, …]}``."""
    buckets = minute_buckets(get_db(), requested_minutes(allow_all=True))
    response = jsonify({"buckets": [bucket.to_json() for bucket in buckets]})
    response.cache_control.no_cache = True
    return response
