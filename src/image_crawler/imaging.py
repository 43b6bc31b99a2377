"""Turn downloaded bytes into the grayscale PNG we store: pure, bytes in and bytes out.

Gray is exactly ``floor((R + G + B) / 3)`` per pixel — not ITU-R 601 luma, which is what
Pillow's plain ``convert("L")`` computes (docs/architecture.md, "What an image becomes").
Whether the bytes are an image at all is decided here, by decoding them; their Content-Type
plays no part.

Every failure is a typed :class:`~image_crawler.errors.ImageError`: Pillow's decoders
raise a zoo of unrelated exceptions (``OSError``, ``SyntaxError``, ``struct.error``...)
that callers must never have to know about.

Only the plugins of the allowed formats (``IMAGE_FORMATS``) ever parse a body: Pillow's CVEs
cluster in the plugins of rare formats (FLI, PSD, SGI, DDS...), and every plugin is otherwise
reachable by anyone who can serve us a URL.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageMode, ImageOps

from .config import REFUSED_IMAGE_FORMATS, Settings
from .errors import ImageError, NotAnImage, TooManyPixels, TruncatedImage, UnsupportedFormat

__all__ = ["DecodeBudget", "GrayImage", "estimated_decode_bytes", "to_grayscale"]

# Pillow's matrix conversion computes ``(UINT8)(m0*r + m1*g + m2*b + m3 + 0.5)`` in float
# (libImaging/Matrix.c): the ``+ 0.5`` rounds, and an offset of -0.5 turns that rounding
# back into the floor we want. Checked against integer arithmetic for all 2**24 RGB
# triples (tests/image_crawler/test_imaging.py); it runs ~20x faster than numpy.
_MEAN_OF_RGB = (1 / 3, 1 / 3, 1 / 3, -0.5)

#: Bytes of a body Pillow shows each plugin's signature check (``Image.open`` reads as many).
_PREFIX_BYTES = 16


@dataclass(frozen=True)
class GrayImage:
    """The grayscale PNG of an image, and the size of the image as a browser shows it."""

    png: bytes
    #: Width and height of the upright image, after its EXIF orientation is applied.
    width: int
    height: int


def to_grayscale(
    data: bytes,
    *,
    max_pixels: int,
    compress_level: int = Settings.png_compress_level,
    budget: DecodeBudget | None = None,
    formats: Collection[str] | None = None,
) -> GrayImage:
    """Decode ``data`` and return its exact grayscale PNG (mode ``L``, or ``LA`` when it has transparency).

    Only the first frame of an animation is kept, and the EXIF orientation is applied.
    Raises :class:`NotAnImage` for bytes that are no image (empty, HTML, garbage),
    :class:`UnsupportedFormat` for an image in a format outside ``formats`` (Pillow's format
    names; default: ``IMAGE_FORMATS``'s default, the web's raster formats) or in EPS, whatever
    ``formats`` says — named by its signature, never parsed —, :class:`TruncatedImage` when
    a recognised image is cut short or corrupt, and :class:`TooManyPixels` — read from the
    header, before any pixel is decoded — when it has more than ``max_pixels`` pixels.
    ``max_pixels`` above Pillow's own ``Image.MAX_IMAGE_PIXELS`` guard raises that guard to
    it (see :func:`_keep_pillow_guard_above`). ``compress_level`` is zlib's, 0 (none) to 9.
    With a ``budget``, the image's :func:`estimated_decode_bytes` are reserved from it once
    the header is read and accepted, and held until the PNG is encoded.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, not {compress_level}")
    allowed = frozenset(
        name.upper() for name in (Settings().allowed_image_formats if formats is None else formats)
    )
    with contextlib.ExitStack() as reservation:

        def reserve(nbytes: int) -> None:
            if budget is not None:
                reservation.enter_context(budget.reserve(nbytes))

        # Passing the decoded image straight on, unnamed, lets _grayscale free each
        # intermediate full-size copy as soon as the next one exists.
        gray = _grayscale(_decode(data, max_pixels, allowed, before_load=reserve))
        result = GrayImage(png=_encode_png(gray, compress_level), width=gray.width, height=gray.height)
        del gray  # released with the reservation, not after it
    return result


