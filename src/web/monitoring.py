"""The monitoring blueprint: outcomes per UTC minute, as a pygal SVG and as JSON."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request
from pymongo.database import Database
from werkzeug.exceptions import BadRequest

from image_crawler import outcomes, storage
from image_crawler.outcomes import OUTCOMES

from . import charts
from .db import get_db, settle_counters
from .params import whole_number

bp = Blueprint("monitoring", __name__)

_MINUTE = dt.timedelta(minutes=1)

#: Default of the app's ``MAX_MINUTES`` (the longest ``?minutes=N``) and of how far back
#: ``?minutes=all`` lists every minute: a day.
LONGEST_WINDOW = 1440

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


def minute_buckets(
    db: Database,
    minutes: int | None,
    now: dt.datetime | None = None,
    *,
    longest: int = LONGEST_WINDOW,
    run: str | None = None,
    earlier: bool = True,
) -> list[Bucket]:
    """Buckets of UTC minutes, oldest first: every outcome from the window's first minute on is in one.

    The counts come from the per-minute counters (:func:`image_crawler.outcomes.counts_per_minute`), never the
    ledger: what a request costs follows the minutes it shows.

    The window is the ``minutes`` minutes ending with the current one, empty minutes included.
    Outcomes dated after it (a worker whose clock runs ahead of ours) are not left out, nor do
    they stretch the window: they add one bucket, the next minute, which counts every one of
    them however far ahead they are. So totals stay true, and a clock a year ahead costs one
    bucket, not 525,600.

    With ``None`` (every outcome) the buckets start at the first outcome and run without holes
    over at most the ``longest`` minutes ending with the current one; before those, only the
    minutes that had outcomes are listed. The answer then grows with the minutes a crawl was
    busy, never with the time since its first outcome.

    Without ``earlier``, the minutes before those ``longest`` are neither read nor listed (a
    chart of a month-long crawl stays a day wide).

    With ``run``, only that run's outcomes count; with ``None`` as well, the buckets end with
    the run's last outcome (a run that ended yesterday is not followed by a day of empty minutes).
    """
    now = storage.minute_of(now or storage.utcnow())
    since = None if minutes is None else now - (minutes - 1) * _MINUTE
    first = None
    if since is None and run is not None:
        last = outcomes.last_counted_minute(db, run)
        if last is None:
            return []
        now = min(now, last)
        first = outcomes.last_counted_minute(db, run, first=True)
    if since is None and not earlier:
        # From the first outcome (the run's, if known; else the first in the window) on.
        since = max(first or now - (longest - 1) * _MINUTE, now - (longest - 1) * _MINUTE)
    counts = _fold_later_minutes(outcomes.counts_per_minute(db, since, run=run), now + _MINUTE)
    if since is None:
        if not counts:
            return []
        since = max(min(counts), now - (longest - 1) * _MINUTE)
    elif minutes is None and first is None:
        since = max(min(counts, default=since), since)
    until = now + _MINUTE if now + _MINUTE in counts else now
    buckets = [Bucket(minute, counts[minute]) for minute in sorted(counts) if minute < since]
    minute = since
    while minute <= until:
        buckets.append(Bucket(minute, counts.get(minute, dict.fromkeys(OUTCOMES, 0))))
        minute += _MINUTE
    return buckets


def _fold_later_minutes(
    counts: dict[dt.datetime, dict[str, int]], last: dt.datetime
) -> dict[dt.datetime, dict[str, int]]:
    """``counts`` with the counts of every minute after ``last`` added to those of ``last``."""
    later = [minute for minute in counts if minute > last]
    if not later:
        return counts
    folded = counts.setdefault(last, dict.fromkeys(OUTCOMES, 0))
    for minute in later:
        for name, count in counts.pop(minute).items():
            folded[name] += count
    return counts


def requested_run() -> str | None:
    """The run in ``?run=`` (None: every run); a 400 if it cannot be a run id."""
    run = request.args.get("run")
    if run is None or run == "":
        return None
    # As the run pages: an id enqueue makes, or a printable one an earlier version was given.
    if not outcomes.RUN_ID_PATTERN.fullmatch(run) and (len(run) > 100 or not run.isprintable()):
        raise BadRequest("run must be a run id: 1 to 64 letters, digits, '_', '.' or '-'.")
    return run


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
    """The StackedBar chart of success, duplicate and error per minute (``image/svg+xml``).

    ``?run=`` draws one run's outcomes only; ``?minutes=all`` is then taken too: the run's
    minutes, its last ``MAX_MINUTES`` at most (up to its last outcome).
    """
    run = requested_run()
    minutes = requested_minutes(allow_all=run is not None)
    settle_counters(get_db())
    # A bar per minute of at most MAX_MINUTES: a month-long run's chart shows its last day.
    longest = int(current_app.config["MAX_MINUTES"])
    buckets = minute_buckets(get_db(), minutes, longest=longest, run=run, earlier=False)
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
    """The same buckets as JSON: ``{"buckets": [{"minute": …, "success": n, …}, …]}``.

    ``?minutes=all``: every minute of the last ``MAX_MINUTES``, before that only the minutes
    that had outcomes (buckets may be hours apart); a last bucket dated the next minute holds
    every outcome dated ahead of this server's clock. ``?run=`` counts one run's outcomes only.
    """
    run = requested_run()
    minutes = requested_minutes(allow_all=True)
    settle_counters(get_db())
    buckets = minute_buckets(get_db(), minutes, longest=int(current_app.config["MAX_MINUTES"]), run=run)
    response = jsonify({"buckets": [bucket.to_json() for bucket in buckets]})
    response.cache_control.no_cache = True
    return response
