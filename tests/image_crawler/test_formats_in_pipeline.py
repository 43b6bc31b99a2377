"""IMAGE_FORMATS reaches the workers: grayscale decodes only what the setting names.

docs/architecture.md, "What an image becomes": only the plugins of the formats in
``IMAGE_FORMATS`` ever parse a body; a body another plugin recognises ends as
``unsupported format <NAME>``. ``imaging.to_grayscale`` falls back to the default formats when
it is given none, so only a pipeline whose setting differs from the default shows that the
actors pass it on (test_imaging.py checks the decoder itself).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from image_crawler import storage
from support.http_server import LocalHttpServer
from support.images import encode, photo, png_bytes

JPEG = encode(photo(40, 30, seed=5), "JPEG", quality=90)
PNG = png_bytes(36, 28, seed=6)


@pytest.fixture
def server() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as running:
        # Both served as image/jpeg: what a body is decides, never its Content-Type.
        running.add("/photo.jpg", body=JPEG, content_type="image/jpeg")
        running.add("/drawing.png", body=PNG, content_type="image/jpeg")
        yield running


@pytest.mark.parametrize(
    ("formats", "refused", "allowed"),
    [("PNG", "/photo.jpg", "/drawing.png"), ("JPEG", "/drawing.png", "/photo.jpg")],
    ids=["png only", "jpeg only"],
)
def test_a_format_the_setting_leaves_out_ends_unsupported_and_the_one_it_names_is_stored(
    make_pipeline, server, formats, refused, allowed
):
    pipeline = make_pipeline(image_formats=formats)
    report = pipeline.enqueue_text(f"{server.url(refused)}\n{server.url(allowed)}\n")
    pipeline.wait_for(report.run, 2)

    ledger = {doc["url"]: doc for doc in storage.ledger(pipeline.db).find({"run": report.run})}
    left_out = "JPEG" if formats == "PNG" else "PNG"
    assert (ledger[server.url(refused)]["outcome"], ledger[server.url(refused)]["reason"]) == (
        "error",
        f"unsupported format {left_out}",
    )
    assert ledger[server.url(allowed)]["outcome"] == "success"
    body = JPEG if allowed == "/photo.jpg" else PNG
    assert [doc["_id"] for doc in storage.images(pipeline.db).find()] == [hashlib.md5(body).hexdigest()]
    assert server.hits(refused) == server.hits(allowed) == 1  # downloaded, then refused by its format