class DecodeBudget:
    """Bytes of decoded pixels that may be held at once by one process's threads.

    Each conversion reserves its :func:`estimated_decode_bytes` before decoding and waits
    while the reservations of others leave too little room, so eight threads meeting eight
    large images take turns instead of holding all eight at once. Reservations are granted
    in the order they were asked for: a large image is never starved by a stream of small
    ones (the small ones wait behind it). One larger than the whole limit waits until nothing
    else is reserved, then runs alone. Waiting is the budget's only answer, never an error.

    Memory a conversion frees must also leave the process, or taking turns bounds nothing:
    a budget makes Pillow allocate images in blocks of at least 64 MB (process-wide), see
    :data:`_PILLOW_BLOCK_SIZE`.

    :param limit_bytes: the most bytes reserved at once (at least 1).
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be at least 1, not {limit_bytes}")
        if Image.core.get_block_size() < _PILLOW_BLOCK_SIZE:
            Image.core.set_block_size(_PILLOW_BLOCK_SIZE)
        self.limit_bytes = limit_bytes
        self._reserved = 0
        self._holders = 0
        self._queue: deque[object] = deque()  # one token per waiting reservation, oldest first
        self._changed = threading.Condition()

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved right now."""
        return self._reserved

    @property
    def waiting(self) -> int:
        """Reservations waiting for room right now."""
        return len(self._queue)

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block, once it is this one's turn and they fit."""
        if nbytes < 0:
            raise ValueError(f"nbytes must not be negative, not {nbytes}")
        turn = object()
        with self._changed:
            self._queue.append(turn)
            try:
                self._changed.wait_for(lambda: self._queue[0] is turn and self._fits(nbytes))
            finally:
                # Also when the wait is interrupted (Dramatiq's time limit raises inside the
                # thread): a token left at the head would stop everyone behind it.
                self._queue.remove(turn)
                self._changed.notify_all()
            self._reserved += nbytes
            self._holders += 1
        try:
            yield
        finally:
            with self._changed:
                self._reserved -= nbytes
                self._holders -= 1
                self._changed.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self._holders == 0 or self._reserved + nbytes <= self.limit_bytes


def estimated_decode_bytes(image: Image.Image) -> int:
    """Bytes :func:`to_grayscale` holds at its peak for ``image``, from its header alone (no pixel is loaded).

    The decoded source is ``width × height × bands × bytes per band``; loading, converting
    and encoding it peaks at a measured multiple of that, which depends on the mode, on
    whether a transparency key makes the result LA, and for WebP on the format; plus a
    megabyte that does not depend on the size.
    """
    layout = ImageMode.getmode(image.mode)
    decoded = image.width * image.height * len(layout.bands) * np.dtype(layout.typestr).itemsize
    key = (image.mode, image.has_transparency_data)
    factor = _FORMAT_PEAK_FACTORS.get((image.format, *key)) or _PEAK_FACTORS.get(key, _UNMEASURED_FACTOR)
    return math.ceil(decoded * factor) + _CONVERSION_OVERHEAD


