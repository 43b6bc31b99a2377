"""Error answers: JSON for JSON routes, a small HTML page otherwise; never a stack trace."""

from __future__ import annotations

import pymongo.errors
from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable


def _wants_json() -> bool:
    # Routes whose path ends in ".json" (and /healthz) answer JSON, errors included.
    return request.path.endswith(".json") or request.path == "/healthz"


def _answer(error: HTTPException) -> tuple[Response | str, int, list[tuple[str, str]]]:
    """JSON or the error page for ``error``, with its headers (``Allow``, ``WWW-Authenticate``…)."""
    code = error.code or 500
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    if _wants_json():
        return jsonify({"error": error.name, "status": code, "message": error.description}), code, headers
    return render_template("error.html", error=error, code=code), code, headers


def _database_down(exc: pymongo.errors.PyMongoError) -> tuple[Response | str, int, list[tuple[str, str]]]:
    # The app is fine but cannot answer without MongoDB: a 503 tells clients to retry later.
    current_app.logger.warning("MongoDB unavailable: %s", exc)
    return _answer(ServiceUnavailable("The database does not answer right now; try again shortly."))


def _unexpected(error: InternalServerError) -> tuple[Response | str, int, list[tuple[str, str]]]:
    # Flask has logged the original exception; the client learns nothing about our internals.
    return _answer(InternalServerError())


def init_app(app: Flask) -> None:
    """Register the error handlers on ``app``."""
    app.register_error_handler(HTTPException, _answer)
    app.register_error_handler(pymongo.errors.PyMongoError, _database_down)
    app.register_error_handler(InternalServerError, _unexpected)
