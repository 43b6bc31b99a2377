"""The health blueprint: does the app reach MongoDB and Redis?"""

from __future__ import annotations

from collections.abc import Callable

import pymongo.errors
import redis.exceptions
from flask import Blueprint, Response, current_app, jsonify

from image_crawler.redaction import redact

from .db import get_db, get_redis

bp = Blueprint("health", __name__)


def _ping_mongo() -> None:
    get_db().command("ping")


def _ping_redis() -> None:
    get_redis().ping()


_SERVICES: dict[str, Callable[[], None]] = {"mongo": _ping_mongo, "redis": _ping_redis}
_FAILURES = (pymongo.errors.PyMongoError, redis.exceptions.RedisError, OSError)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 ``{"status": "ok", …}`` when every service answers a ping, else 503 naming those down.

    The answer says only ``ok`` or ``down`` per service: it is open to anyone who reaches the app
    (no credentials, so that healthchecks work), and an error's text names internal hosts and
    ports. Why a service is down goes to the log.
    """
    report: dict[str, str] = {}
    down = []
    for name, ping in _SERVICES.items():
        try:
            ping()
        except _FAILURES as exc:
            down.append(name)
            report[name] = "down"
            current_app.logger.warning(
                "healthz: %s is down: %s", name, redact(f"{type(exc).__name__}: {exc}")
            )
        else:
            report[name] = "ok"
    response = jsonify({"status": "down" if down else "ok", "down": down, **report})
    response.cache_control.no_store = True
    return response, 503 if down else 200