# Peak bytes of one whole conversion (load, EXIF rotation, gray, PNG at level 1) per byte of the
# decoded source, by (mode, has transparency): the largest factor measured, times 1.1, rounded up
# to a quarter. Measured with ``.venv/bin/python -m benchmarks.decode_memory`` (Pillow 13.0, numpy
# 2.4, glibc 2.36, x86-64, with a budget's 64 MB blocks): each source at 7000² (49 MP), 4500²,
# 3000², 1000² and 500², black but for a few pixels, random noise (the PNG written does not
# compress) and EXIF-rotated (the upright copy too), each in a fresh process; factor = (VmHWM −
# RSS before the call − _CONVERSION_OVERHEAD) / decoded bytes, the largest of two runs. Pillow
# keeps RGB, CMYK, LA, I and F at 4 bytes a pixel, hence the thirds and halves.
#
#   source                      largest factor   where
#   1 PNG                       1.98             49 MP
#   L PNG                       1.99             49 MP noise (1.0 flat: the rest is the PNG written)
#   L PNG, tRNS key (→ LA)      5.32             49 MP noise
#   LA PNG                      3.99             49 MP rotated
#   P PNG / GIF                 4.98             49 MP noise (P → RGB → L)
#   P PNG / GIF, transparent    8.99             49 MP (P → RGBA → RGB and A → LA)
#   RGB PNG / JPEG              2.66             49 MP rotated (1.67 upright)
#   RGB PNG, tRNS key           3.00             49 MP rotated
#   RGBA PNG                    2.25             49 MP, any content
#   CMYK JPEG                   2.00             49 MP
#   YCbCr / LAB TIFF            2.66             49 MP
#   I;16 PNG, I;16B TIFF        2.99             49 MP (the source, numpy's copy of it twice over)
#   I;16 PNG, tRNS key          4.95             9 MP rotated (then alpha and the LA merge)
#   I TIFF (32-bit)             3.74             1 MP rotated (the TIFF decoder copies the file)
#   F TIFF                      2.00             49 MP rotated
#   RGB WebP                    7.30             9 MP lossless noise (the decoder's own copies)
#   RGBA WebP                   5.47             1 MP lossless noise
_PEAK_FACTORS: dict[tuple[str, bool], float] = {
    ("1", False): 2.25,
    ("L", False): 2.25,
    ("L", True): 6.0,
    ("LA", True): 4.5,
    ("P", False): 5.5,
    ("P", True): 10.0,
    ("RGB", False): 3.0,
    ("RGB", True): 3.5,
    ("RGBA", True): 2.5,
    ("CMYK", False): 2.25,
    ("YCbCr", False): 3.0,
    ("LAB", False): 3.0,
    # The I;16 variants differ only in byte order and share one code path (_deep_gray).
    ("I;16", False): 3.5,
    ("I;16", True): 5.5,
    ("I;16B", False): 3.5,
    ("I;16B", True): 5.5,
    ("I;16L", False): 3.5,
    ("I;16L", True): 5.5,
    ("I;16N", False): 3.5,
    ("I;16N", True): 5.5,
    ("I", False): 4.25,
    ("F", False): 2.25,
}
#: Where a format's decoder holds more than Pillow's own copy, by (format, mode, has transparency).
_FORMAT_PEAK_FACTORS: dict[tuple[str | None, str, bool], float] = {
    ("WEBP", "RGB", False): 8.25,
    ("WEBP", "RGBA", True): 6.25,
}
#: Modes not measured (PA, RGBa, La, RGBX...) are assumed to cost as much as the costliest one.
_UNMEASURED_FACTOR = max(_PEAK_FACTORS.values())
#: What a conversion holds whatever the size (decoder and zlib state, buffers): peaks of
#: images under 1 MP exceeded decoded bytes × factor by up to 0.5 MB.
_CONVERSION_OVERHEAD = 1024 * 1024

# Pillow allocates images in blocks of at most 16 MB (PILLOW_BLOCK_SIZE). Once glibc has freed
# one such mapped block, it raises its mmap threshold and serves the next ones from the heap of
# the thread asking, where they stay when freed: eight threads converting 49 MP images strictly
# one at a time peaked at 3.15 GB, one thread at 0.44 GB. Blocks over glibc's largest threshold
# (32 MB) are always mapped on their own and unmapped when freed: with 64 MB blocks the eight
# threads peaked at 0.50 GB (``python -m benchmarks.decode_memory --threads 8``). Images smaller
# than a block still come from the heaps; MALLOC_ARENA_MAX=2 in a worker's environment keeps
# those few.
_PILLOW_BLOCK_SIZE = 64 * 1024 * 1024


