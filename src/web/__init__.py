"""The web app: look at the stored images and watch the crawl.

Run it with ``flask --app web run`` or ``gunicorn 'web:create_app()'``; it reads ``MONGO_URI``
and ``REDIS_URL`` from the environment, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider

from image_crawler.config import get_settings
from image_crawler.redaction import install_log_redaction

from . import auth, dashboard, db, errors, health, images, metrics, monitoring, runs

#: Pages and JSON load nothing from elsewhere and run only our own script files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


#: The app's own config keys and their defaults (``create_app``'s ``test_config`` overrides any).
DEFAULT_CONFIG: Mapping[str, Any] = {
    # A ready ``Database`` object to use instead of ``MONGO_URI`` (tests, embedding).
    "MONGO_DATABASE": None,
    # Seconds to wait for MongoDB or Redis before a page or /healthz gives up.
    "SERVICE_TIMEOUT": 3.0,
    # The histogram's default window (?minutes=), its longest, and how far ?minutes=all lists
    # every minute.
    "DEFAULT_MINUTES": 60,
    "MAX_MINUTES": monitoring.LONGEST_WINDOW,
    # Images per gallery page, and the highest ?page= of any list.
    "GALLERY_PAGE_SIZE": 24,
    "MAX_PAGE": 100_000,
    # Latest errors listed (on the dashboard; a run page lists its first ones).
    "RECENT_ERRORS": 15,
    # Error reasons listed, most frequent first.
    "TOP_REASONS": 10,
    # Runs not finished the dashboard lists (the others are "and N more"), runs per /runs page.
    "DASHBOARD_RUNS": 10,
    "RUNS_PAGE_SIZE": 50,
    # The pages count as live while the newest outcome is at most this many minutes old; they
    # refresh themselves every REFRESH_SECONDS then, every IDLE_REFRESH_SECONDS otherwise.
    "LIVE_MINUTES": 2,
    "REFRESH_SECONDS": 5,
    "IDLE_REFRESH_SECONDS": 30,
}


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from the environment's settings, overridden by ``test_config``.

    Besides Flask's own keys the config holds ``MONGO_URI``, ``REDIS_URL``, ``WEB_USER`` and
    ``WEB_PASSWORD`` (from the settings; with both set, every route but ``/healthz`` asks for
    them), and the keys of :data:`DEFAULT_CONFIG`.
    """
    # As in the workers: no log line of this process (an error's text, a traceback) shows the
    # credentials of a URL, MONGO_URI and REDIS_URL included.
    install_log_redaction()
    app = Flask(__name__)
    settings = get_settings()
    app.config.from_mapping(
        MONGO_URI=settings.mongo_uri,
        REDIS_URL=settings.redis_url,
        WEB_USER=settings.web_user,
        WEB_PASSWORD=settings.web_password,
        **DEFAULT_CONFIG,
    )
    if test_config is not None:
        app.config.from_mapping(test_config)

    auth.init_app(app)
    db.init_app(app)
    # After Flask-PyMongo, which installs a BSON provider: the views only write plain values.
    app.json = _DocumentOrderJSON(app)
    errors.init_app(app)
    app.after_request(_security_headers)
    for blueprint in (dashboard.bp, runs.bp, images.bp, monitoring.bp, metrics.bp, health.bp):
        app.register_blueprint(blueprint)
    return app


class _DocumentOrderJSON(DefaultJSONProvider):
    """Keys in the order the views write them (``minute`` first), as the contract shows them."""

    sort_keys = False


def _security_headers(response: Response) -> Response:
    # A view may set a narrower policy of its own (the SVG chart does).
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response
