"""The images blueprint: a stored grayscale PNG by MD5, and what is known about it."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import TypeVar

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from pymongo.database import Database
from werkzeug.exceptions import BadRequest, NotFound
from werkzeug.wsgi import wrap_file

from image_crawler.storage import as_utc, find_image, open_gray_png

from .db import get_db

bp = Blueprint("images", __name__, url_prefix="/image")

_MD5 = re.compile(r"[0-9a-fA-F]{32}")

#: An image's name is the MD5 of the bytes it was made from: what it names never changes.
_ONE_YEAR = 365 * 24 * 3600

T = TypeVar("T")


def _stored(name: str, read: Callable[[Database, str], T | None]) -> tuple[str, T]:
    """``name`` as a lower-case MD5 (else a 400) and what ``read`` finds stored under it (else a 404)."""
    if not _MD5.fullmatch(name):
        raise BadRequest("An image is named by the 32 hexadecimal digits of its MD5.")
    md5 = name.lower()
    found = read(get_db(), md5)
    if found is None:
        raise NotFound(f"No image has the MD5 {md5}.")
    return md5, found


@bp.get("/<path:name>")
def png(name: str) -> Response:
    """The grayscale PNG, streamed from GridFS, cacheable for good (strong ETag = MD5)."""
    md5, stored = _stored(name, open_gray_png)
    response = current_app.response_class(
        wrap_file(request.environ, stored, buffer_size=stored.chunk_size),
        mimetype="image/png",
        direct_passthrough=True,
    )
    response.content_length = stored.length
    response.last_modified = stored.upload_date
    response.set_etag(md5)
    response.headers["Content-Disposition"] = f'inline; filename="{md5}.png"'
    response.cache_control.public = True
    response.cache_control.max_age = _ONE_YEAR
    response.cache_control.immutable = True
    response.make_conditional(request)  # 304 when If-None-Match names this MD5
    return response


@bp.get("/<path:name>.json")
def metadata(name: str) -> Response:
    """Width, height, insertion time, source URL and sizes of one stored image."""
    md5, document = _stored(name, find_image)
    inserted_at = document.get("inserted_at")
    return jsonify(
        {
            "md5": md5,
            "width": document.get("width"),
            "height": document.get("height"),
            "inserted_at": _iso(inserted_at) if isinstance(inserted_at, dt.datetime) else None,
            "source_url": document.get("source_url"),
            "content_type": document.get("content_type"),
            "byte_size": document.get("byte_size"),
            "gray_size": document.get("gray_size"),
            "png": url_for(".png", name=md5),
        }
    )


def _iso(moment: dt.datetime) -> str:
    return as_utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")