def _decode(
    data: bytes, max_pixels: int, allowed: frozenset[str], before_load: Callable[[int], None]
) -> Image.Image:
    """Open ``data`` as an ``allowed`` format, refuse it by its header size, reserve, load it.

    ``before_load`` is given the image's :func:`estimated_decode_bytes` before any pixel is
    decoded. What is loaded is the first frame, upright.
    """
    if not data:
        raise NotAnImage("empty body")
    _keep_pillow_guard_above(max_pixels)
    openers = _openers(allowed)
    reserved = False
    if data.startswith(_ICO_SIGNATURE) and "ICO" in openers:
        # Pillow's ICO plugin decodes its largest frame inside open(): size and memory must be
        # settled from the frames' own headers first (a directory entry says at most 256×256).
        frames = _ico_frame_sizes(data)
        for size in frames:
            _refuse_oversized(size, max_pixels)
        if frames:
            width, height = max(frames, key=lambda size: size[0] * size[1])
            before_load(_ico_decode_bytes(width, height))
            reserved = True
    try:
        # Only these plugins are tried: the others' code never runs on the body.
        image = Image.open(io.BytesIO(data), formats=openers)
    except Image.UnidentifiedImageError as exc:
        raise _unidentified(data[:_PREFIX_BYTES], openers) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's guard fires inside open(), before we see the size.
        raise TooManyPixels("too many pixels") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's exceptions share no base class (its fuzzers catch Exception too)
        # A decoder recognised its signature, then could not parse what follows.
        raise TruncatedImage("corrupt image") from exc
    if image.format not in allowed:
        # JPEG's opener also opens MPO (a JPEG with more pictures after it), and only then knows.
        raise UnsupportedFormat(str(image.format))
    _refuse_oversized(image.size, max_pixels)
    if not reserved:
        before_load(estimated_decode_bytes(image))
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels("too many pixels") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise TruncatedImage() from exc
    # Some containers (an ICO holding a PNG) only learn their real size while loading.
    _refuse_oversized(image.size, max_pixels)
    if image.width == 0 or image.height == 0:
        raise NotAnImage("empty image")
    try:
        # In place: the copy exif_transpose would otherwise make is a full-size image.
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception:  # unreadable EXIF: show the pixels as stored, as browsers do
        return image
    return image


_ICO_SIGNATURE = b"\0\0\1\0"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICO_ENTRY = struct.Struct("<BBBBHHII")  # width, height, colours, 0, planes, bpp, size, offset


