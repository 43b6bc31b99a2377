"""Bounded decode memory, real processes: 24 images of 49 megapixels, and no worker grows past 1.5 GB.

`dramatiq image_crawler.actors --processes 2 --threads 8` and `image-crawler enqueue --wait` run
as in production against a local server holding 24 distinct 7000×7000 images, six of each of the
costliest kinds to convert: RGBA PNG, 16-bit gray PNG with a tRNS key, CMYK JPEG and palette PNG
with a tRNS chunk (made RGBA on the way). Each conversion peaks at 0.37–0.42 GB and is estimated
at 0.42–0.47 GB (``estimated_decode_bytes``), so with ``DECODE_MEMORY_MB=1024`` two run at once in
a process and the other threads wait their turn. Without the budget, threads converting at once
took workers to 3.1 and 2.4 GB. The peak RSS of every worker process is the kernel's high-water
mark, printed (`pytest -s`).

The images are black but for a few pixels that make each one distinct: on disk 2.2 MB for a CMYK
JPEG and under 0.2 MB for a PNG, the full 49 megapixels once decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
from PIL import Image

from support.hostile import ProcessTreeMemory
from support.http_server import LocalHttpServer
from support.processes import image_crawler, start_workers, stop_workers

pytestmark = pytest.mark.slow

MB = 1024 * 1024
SIDE = 7000  # 49 megapixels
PER_KIND = 6
#: A worker process idles at ~100 MB and may hold DECODE_MEMORY_MB of pixels on top.
MAX_WORKER_RSS = 1536 * MB
LIMITS = {
    "MAX_IMAGE_PIXELS": "60000000",
    "FETCH_MAX_BYTES": str(64 * MB),
    "FETCH_TIMEOUT": "30",
    "DECODE_MEMORY_MB": "1024",
}


@dataclass(frozen=True)
class LargeImage:
    """One file the local server serves."""

    name: str
    body: bytes
    content_type: str


def _marked(mode: str, n: int) -> Image.Image:
    """A black ``SIDE``² image of ``mode`` with a row of pixels that encodes ``n``."""
    image = Image.new(mode, (SIDE, SIDE))
    bands = len(image.getbands())
    for x, bit in enumerate(f"{n:08b}"):
        value = 200 + int(bit) * 50 if mode != "I;16" else 40_000 + int(bit) * 20_000
        image.putpixel((x, 0), value if bands == 1 else (value,) * bands)
    return image


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _rgba_png(n: int) -> bytes:
    return _encoded(_marked("RGBA", n), "PNG")


def _gray16_png_with_key(n: int) -> bytes:
    return _encoded(_marked("I;16", n), "PNG", transparency=40_000)


def _cmyk_jpeg(n: int) -> bytes:
    return _encoded(_marked("CMYK", n), "JPEG", quality=75)


def _palette_png_with_trns(n: int) -> bytes:
    image = _marked("P", n)
    image.putpalette(bytes(range(256)) * 3)
    return _encoded(image, "PNG", transparency=0)


KINDS = {
    "rgba.png": (_rgba_png, "image/png"),
    "gray16-trns.png": (_gray16_png_with_key, "image/png"),
    "cmyk.jpg": (_cmyk_jpeg, "image/jpeg"),
    "palette-trns.png": (_palette_png_with_trns, "image/png"),
}


@pytest.fixture(scope="session")
def large_images() -> list[LargeImage]:
    """The 24 images, built once per session (some 20 s of CPU)."""
    images = []
    for kind, (build, content_type) in KINDS.items():
        for n in range(PER_KIND):
            images.append(LargeImage(f"{n}-{kind}", build(n), content_type))
    return images


def test_large_images_are_converted_within_the_decode_memory_budget(crawl_env, tmp_path, large_images):
    env, db = crawl_env
    with LocalHttpServer() as server:
        for image in large_images:
            server.add(f"/large/{image.name}", image.body, content_type=image.content_type)
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(f"/large/{image.name}") + "\n" for image in large_images))
        workers = start_workers({**env, **LIMITS}, processes=2, threads=8, log=tmp_path / "workers.log")
        try:
            with ProcessTreeMemory(workers.pid) as memory:
                result = image_crawler(env, "enqueue", str(urls), "--wait", "--timeout", "600", timeout=900)
        finally:
            stop_workers(workers)

    print(f"\n24 images of 49 MP: peak worker RSS {memory.peak / MB:.1f} MB\n{memory.report()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "done: 24 urls — 24 success, 0 duplicate, 0 error"
    assert db.images.count_documents({"width": SIDE, "height": SIDE}) == 24
    assert len(memory.peaks) >= 3, f"the worker processes were not all seen:\n{memory.report()}"
    assert memory.peak <= MAX_WORKER_RSS, f"a worker grew past {MAX_WORKER_RSS // MB} MB:\n{memory.report()}"
