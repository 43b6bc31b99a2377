"""The runs blueprint: every ``enqueue`` run, one page per run, and its failed URLs as a URL list."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterator

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from werkzeug.exceptions import BadRequest

from image_crawler import outcomes
from image_crawler.redaction import redact_url

from .db import get_db, settle_counters
from .params import whole_number

bp = Blueprint("runs", __name__)

#: Run ids ``enqueue`` makes match ``outcomes.RUN_ID_PATTERN``; the pages still serve the runs an
#: earlier version was given other (printable) ids for, up to this long.
_LONGEST_LEGACY_ID = 100
#: The longest ``?reason=`` text a failed-URL list is filtered by.
_LONGEST_REASON = 200


@bp.app_template_filter("duration")
def duration(span: dt.timedelta | None) -> str:
    """A rough, short duration: ``40 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``; ``—`` for none."""
    if span is None:
        return "—"
    seconds = max(0, round(span.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@bp.get("/runs")
def index() -> str:
    """Every run, newest first, a page at a time."""
    page_size = int(current_app.config["RUNS_PAGE_SIZE"])
    page = whole_number("page", default=1, highest=int(current_app.config["MAX_PAGE"]))
    db = get_db()
    settle_counters(db)
    count = outcomes.count_runs(db)
    return render_template(
        "runs/index.html",
        runs=outcomes.recent_runs(db, page_size, skip=(page - 1) * page_size),
        count=count,
        page=page,
        pages=max(1, math.ceil(count / page_size)),
    )


def _known(run: str) -> outcomes.RunSummary | None:
    """The run's summary; None for a run enqueued before runs were recorded; a 404 if there is no such run."""
    if len(run) > _LONGEST_LEGACY_ID or not run.isprintable():
        abort(404, description="A run id is 1 to 64 letters, digits, '_', '.' or '-'.")
    try:
        return outcomes.known_run(get_db(), run)
    except outcomes.UnknownRun:
        abort(404, description=f"There is no run {run!r}.")


@bp.get("/runs/<run>")
def show(run: str) -> str:
    """One run: where it stands, its outcomes per minute, its top error reasons and first errors."""
    db = get_db()
    settle_counters(db)
    summary = _known(run)
    counts = outcomes.run_counts(db, run, summary)
    shown = int(current_app.config["RECENT_ERRORS"])
    errors = list(itertools.islice(outcomes.failed_outcomes(db, run, page=shown + 1), shown + 1))
    for error in errors:  # stored without credentials; this also covers what an earlier version kept
        error["url"] = redact_url(str(error.get("url", "")))
    done = sum(counts.values())
    # Outcomes may still come in (an interrupted run's lines too); a stalled run is quiet.
    live = summary is not None and not summary.finished and summary.state != "stalled"
    return render_template(
        "runs/show.html",
        run=run,
        summary=summary,
        counts=counts,
        done=done,
        live=live,
        refresh_seconds=current_app.config["REFRESH_SECONDS" if live else "IDLE_REFRESH_SECONDS"],
        version=f"{done}.{summary.jobs if summary else 0}.{summary.state if summary else ''}",
        chart_url=url_for("monitoring.histogram", run=run, minutes="all", v=done),
        reasons=outcomes.top_error_reasons(db, run=run, limit=int(current_app.config["TOP_REASONS"])),
        errors=errors[:shown],
        more_errors=len(errors) > shown,
        retries=outcomes.retries_of(db, run),
    )


@bp.get("/runs/<run>/failed.txt")
def failed(run: str) -> Response:
    """The run's failed URLs, one per line in line order: a URL list to enqueue again.

    What ``image-crawler failed RUN`` prints: errors that cannot be retried from what the ledger
    keeps are ``#`` comments, and so are the last lines saying how many were left out, and why,
    and, for a run not finished, how many lines may still fail. The very last line is
    ``# end: N failed lines``: a download cut short (MongoDB failing mid-way) lacks it.
    ``?reason=TEXT`` (repeatable) keeps the errors whose reason contains TEXT, ignoring case.
    """
    reasons = [reason for reason in request.args.getlist("reason") if reason]
    if any(len(reason) > _LONGEST_REASON or not reason.isprintable() for reason in reasons):
        raise BadRequest(f"reason must be at most {_LONGEST_REASON} printable characters.")
    db = get_db()
    settle_counters(db)
    summary = _known(run)
    failures = outcomes.FailedLines(db, run, reasons)

    def body() -> Iterator[str]:
        for line, _ in failures.lines():
            yield line + "\n"
        for note in (failures.left_out_note(), summary and summary.not_finished_note()):
            if note:
                yield f"# {note}\n"
        yield f"# end: {failures.listed} failed lines\n"

    response = Response(stream_with_context(body()), mimetype="text/plain")
    # A run id enqueue made is safe in a file name; one an earlier version was given may not be.
    name = f"failed-{run}.txt" if outcomes.RUN_ID_PATTERN.fullmatch(run) else "failed.txt"
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    response.cache_control.no_cache = True
    return response