def _ico_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """The sizes of an ICO's frames as their own headers give them (PNG IHDR, or BMP header).

    The directory's sizes cannot be trusted: a PNG frame may be any size whatever its entry
    says. A frame whose header lies outside ``data`` is left out (Pillow will fail on it).
    """
    count = int.from_bytes(data[4:6], "little")
    sizes = []
    for index in range(count):
        start = 6 + index * _ICO_ENTRY.size
        if start + _ICO_ENTRY.size > len(data):
            break
        offset = _ICO_ENTRY.unpack_from(data, start)[7]
        frame = data[offset : offset + 24]
        if frame.startswith(_PNG_SIGNATURE) and len(frame) >= 24:
            sizes.append(struct.unpack(">II", frame[16:24]))
        elif len(frame) >= 12 and int.from_bytes(frame[:4], "little") == 12:  # BITMAPCOREHEADER
            width, height = struct.unpack("<HH", frame[4:8])
            sizes.append((width, height // 2))  # the XOR image, then the AND mask
        elif len(frame) >= 12:
            width, height = struct.unpack("<ii", frame[4:12])
            sizes.append((abs(width), abs(height) // 2))
    return sizes


def _ico_decode_bytes(width: int, height: int) -> int:
    """Estimated peak of converting an ICO frame of this size (Pillow decodes one as RGBA)."""
    factor = _PEAK_FACTORS.get(("RGBA", True), _UNMEASURED_FACTOR)
    return math.ceil(width * height * 4 * factor) + _CONVERSION_OVERHEAD


# EPS (REFUSED_IMAGE_FORMATS) is never an opener, whatever ``formats`` a caller passes: Pillow
# hands it to Ghostscript, an external interpreter with a history of exploits.
@lru_cache(maxsize=16)
def _openers(allowed: frozenset[str]) -> tuple[str, ...]:
    """The Pillow openers that may parse a body of the ``allowed`` formats, in Pillow's detection order."""
    Image.init()  # registers all plugins once; with an explicit list, open() will not do it
    wanted = (allowed | {"JPEG"}) if "MPO" in allowed else allowed  # MPO has no opener of its own
    return tuple(name for name in Image.ID if name in wanted and name not in REFUSED_IMAGE_FORMATS)


def _unidentified(prefix: bytes, openers: tuple[str, ...]) -> ImageError:
    """Why no opener took a body starting with ``prefix``: the format it is in, if it is not ours.

    Each plugin's signature check (its ``_accept``, a few byte comparisons) is run, as
    ``Image.open`` does before it lets a plugin parse; the first one that recognises the
    prefix names the format. A plugin without one (TGA, IM, SPIDER...) cannot be told from
    garbage without parsing, so such a body stays "not an image".
    """
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue
        try:
            verdict = accept(prefix)
        except Exception:  # a short prefix trips some of them up (struct.error); Pillow skips those too
            continue
        if isinstance(verdict, str):
            return UnsupportedFormat(name)  # recognised, but this Pillow lacks its codec (WebP, AVIF)
        if verdict:
            # One of ours that recognised the signature was tried and could not parse the rest.
            return NotAnImage() if name in openers else UnsupportedFormat(name)
    return NotAnImage()


_GUARD_RAISE = threading.Lock()


def _keep_pillow_guard_above(max_pixels: int) -> None:
    """Raise Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` if it is lower.

    Pillow checks every size it reads (in ``open()``, and for the frames of GIFs, ICOs, TIFF
    tiles...) against that module global, warning above it and raising above twice it. Left
    at its 89,478,485, it would refuse images that MAX_IMAGE_PIXELS allows: our limit is the
    one that counts, and Pillow's guard sits at or above it. It is only ever raised, under a
    lock, so threads converting with different limits never lower it under one another; a
    limit below Pillow's leaves it untouched.
    """
    guard = Image.MAX_IMAGE_PIXELS
    if guard is None or guard >= max_pixels:
        return
    with _GUARD_RAISE:
        guard = Image.MAX_IMAGE_PIXELS
        if guard is not None and guard < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _refuse_oversized(size: tuple[int, int], max_pixels: int) -> None:
    """Raise TooManyPixels when ``size`` is over ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise TooManyPixels(f"too many pixels: {width}x{height}")


def _grayscale(image: Image.Image) -> Image.Image:
    """``image`` as ``L`` (or ``LA`` when it has transparency) with gray = floor((R + G + B) / 3).

    One flow rebinding ``image`` at each step, so every full-size intermediate is freed as
    soon as the next exists: RGBA → RGB → L never holds three colour copies at once.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _deep_gray(image)
    alpha = None
    if image.has_transparency_data:
        if image.mode == "LA":
            return image
        if image.mode in ("1", "L", "La"):
            # Gray already: only a transparency key (or premultiplication) needs resolving.
            return image.convert("LA")
        if image.mode != "RGBA":
            # P/PA with transparency, RGB with a tRNS key, premultiplied RGBa.
            image = image.convert("RGBA")
        alpha = image.getchannel("A")
    if image.mode == "L":
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode != "RGB":
        # RGBA (alpha set aside above), P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow knows each
        # one's RGB, and the matrix conversion accepts RGB only.
        image = image.convert("RGB")
    image = image.convert("L", matrix=_MEAN_OF_RGB)
    return image if alpha is None else Image.merge("LA", (image, alpha))


def _deep_gray(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float gray as 8-bit ``L`` (``LA`` when a transparency key is set).

    Integers keep their top byte (``v >> 8``): Pillow's ``convert("L")`` would clip
    everything above 255 to white. Floats are clipped to 0..255 (truncated, NaN → 0).
    No full-size array wider than the source's own is made: numpy would build ``v >> 8``,
    or a mask of 0s and 255s, in int64 (8 bytes a pixel) unless told otherwise.
    """
    if image.mode == "F":
        return image.convert("L")
    values = np.asarray(image)  # uint16 of either byte order, or int32 for mode I
    gray = np.empty(values.shape, dtype=np.uint8)
    if image.mode == "I":
        shifted = values >> 8
        np.clip(shifted, 0, 255, out=shifted)  # 32-bit data can exceed 16 bits, or be negative
        gray[...] = shifted
        del shifted
    else:
        # Shifted in buffered chunks straight into uint8: no full-size uint16 result.
        np.right_shift(values, 8, out=gray, casting="unsafe")
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return Image.fromarray(gray)
    alpha = np.not_equal(values, key).view(np.uint8)  # the bool mask itself, as 0s and 1s
    alpha *= 255
    del values
    return Image.merge("LA", (Image.fromarray(gray), Image.fromarray(alpha)))


def _encode_png(image: Image.Image, compress_level: int) -> bytes:
    """``image`` as PNG bytes, with none of the source's metadata."""
    # Pillow would copy an ICC profile (an RGB one is invalid in a gray PNG), text chunks
    # and a transparency key from ``info``: the stored PNG carries pixels only.
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()
