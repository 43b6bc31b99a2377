"""The benchmark's image set: distinct photo-like images, generated once and cached on disk.

Flat colours or plain gradients would compress unrealistically well (a PNG of them is a few
hundred bytes), so each image is built like a photo: smooth colour fields at a few scales, some
soft-edged shapes, and sensor-like noise. Sizes are 200–640 px a side; most are JPEG (quality
75–92, 4:2:0), about one in ten is an RGB PNG and one in fifty an RGBA PNG.

Image ``i`` depends only on ``i`` and :data:`VERSION`, so a larger set reuses a smaller one.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Bump when the generator changes, so stale caches are not reused.
VERSION = 1
MIN_SIDE, MAX_SIDE = 200, 640
LARGE_SIZE = (4000, 3000)


def default_cache_dir() -> Path:
    """Where generated images are kept between runs (``$IMAGE_CRAWLER_BENCH_CACHE`` overrides)."""
    override = os.environ.get("IMAGE_CRAWLER_BENCH_CACHE")
    if override:
        return Path(override)
    return Path(tempfile.gettempdir()) / "image-crawler-bench-cache"


@dataclass(frozen=True)
class BenchImage:
    """One file of the set."""

    path: Path
    content_type: str

    @property
    def name(self) -> str:
        """The file name, also its URL path on the benchmark's server."""
        return self.path.name


def photo_like(width: int, height: int, seed: int, *, alpha: bool = False) -> Image.Image:
    """A distinct photo-like RGB (or RGBA) image: colour fields, soft shapes, fine noise."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    # Colour fields at three scales: sky/ground-like, object-like, texture-like.
    for cells, amplitude in ((3, 90.0), (12, 45.0), (48, 18.0)):
        grid_w = max(2, cells * width // MAX_SIDE)
        grid_h = max(2, cells * height // MAX_SIDE)
        grid = rng.uniform(-1, 1, size=(grid_h, grid_w, 3)).astype(np.float32)
        layer = [
            np.asarray(
                Image.fromarray(grid[:, :, c], mode="F").resize((width, height), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ]
        canvas += amplitude * np.stack(layer, axis=-1)
    canvas += rng.uniform(70, 180, size=3).astype(np.float32)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1 = x0 + int(rng.integers(20, width // 2 + 21))
        y1 = y0 + int(rng.integers(20, height // 2 + 21))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, float(rng.uniform(3, 8)), size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if alpha:
        y, x = np.mgrid[0:height, 0:width]
        mask = 255 - np.clip(np.hypot(x - width / 2, y - height / 2) * 255 / max(width, height), 0, 255)
        image.putalpha(Image.fromarray(mask.astype(np.uint8), "L"))
    return image


def _kind(index: int) -> str:
    if index % 50 == 7:
        return "rgba-png"
    if index % 10 == 3:
        return "png"
    return "jpeg"


def _encode(index: int) -> tuple[bytes, str]:
    rng = np.random.default_rng(1_000_003 * VERSION + index)
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    kind = _kind(index)
    image = photo_like(width, height, seed=index, alpha=kind == "rgba-png")
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=int(rng.integers(75, 93)), optimize=bool(index % 2))
        return buffer.getvalue(), ".jpg"
    image.save(buffer, "PNG")
    return buffer.getvalue(), ".png"


def _path(directory: Path, index: int) -> Path:
    return directory / f"{index:05d}{'.jpg' if _kind(index) == 'jpeg' else '.png'}"


def _write(args: tuple[Path, int]) -> None:
    directory, index = args
    data, _ = _encode(index)
    _atomic_write(_path(directory, index), data)


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def image_set(count: int, cache_dir: Path | None = None, *, jobs: int | None = None) -> list[BenchImage]:
    """The first ``count`` images of the set, generating (in ``jobs`` processes) those not cached yet."""
    directory = (cache_dir or default_cache_dir()) / f"v{VERSION}"
    directory.mkdir(parents=True, exist_ok=True)
    missing = [index for index in range(count) if not _path(directory, index).exists()]
    if missing:
        print(f"generating {len(missing)} images into {directory} (cached for later runs)…", flush=True)
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(_write, [(directory, index) for index in missing], chunksize=32))
    return [
        BenchImage(path, "image/jpeg" if path.suffix == ".jpg" else "image/png")
        for path in (_path(directory, index) for index in range(count))
    ]


def large_photo(cache_dir: Path | None = None) -> Path:
    """A 4000×3000 photo-like JPEG (quality 90), cached."""
    directory = (cache_dir or default_cache_dir()) / f"v{VERSION}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"large-{LARGE_SIZE[0]}x{LARGE_SIZE[1]}.jpg"
    if not path.exists():
        # In a child process: generating it takes about 1 GB, which this process should not keep.
        with ProcessPoolExecutor(max_workers=1) as pool:
            pool.submit(_write_large, path).result()
    return path


def _write_large(path: Path) -> None:
    buffer = io.BytesIO()
    photo_like(*LARGE_SIZE, seed=424242).save(buffer, "JPEG", quality=90)
    _atomic_write(path, buffer.getvalue())


def tiny_set(count: int, cache_dir: Path | None = None) -> list[BenchImage]:
    """``count`` distinct 16×16 PNGs: no pixel work to speak of, so a run measures fixed costs only."""
    directory = (cache_dir or default_cache_dir()) / f"v{VERSION}-tiny"
    directory.mkdir(parents=True, exist_ok=True)
    result = []
    for index in range(count):
        path = directory / f"tiny-{index:05d}.png"
        if not path.exists():
            rng = np.random.default_rng(index)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
            _atomic_write(path, buffer.getvalue())
        result.append(BenchImage(path, "image/png"))
    return result
