"""GET /image/<md5> and /image/<md5>.json."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from image_crawler import storage
from support.images import decode_png


def stored_png(db, md5: str) -> bytes:
    return storage.gray_files(db).get(md5).read()


def test_png_is_served_inline_with_strong_etag_and_long_lived_cache(client, seed, mongo_db):
    md5 = seed.image(1)

    response = client.get(f"/image/{md5}")

    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.data == stored_png(mongo_db, md5)
    assert response.content_length == len(response.data)
    assert response.headers["Content-Disposition"] == f'inline; filename="{md5}.png"'
    assert response.headers["ETag"] == f'"{md5}"'
    cache = response.cache_control
    assert cache.public and cache.immutable and cache.max_age >= 365 * 24 * 3600
    mode, pixels = decode_png(response.data)
    assert mode == "L" and pixels.shape == (32, 48)


def test_matching_if_none_match_answers_304_without_a_body(client, seed):
    md5 = seed.image(2)

    response = client.get(f"/image/{md5}", headers={"If-None-Match": f'"{md5}"'})

    assert response.status_code == 304
    assert response.data == b""
    assert response.headers["ETag"] == f'"{md5}"'


def test_other_etag_gets_the_full_image(client, seed):
    md5 = seed.image(3)

    response = client.get(f"/image/{md5}", headers={"If-None-Match": '"0123456789abcdef0123456789abcdef"'})

    assert response.status_code == 200 and response.data.startswith(b"\x89PNG")


def test_upper_case_md5_is_the_same_image(client, seed):
    md5 = seed.image(4)

    response = client.get(f"/image/{md5.upper()}")

    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{md5}"'


def test_head_gives_the_headers_only(client, seed):
    md5 = seed.image(5)

    response = client.head(f"/image/{md5}")

    assert response.status_code == 200 and response.data == b""
    assert response.mimetype == "image/png" and int(response.headers["Content-Length"]) > 0


def test_png_over_16_mb_streams_whole(client, mongo_db):
    noise = np.random.default_rng(7).integers(0, 256, size=(4200, 4200), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, "L").save(buffer, "PNG", compress_level=0)
    png = buffer.getvalue()
    md5 = hashlib.md5(png).hexdigest()
    storage.store_gray_png(mongo_db, md5, png)
    assert len(png) > 16 * 1024 * 1024  # more than a MongoDB document can hold

    response = client.get(f"/image/{md5}")

    assert response.status_code == 200
    assert response.content_length == len(png)
    assert response.data == png


def test_unknown_md5_is_404(client):
    response = client.get("/image/0123456789abcdef0123456789abcdef")

    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "0123456789abcdef0123456789abcdef" in response.text


@pytest.mark.parametrize(
    "name",
    [
        "abc",
        "0123456789abcdef0123456789abcde",  # 31 digits
        "0123456789abcdef0123456789abcdef0",  # 33 digits
        "0123456789abcdef0123456789abcdeg",
        "0123456789abcdef 123456789abcdef",
        "0123456789abcdef0123456789abcdef.png",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "%C3%A9" * 16,
        "..",
        "a/b",
        "0123456789abcdef/0123456789abcdef",
    ],
)
def test_anything_but_32_hex_digits_is_400(client, name):
    response = client.get(f"/image/{name}")

    assert response.status_code == 400
    assert "<script>" not in response.text


def test_metadata_tells_size_source_and_insertion_time(client, seed):
    md5 = seed.image(6, width=40, height=30, url="http://images.test/cat.png?size=big")

    response = client.get(f"/image/{md5.upper()}.json")

    assert response.status_code == 200 and response.mimetype == "application/json"
    data = response.get_json()
    assert data["md5"] == md5
    assert (data["width"], data["height"]) == (40, 30)
    assert data["source_url"] == "http://images.test/cat.png?size=big"
    assert data["content_type"] == "image/png" and data["byte_size"] > 0 and data["gray_size"] > 0
    assert data["inserted_at"].endswith("Z") and data["inserted_at"][:4].isdigit()
    assert data["png"] == f"/image/{md5}"


def test_metadata_errors_are_json(client):
    missing = client.get("/image/0123456789abcdef0123456789abcdef.json")
    malformed = client.get("/image/nope.json")

    assert missing.status_code == 404 and missing.get_json()["status"] == 404
    assert malformed.status_code == 400 and malformed.get_json()["error"] == "Bad Request"
