"""Test images built in memory, and the grayscale we expect of them (computed with numpy)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A photo-like image: smooth gradients plus noise, distinct for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = []
    for c in range(3):
        phase = rng.uniform(0, 6.28)
        wave = 127 + 100 * np.sin(x / (7 + 3 * c + seed % 5) + phase) * np.cos(y / (11 + c))
        channels.append(np.clip(wave + rng.normal(0, 20, size=wave.shape), 0, 255))
    rgb = Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray((x * 255 // max(width - 1, 1)).astype(np.uint8), "L")
        rgb.putalpha(alpha)
        return rgb
    return rgb.convert(mode) if mode != "RGB" else rgb


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """The image as bytes in ``fmt`` (PNG, JPEG, GIF, WEBP...)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


#: The mode each format is written in when it cannot write RGB (the rest are written as RGB).
_WRITTEN_AS = {"XBM": "1", "MSP": "1", "SPIDER": "F", "ICNS": "RGBA"}


def in_format(fmt: str, seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A small real image written by Pillow in ``fmt`` (MPO: two frames, so it is one)."""
    image = photo(*size, seed=seed)
    if fmt in _WRITTEN_AS:
        image = image.convert(_WRITTEN_AS[fmt])
    if fmt == "MPO":
        return encode(image, fmt, save_all=True, append_images=[photo(*size, seed=seed + 1)])
    if fmt == "ICO":
        return encode(image, fmt, sizes=[size])  # not Pillow's default: the icon sizes under it
    return encode(image, fmt)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A distinct RGB PNG."""
    return encode(photo(width, height, seed), "PNG")


def expected_gray(data: bytes) -> np.ndarray:
    """floor((R + G + B) / 3) of an RGB/RGBA/P/JPEG image, computed independently of the product."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint16)
    return (rgb.sum(axis=-1) // 3).astype(np.uint8)


def decode_png(data: bytes) -> tuple[str, np.ndarray]:
    """Mode and pixels of a stored PNG."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.mode, np.asarray(image)
