"""HTTP basic auth for every route but ``/healthz``, when ``WEB_USER`` and ``WEB_PASSWORD`` are set.

Static files are asked for too: a page's own requests (its stylesheet, script, chart and the
script's fetches) are same-origin, and browsers send the credentials they were given for the
page along with them. Basic auth sends the password in clear on every request: put a TLS
reverse proxy in front of an app that is reachable from elsewhere (README: Security).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, request
from werkzeug.exceptions import Unauthorized

from image_crawler.config import check_web_credentials

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The protection space a browser remembers the credentials for.
REALM = "image-crawler"

#: Endpoints anyone who reaches the app may call: healthchecks (Compose's, a load balancer's)
#: carry no credentials, and the answer names no more than which store is down.
OPEN_ENDPOINTS = frozenset({"health.healthz"})


class CredentialsRequired(Unauthorized):
    """A 401 asking for basic credentials, encoded in UTF-8 (RFC 7617); it says nothing else."""

    description = "This dashboard asks for a user name and password."

    def get_headers(
        self, environ: WSGIEnvironment | None = None, scope: dict[str, Any] | None = None
    ) -> list[tuple[str, str]]:
        """Werkzeug's headers plus ``WWW-Authenticate: Basic realm="image-crawler", charset="UTF-8"``."""
        headers = super().get_headers(environ, scope)
        return [*headers, ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')]


def init_app(app: Flask) -> None:
    """Make ``app`` ask for ``WEB_USER``/``WEB_PASSWORD`` from its config when both are set.

    Raises :class:`~image_crawler.config.ConfigError` as
    :func:`~image_crawler.config.check_web_credentials` does (the config may be overridden).
    """
    user, password = app.config.get("WEB_USER") or "", app.config.get("WEB_PASSWORD") or ""
    check_web_credentials(user, password)
    if user:
        app.before_request(_require_credentials)


def _require_credentials() -> None:
    if request.endpoint in OPEN_ENDPOINTS:
        return
    given = request.authorization
    config = current_app.config
    if (
        given is None
        or given.type != "basic"
        or not _credentials_match(
            given.username or "", given.password or "", config["WEB_USER"], config["WEB_PASSWORD"]
        )
    ):
        raise CredentialsRequired()


def _credentials_match(user: str, password: str, expected_user: str, expected_password: str) -> bool:
    # Both are compared, always, in time that tells nothing about either: compare_digest on
    # digests of equal length, so neither a wrong prefix nor a wrong length answers faster.
    user_ok = hmac.compare_digest(_digest(user), _digest(expected_user))
    password_ok = hmac.compare_digest(_digest(password), _digest(expected_password))
    return user_ok & password_ok


def _digest(text: str) -> bytes:
    # surrogateescape: a setting read from the environment may hold bytes that are not UTF-8.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
