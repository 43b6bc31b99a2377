"""What an image becomes (docs/architecture.md): exact gray, every Pillow mode, typed errors for bad bytes."""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from image_crawler import imaging
from image_crawler.config import load_settings
from image_crawler.errors import ImageError, NotAnImage, TooManyPixels, TruncatedImage, UnsupportedFormat
from image_crawler.imaging import DecodeBudget, GrayImage, estimated_decode_bytes, to_grayscale
from support.images import decode_png, encode, in_format, photo
from support.peak_memory import can_measure, conversion_peak
from support.waiting import wait_until

MAX_PIXELS = 50_000_000

needs_peak_rss = pytest.mark.skipif(not can_measure(), reason="peak RSS is read from Linux /proc")


def gray_of(data: bytes, **kwargs) -> tuple[str, np.ndarray]:
    """Mode and pixels of the PNG that ``to_grayscale`` makes of ``data``."""
    return decode_png(to_grayscale(data, max_pixels=kwargs.pop("max_pixels", MAX_PIXELS), **kwargs).png)


def floor_mean(rgb: np.ndarray) -> np.ndarray:
    """floor((R + G + B) / 3) in integers wide enough not to overflow: the definition itself."""
    return (rgb[..., :3].astype(np.uint16).sum(axis=-1) // 3).astype(np.uint8)


def decoded_rgb(data: bytes) -> np.ndarray:
    """The RGB Pillow decodes from ``data``: the reference for lossy or non-RGB sources."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def from_array(values: np.ndarray, mode: str) -> Image.Image:
    """An image of ``mode`` holding exactly ``values`` (for modes numpy cannot name)."""
    height, width = values.shape[:2]
    return Image.frombytes(mode, (width, height), values.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def black_bilevel_png(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A valid all-black 1-bit PNG, built in milliseconds however large it claims to be.

    Deflate forgets its history at a full flush, so each further block of identical rows
    compresses to the very same bytes: compress one block, repeat it. ``rows`` stops the
    pixel data early (a truncated file) while the header keeps the full size.
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then 0-bits: black
    per_block = next(n for n in (1000, 100, 10, 1) if height % n == 0)
    block = row * per_block
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks = height // per_block if rows is None else rows // per_block
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    stream = b"\x78\xda" + deflated * blocks
    if rows is None:
        stream += compressor.flush() + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", stream)
        + (png_chunk(b"IEND", b"") if rows is None else b"")
    )


# --- the formula ------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 7), (101, 67), (640, 480), (1023, 17)])
def test_gray_is_the_floor_of_the_mean_of_rgb(width: int, height: int) -> None:
    rgb = np.random.default_rng(width * height).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mode, gray = gray_of(encode(Image.fromarray(rgb), "PNG"))
    assert mode == "L"
    np.testing.assert_array_equal(gray, floor_mean(rgb))


def test_gray_is_exact_for_all_16_million_rgb_triples() -> None:
    # Every (R, G, B) once, as a 4096x4096 image: the matrix conversion the module relies
    # on is float arithmetic, so only an exhaustive check proves it equals the floor.
    codes = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([codes >> 16, (codes >> 8) & 0xFF, codes & 0xFF], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    bmp = encode(Image.fromarray(rgb), "BMP")  # uncompressed: quick to write and to read
    mode, gray = gray_of(bmp, compress_level=1)
    assert mode == "L"
    np.testing.assert_array_equal(gray, floor_mean(rgb))


def test_gray_is_the_mean_not_luma() -> None:
    # ITU-R 601 luma (Pillow's plain convert("L")) would give 76, 150 and 29.
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 254]]], dtype=np.uint8)
    assert gray_of(encode(Image.fromarray(rgb), "PNG"))[1].tolist() == [[85, 85, 85, 254]]


# --- every mode -------------------------------------------------------------------------


def test_l_stays_as_is() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mode, gray = gray_of(encode(Image.fromarray(values), "PNG"))
    assert mode == "L"
    np.testing.assert_array_equal(gray, values)


def test_bilevel_becomes_black_and_white() -> None:
    image = Image.new("1", (3, 1))
    image.putpixel((1, 0), 1)
    assert gray_of(encode(image, "PNG"))[1].tolist() == [[0, 255, 0]]


def test_rgba_keeps_alpha_as_la() -> None:
    image = photo(37, 23, seed=1, mode="RGBA")
    mode, gray = gray_of(encode(image, "PNG"))
    assert mode == "LA"
    rgba = np.asarray(image)
    np.testing.assert_array_equal(gray[..., 0], floor_mean(rgba))
    np.testing.assert_array_equal(gray[..., 1], rgba[..., 3])


def test_la_is_kept_as_is() -> None:
    values = np.random.default_rng(2).integers(0, 256, size=(9, 11, 2), dtype=np.uint8)
    mode, gray = gray_of(encode(from_array(values, "LA"), "PNG"))
    assert mode == "LA"
    np.testing.assert_array_equal(gray, values)


def test_palette_without_transparency_becomes_l() -> None:
    image = photo(40, 30, seed=3).quantize(64)
    mode, gray = gray_of(encode(image, "PNG"))
    assert mode == "L"
    np.testing.assert_array_equal(gray, floor_mean(np.asarray(image.convert("RGB"))))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_keeps_alpha_as_la(fmt: str) -> None:
    image = Image.new("P", (4, 1))
    image.putpalette([30, 60, 91, 200, 100, 0, 255, 255, 255])
    for x, index in enumerate([0, 1, 2, 1]):
        image.putpixel((x, 0), index)
    mode, gray = gray_of(encode(image, fmt, transparency=1))
    assert mode == "LA"
    assert gray[0].tolist() == [[60, 255], [100, 0], [255, 255], [100, 0]]


def test_rgb_with_transparency_key_keeps_alpha_as_la() -> None:
    rgb = np.array([[[1, 2, 3], [40, 50, 61], [1, 2, 3]]], dtype=np.uint8)
    mode, gray = gray_of(encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)))
    assert mode == "LA"
    assert gray[0].tolist() == [[2, 0], [50, 255], [2, 0]]


def test_l_with_transparency_key_keeps_alpha_as_la() -> None:
    values = np.array([[7, 8, 7, 200]], dtype=np.uint8)
    mode, gray = gray_of(encode(Image.fromarray(values), "PNG", transparency=7))
    assert mode == "LA"
    assert gray[0].tolist() == [[7, 0], [8, 255], [7, 0], [200, 255]]


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF")],
)
def test_other_colour_spaces_go_through_rgb(mode: str, fmt: str) -> None:
    data = encode(photo(33, 21, seed=4).convert(mode), fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode  # the test exercises the mode it names
    out_mode, gray = gray_of(data)
    assert out_mode == "L"
    np.testing.assert_array_equal(gray, floor_mean(decoded_rgb(data)))


def test_jpeg_photo_is_exact_against_its_decoded_rgb() -> None:
    data = encode(photo(129, 65, seed=5), "JPEG", quality=90)
    np.testing.assert_array_equal(gray_of(data)[1], floor_mean(decoded_rgb(data)))


SIXTEEN_BIT = np.array([[0, 255, 256, 30000, 65535]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = [[0, 0, 1, 117, 255]]  # v >> 8: scaled, not clipped to white


def test_16_bit_png_is_scaled_not_clipped() -> None:
    data = encode(from_array(SIXTEEN_BIT.astype("<u2"), "I;16"), "PNG")
    mode, gray = gray_of(data)
    assert mode == "L"
    assert gray.tolist() == SIXTEEN_BIT_AS_8


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16_bit_tiff_of_either_byte_order_is_scaled(mode: str, dtype: str) -> None:
    data = encode(from_array(SIXTEEN_BIT.astype(dtype), mode), "TIFF")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode
    assert gray_of(data)[1].tolist() == SIXTEEN_BIT_AS_8


def test_16_bit_with_transparency_key_keeps_alpha_as_la() -> None:
    data = encode(from_array(SIXTEEN_BIT.astype("<u2"), "I;16"), "PNG", transparency=30000)
    mode, gray = gray_of(data)
    assert mode == "LA"
    assert gray[0].tolist() == [[0, 255], [0, 255], [1, 255], [117, 0], [255, 255]]


@needs_peak_rss
def test_16_bit_with_transparency_key_is_converted_without_wide_temporaries(tmp_path) -> None:
    # 16 MP: the decoded source takes 2 bytes a pixel and the LA result 4; the 8-bit gray and
    # the alpha mask take 1 each. An int64 temporary alone would take 8 more.
    values = np.zeros((4000, 4000), dtype="<u2")
    values[0, :3] = [1, 30000, 65535]
    path = tmp_path / "deep.png"
    path.write_bytes(encode(from_array(values, "I;16"), "PNG", transparency=30000))
    assert conversion_peak(path) <= 10 * values.size


def test_32_bit_integer_is_scaled_then_clipped() -> None:
    values = np.array([[-5, 0, 256, 30000, 65535, 70000]], dtype="<i4")
    data = encode(from_array(values, "I"), "TIFF")
    assert gray_of(data)[1].tolist() == [[0, 0, 1, 117, 255, 255]]


def test_float_is_clipped_to_the_8_bit_range() -> None:
    values = np.array([[-5.0, 0.5, 1.99, 117.0, 254.6, 300.0]], dtype="<f4")
    data = encode(from_array(values, "F"), "TIFF")
    assert gray_of(data)[1].tolist() == [[0, 0, 1, 117, 254, 255]]


# --- animations and orientation ---------------------------------------------------------

FRAME_COLOURS = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]


def animation(fmt: str, **params) -> bytes:
    frames = [Image.new("RGB", (6, 4), colour) for colour in FRAME_COLOURS]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames == len(frames)
    return data


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("GIF", {}),
        ("PNG", {}),  # APNG
        pytest.param(
            "WEBP",
            {"lossless": True},
            marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP"),
        ),
    ],
)
def test_animation_keeps_its_first_frame(fmt: str, params: dict) -> None:
    result = to_grayscale(animation(fmt, **params), max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (6, 4)
    _, gray = decode_png(result.png)
    assert (gray[..., 0] if gray.ndim == 3 else gray).tolist() == [[85] * 6] * 4  # red: 255 // 3


def exif_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 48x16 JPEG stored sideways with EXIF ``orientation``, and its stored RGB."""
    stored = photo(48, 16, seed=6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    return data, decoded_rgb(data)


@pytest.mark.parametrize(("orientation", "quarter_turns"), [(6, -1), (8, 1)])
def test_exif_orientation_makes_the_image_upright(orientation: int, quarter_turns: int) -> None:
    # Orientation 6 means "turn 90° clockwise to view", 8 "90° counter-clockwise".
    data, stored_rgb = exif_jpeg(orientation)
    result = to_grayscale(data, max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (16, 48)
    _, gray = decode_png(result.png)
    np.testing.assert_array_equal(gray, np.rot90(floor_mean(stored_rgb), k=quarter_turns))


def test_upright_image_is_left_as_stored() -> None:
    data, stored_rgb = exif_jpeg(1)
    result = to_grayscale(data, max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (48, 16)
    np.testing.assert_array_equal(decode_png(result.png)[1], floor_mean(stored_rgb))


# --- the PNG we store -------------------------------------------------------------------


def test_result_is_a_png_with_the_upright_size() -> None:
    result = to_grayscale(encode(photo(64, 48, seed=7), "JPEG"), max_pixels=MAX_PIXELS)
    assert isinstance(result, GrayImage)
    assert result.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (result.width, result.height) == (64, 48)
    with Image.open(io.BytesIO(result.png)) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (64, 48))


def test_compress_level_is_honoured() -> None:
    data = encode(photo(200, 150, seed=8), "PNG")
    stored = to_grayscale(data, max_pixels=MAX_PIXELS, compress_level=0).png
    squeezed = to_grayscale(data, max_pixels=MAX_PIXELS, compress_level=9).png
    assert len(stored) > len(squeezed)
    assert decode_png(stored)[1].tolist() == decode_png(squeezed)[1].tolist()


def test_source_metadata_is_not_copied_into_the_png() -> None:
    # An sRGB (RGB) ICC profile would be invalid in a grayscale PNG.
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(photo(20, 10, seed=9), "JPEG", icc_profile=profile)
    with Image.open(io.BytesIO(to_grayscale(data, max_pixels=MAX_PIXELS).png)) as image:
        assert "icc_profile" not in image.info


def test_rejects_a_compress_level_zlib_does_not_have() -> None:
    with pytest.raises(ValueError, match="compress_level"):
        to_grayscale(encode(photo(2, 2, seed=10), "PNG"), max_pixels=MAX_PIXELS, compress_level=10)


# --- decompression bombs ----------------------------------------------------------------


def test_bilevel_png_builder_makes_real_images() -> None:
    # The bomb tests below trust this builder: a small one must decode to what it claims.
    with Image.open(io.BytesIO(black_bilevel_png(3000, 2000))) as image:
        image.load()
        assert (image.mode, image.size, image.getextrema()) == ("1", (3000, 2000), (0, 0))


def test_decompression_bomb_is_refused_without_decoding(monkeypatch) -> None:
    bomb = black_bilevel_png(40_000, 40_000)  # 1.6 gigapixels in ~200 KB
    assert len(bomb) < 1_000_000
    decoded: list[tuple[int, int]] = []

    def load(image: Image.Image):  # a decode of any frame would pass here first
        decoded.append(image.size)
        raise AssertionError(f"a {image.size} image was decoded")

    monkeypatch.setattr(Image.Image, "load", load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(TooManyPixels, match="too many pixels"):
        to_grayscale(bomb, max_pixels=MAX_PIXELS)
    assert decoded == []


def test_more_pixels_than_max_pixels_is_refused_with_the_size() -> None:
    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(black_bilevel_png(4000, 3000), max_pixels=11_999_999)
    assert refused.value.reason == "too many pixels: 4000x3000"
    assert to_grayscale(black_bilevel_png(4000, 3000), max_pixels=12_000_000).width == 4000


def test_size_is_checked_from_the_header_before_any_pixel_is_read() -> None:
    # Only the header and 10 of 3000 rows: decoding it would be a TruncatedImage.
    header_only = black_bilevel_png(4000, 3000, rows=10)
    with pytest.raises(TooManyPixels, match="4000x3000"):
        to_grayscale(header_only, max_pixels=1_000_000)
    with pytest.raises(TruncatedImage):
        to_grayscale(header_only, max_pixels=MAX_PIXELS)


PILLOW_GUARD = Image.MAX_IMAGE_PIXELS  # 89,478,485 unless something raised it


@pytest.fixture
def pillow_guard(monkeypatch) -> None:
    """Put Pillow's process-wide guard back as it was once the test is over."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def test_max_pixels_above_pillows_own_guard_is_honoured(pillow_guard) -> None:
    # 100 MP: over Pillow's 89,478,485 but within the limit set, as for a large scan.
    assert PILLOW_GUARD is not None and PILLOW_GUARD < 10_000 * 10_000
    result = to_grayscale(black_bilevel_png(10_000, 10_000), max_pixels=120_000_000, compress_level=1)
    assert (result.width, result.height) == (10_000, 10_000)


def test_max_pixels_above_twice_pillows_guard_is_honoured(pillow_guard) -> None:
    # 182 MP, past where Pillow's guard raises instead of warning: only the header and 10 rows,
    # so getting as far as loading the pixels (and finding them cut short) is the proof.
    header_only = black_bilevel_png(13_500, 13_500, rows=10)
    with pytest.raises(TruncatedImage):
        to_grayscale(header_only, max_pixels=200_000_000)


# Pillow warns of any size over its guard, now ours, before we refuse it.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_over_a_max_pixels_above_pillows_guard_is_still_refused_with_the_size(pillow_guard) -> None:
    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(black_bilevel_png(11_000, 11_000, rows=10), max_pixels=120_000_000)
    assert refused.value.reason == "too many pixels: 11000x11000"


def test_pillow_guard_is_left_untouched_by_a_limit_below_it(pillow_guard) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(TooManyPixels):
        to_grayscale(black_bilevel_png(40_000, 40_000), max_pixels=MAX_PIXELS)
    to_grayscale(black_bilevel_png(100, 100), max_pixels=MAX_PIXELS)
    assert before == Image.MAX_IMAGE_PIXELS


def test_pillow_guard_is_only_ever_raised_to_the_largest_limit_used(pillow_guard) -> None:
    # Pillow reads its guard from a module global on every check: lowering it again for a
    # smaller limit would refuse the larger limit's images in another thread.
    to_grayscale(black_bilevel_png(100, 100), max_pixels=150_000_000)
    assert Image.MAX_IMAGE_PIXELS == 150_000_000
    to_grayscale(black_bilevel_png(100, 100), max_pixels=MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == 150_000_000
    # Our own limit is still exact for the smaller one.
    with pytest.raises(TooManyPixels, match="8000x8000"):
        to_grayscale(black_bilevel_png(8_000, 8_000, rows=10), max_pixels=MAX_PIXELS)


# --- bytes that are not (whole) images --------------------------------------------------


def test_empty_body_is_not_an_image() -> None:
    with pytest.raises(NotAnImage) as refused:
        to_grayscale(b"", max_pixels=MAX_PIXELS)
    assert refused.value.reason == "empty body"


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html><body><img src='cat.png'></body></html>",
        b'{"error": "not found"}',
        np.random.default_rng(11).bytes(4096),
        b"\x00",
    ],
    ids=["html", "json", "random", "one-byte"],
)
def test_bytes_that_are_no_image_are_not_an_image(body: bytes) -> None:
    with pytest.raises(NotAnImage) as refused:
        to_grayscale(body, max_pixels=MAX_PIXELS)
    assert refused.value.reason == "not an image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP"])
def test_truncated_image_is_a_truncated_image(fmt: str) -> None:
    data = encode(photo(120, 80, seed=12), fmt)
    with pytest.raises(TruncatedImage):
        to_grayscale(data[: len(data) // 2], max_pixels=MAX_PIXELS)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_truncated_webp_is_a_truncated_image() -> None:
    # Pillow's WebP decoder needs the whole file to open, so this one fails at the header.
    data = encode(photo(120, 80, seed=13), "WEBP")
    with pytest.raises(TruncatedImage):
        to_grayscale(data[: len(data) // 2], max_pixels=MAX_PIXELS)


# Pillow warns about the corrupt structures it skips; the point here is what gets raised.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "ICO"])
def test_damaged_bytes_only_ever_raise_image_errors(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    data = encode(photo(48, 32, seed=14), fmt)
    rng = np.random.default_rng(15)
    for _ in range(60):
        damaged = bytearray(data[: rng.integers(1, len(data) + 1)])
        for position in rng.integers(0, len(damaged), size=rng.integers(0, 8)):
            damaged[position] = rng.integers(0, 256)
        try:
            result = to_grayscale(bytes(damaged), max_pixels=MAX_PIXELS)
        except ImageError:
            continue
        assert decode_png(result.png)[0] in ("L", "LA")


# --- formats (IMAGE_FORMATS) ------------------------------------------------------------

WEB_FORMATS = ["JPEG", "PNG", "GIF", "WEBP", "BMP", "ICO", "TIFF", "MPO", "AVIF"]
#: Formats Pillow decodes and writes, outside the default, that carry a signature to be named by.
OTHER_FORMATS = ["SGI", "PCX", "DDS", "QOI", "PPM", "XBM", "MSP", "ICNS", "DIB", "JPEG2000"]
_CODECS = {"WEBP": "webp", "AVIF": "avif", "JPEG2000": "jpg_2000"}


def allowed(spec: str) -> frozenset[str]:
    """The formats ``IMAGE_FORMATS=spec`` allows."""
    return load_settings({"IMAGE_FORMATS": spec}).allowed_image_formats


def writable(formats: list[str]) -> list:
    """``formats`` as parameters, each skipped when this Pillow lacks its codec."""
    return [
        pytest.param(
            fmt,
            marks=pytest.mark.skipif(
                fmt in _CODECS and not features.check(_CODECS[fmt]), reason=f"Pillow built without {fmt}"
            ),
        )
        for fmt in formats
    ]


@pytest.fixture
def parsed_by() -> list[str]:
    """The formats whose plugin parsed a body (their opener ran), in order.

    Each opener Pillow has is wrapped to note its name and then run as it is: what decodes
    is Pillow's own code, the test only sees which of it was reached.
    """
    Image.init()
    reached: list[str] = []
    originals = dict(Image.OPEN)
    for name, (factory, accept) in originals.items():

        def noting(fp, filename, *, _name=name, _factory=factory):
            reached.append(_name)
            return _factory(fp, filename)

        Image.OPEN[name] = (noting, accept)
    yield reached
    Image.OPEN.clear()
    Image.OPEN.update(originals)


@pytest.mark.parametrize("fmt", writable(WEB_FORMATS))
def test_the_webs_formats_are_decoded_by_default(fmt: str) -> None:
    data = in_format(fmt, seed=30)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt  # the test exercises the format it names
    result = to_grayscale(data, max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (24, 16)
    np.testing.assert_array_equal(decode_png(result.png)[1], floor_mean(decoded_rgb(data)))


@pytest.mark.parametrize("fmt", writable(OTHER_FORMATS))
def test_a_real_image_outside_the_default_is_an_unsupported_format_never_parsed(fmt, parsed_by) -> None:
    data = in_format(fmt, seed=31)
    with pytest.raises(UnsupportedFormat) as refused:
        to_grayscale(data, max_pixels=MAX_PIXELS)
    assert refused.value.reason == f"unsupported format {fmt}"
    assert fmt not in parsed_by


@pytest.mark.parametrize("fmt", writable([*OTHER_FORMATS, "TGA", "SPIDER"]))
def test_all_decodes_every_format(fmt: str) -> None:
    data = in_format(fmt, seed=32)
    result = to_grayscale(data, max_pixels=MAX_PIXELS, formats=allowed("all"))
    with Image.open(io.BytesIO(data)) as image:
        assert (result.width, result.height) == image.size  # 24x16 but for ICNS, always 1024²
    gray = decode_png(result.png)[1]
    if fmt not in ("SPIDER", "ICNS"):  # floats are clipped, not meaned; ICNS keeps its alpha
        np.testing.assert_array_equal(gray, floor_mean(decoded_rgb(data)))


def test_a_format_without_a_signature_is_not_an_image_when_not_allowed(parsed_by) -> None:
    # Naming SPIDER would take running its parser on the bytes, which not allowing it forbids.
    with pytest.raises(NotAnImage) as refused:
        to_grayscale(in_format("SPIDER", seed=33), max_pixels=MAX_PIXELS)
    assert refused.value.reason == "not an image"
    assert "SPIDER" not in parsed_by


def test_only_the_formats_listed_are_decoded(parsed_by) -> None:
    formats = allowed("png")
    assert to_grayscale(in_format("PNG", seed=34), max_pixels=MAX_PIXELS, formats=formats).width == 24
    for fmt in ("JPEG", "GIF", "BMP"):
        with pytest.raises(UnsupportedFormat) as refused:
            to_grayscale(in_format(fmt, seed=34), max_pixels=MAX_PIXELS, formats=formats)
        assert refused.value.reason == f"unsupported format {fmt}"
    assert parsed_by == ["PNG"]


def test_a_multi_picture_jpeg_is_refused_when_only_jpeg_is_listed() -> None:
    # Pillow opens both with its JPEG plugin and only then knows which one it has.
    formats = allowed("JPEG")
    assert to_grayscale(in_format("JPEG", seed=35), max_pixels=MAX_PIXELS, formats=formats).width == 24
    with pytest.raises(UnsupportedFormat) as refused:
        to_grayscale(in_format("MPO", seed=35), max_pixels=MAX_PIXELS, formats=formats)
    assert refused.value.reason == "unsupported format MPO"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"


@pytest.mark.parametrize(
    "formats",
    [None, "all", frozenset({"EPS", "PNG"})],
    ids=["default", "all", "passed by name, past the settings"],
)
@pytest.mark.parametrize("body", [EPS, in_format("EPS", seed=36)], ids=["hand-written", "written by Pillow"])
def test_postscript_is_never_handed_to_ghostscript(body: bytes, formats, parsed_by) -> None:
    chosen = {} if formats is None else {"formats": allowed(formats) if formats == "all" else formats}
    with pytest.raises(UnsupportedFormat) as refused:
        to_grayscale(body, max_pixels=MAX_PIXELS, **chosen)
    assert refused.value.reason == "unsupported format EPS"
    assert "EPS" not in parsed_by


def test_unsupported_format_is_an_image_error() -> None:
    assert issubclass(UnsupportedFormat, ImageError)
    assert UnsupportedFormat("SGI").transient is False


# --- decode memory ----------------------------------------------------------------------


def flat_image(mode: str, side: int, fmt: str, **params) -> bytes:
    """A ``side``² image of ``mode`` in ``fmt``: black but for a few pixels, so quick to build."""
    image = Image.new(mode, (side, side))
    for x in range(1, 8):
        image.putpixel((x, 0), x if len(image.getbands()) == 1 else (x,) * len(image.getbands()))
    if mode == "P":
        image.putpalette(bytes(range(256)) * 3)
    return encode(image, fmt, **params)


#: Sources whose conversions take different paths: colour and alpha, CMYK, a palette
#: made RGBA by its tRNS chunk, 16 bits with a key, gray as is.
PEAK_CASES = {
    "RGBA PNG": ("RGBA", "PNG", {}),
    "CMYK JPEG": ("CMYK", "JPEG", {}),
    "P PNG, tRNS": ("P", "PNG", {"transparency": 1}),
    "I;16 PNG, tRNS key": ("I;16", "PNG", {"transparency": 30000}),
    "L PNG": ("L", "PNG", {}),
}


@needs_peak_rss
@pytest.mark.parametrize("name", list(PEAK_CASES))
def test_the_estimate_covers_the_measured_peak(name: str, tmp_path) -> None:
    mode, fmt, params = PEAK_CASES[name]
    path = tmp_path / f"source.{fmt.lower()}"
    path.write_bytes(flat_image(mode, 3000, fmt, **params))
    with Image.open(path) as header:
        assert header.mode == mode
        estimate = estimated_decode_bytes(header)
    assert estimate >= conversion_peak(path)


def test_the_estimate_reads_the_header_only() -> None:
    # Images cut short after their header: loading them would raise, estimating them must not.
    data = flat_image("RGBA", 3000, "PNG")
    with Image.open(io.BytesIO(data[: len(data) // 2])) as header:
        assert estimated_decode_bytes(header) >= 3000 * 3000 * 4
    with Image.open(io.BytesIO(black_bilevel_png(4000, 3000, rows=10))) as header:
        assert estimated_decode_bytes(header) >= 4000 * 3000


class Holder:
    """A thread that reserves ``nbytes`` of ``budget`` and holds them until told to let go."""

    def __init__(self, budget: DecodeBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.budget.reserve(self.nbytes):
                self.entered.set()
                self.release.wait()
        except BaseException as exc:
            self.error = exc

    def holds(self) -> bool:
        """Wait until it holds its reservation; False if it never does (a liveness guard, not a timing)."""
        return self.entered.wait(30)

    def let_go(self) -> None:
        self.release.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_reservations_that_fit_together_are_held_at_once() -> None:
    budget = DecodeBudget(100)
    first, second = Holder(budget, 40), Holder(budget, 60)
    assert first.holds() and second.holds()
    assert budget.reserved_bytes == 100
    first.let_go()
    second.let_go()
    assert budget.reserved_bytes == 0


def test_a_reservation_waits_until_an_earlier_one_makes_room() -> None:
    budget = DecodeBudget(100)
    first = Holder(budget, 60)
    assert first.holds()
    second = Holder(budget, 60)
    wait_until(lambda: budget.waiting == 1, "the conversion to wait")
    assert not second.entered.is_set()
    assert budget.reserved_bytes == 60

    first.let_go()

    assert second.holds()
    assert (budget.reserved_bytes, budget.waiting) == (60, 0)
    second.let_go()


def test_a_reservation_larger_than_the_limit_waits_for_the_others_then_runs_alone() -> None:
    budget = DecodeBudget(100)
    small = Holder(budget, 30)
    assert small.holds()
    huge = Holder(budget, 150)
    wait_until(lambda: budget.waiting == 1, "the conversion to wait")
    # First come, first served: this one would fit beside the small one, but waits its turn.
    late = Holder(budget, 10)
    wait_until(lambda: budget.waiting == 2, "the next one to queue behind the huge one")

    small.let_go()

    assert huge.holds()
    assert (budget.reserved_bytes, budget.waiting) == (150, 1)
    assert not late.entered.is_set()
    huge.let_go()
    assert late.holds()
    late.let_go()
    assert budget.reserved_bytes == 0
    assert (small.error, huge.error, late.error) == (None, None, None)


def test_a_reservation_larger_than_the_limit_does_not_wait_when_nothing_else_is_held() -> None:
    budget = DecodeBudget(100)
    huge = Holder(budget, 10**12)
    assert huge.holds()
    huge.let_go()
    assert budget.reserved_bytes == 0


def test_a_reservation_is_released_when_its_block_raises() -> None:
    budget = DecodeBudget(100)
    with pytest.raises(RuntimeError, match="decoder died"), budget.reserve(100):
        raise RuntimeError("decoder died")
    assert budget.reserved_bytes == 0
    after = Holder(budget, 100)
    assert after.holds()
    after.let_go()


class Interrupted(Exception):
    """Raised inside a waiting thread, as Dramatiq's time limit raises TimeLimitExceeded."""


def test_a_wait_interrupted_by_a_time_limit_leaves_its_place_in_the_queue() -> None:
    budget = DecodeBudget(100)
    first, second = Holder(budget, 30), Holder(budget, 60)
    assert first.holds() and second.holds()
    interrupted = Holder(budget, 50)
    wait_until(lambda: budget.waiting == 1, "the conversion to wait")
    # How dramatiq.middleware.TimeLimit interrupts a worker thread. It is raised once the
    # thread runs again: woken when ``first`` lets go, with still no room for it (60 + 50 > 100).
    assert interrupted.thread.ident is not None
    raised = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(interrupted.thread.ident), ctypes.py_object(Interrupted)
    )
    assert raised == 1
    first.let_go()
    interrupted.thread.join(30)

    assert isinstance(interrupted.error, Interrupted)
    assert (budget.reserved_bytes, budget.waiting) == (60, 0)
    # Nothing is stuck behind the interrupted one.
    after = Holder(budget, 40)
    assert after.holds()
    after.let_go()
    second.let_go()


def test_a_budget_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="limit_bytes"):
        DecodeBudget(0)


BUDGET_SOURCES = {
    "RGBA PNG": lambda: encode(photo(64, 48, seed=20, mode="RGBA"), "PNG"),
    "CMYK JPEG": lambda: encode(photo(64, 48, seed=21).convert("CMYK"), "JPEG"),
    "16-bit PNG, tRNS key": lambda: encode(
        from_array(SIXTEEN_BIT.astype("<u2"), "I;16"), "PNG", transparency=30000
    ),
    "rotated JPEG": lambda: exif_jpeg(6)[0],
}


@pytest.mark.parametrize("name", list(BUDGET_SOURCES))
@pytest.mark.parametrize("limit", [1, 10**9], ids=["over the limit", "within the limit"])
def test_a_budget_changes_nothing_in_the_result(name: str, limit: int) -> None:
    data = BUDGET_SOURCES[name]()
    budget = DecodeBudget(limit)
    assert to_grayscale(data, max_pixels=MAX_PIXELS, budget=budget) == to_grayscale(
        data, max_pixels=MAX_PIXELS
    )
    assert budget.reserved_bytes == 0


class RecordingBudget(DecodeBudget):
    """A roomy budget that remembers what was asked of it."""

    def __init__(self) -> None:
        super().__init__(10**12)
        self.requests: list[int] = []

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        self.requests.append(nbytes)
        with super().reserve(nbytes):
            yield


def test_the_estimate_is_held_from_loading_the_pixels_to_encoding_the_png(monkeypatch) -> None:
    data = encode(photo(64, 48, seed=22, mode="RGBA"), "PNG")
    with Image.open(io.BytesIO(data)) as header:
        estimate = estimated_decode_bytes(header)
    budget = RecordingBudget()
    held_at: dict[str, int] = {}
    load, save = ImageFile.ImageFile.load, Image.Image.save

    def recording_load(image, *args, **kwargs):
        held_at.setdefault("load", budget.reserved_bytes)
        return load(image, *args, **kwargs)

    def recording_save(image, *args, **kwargs):
        held_at["save"] = budget.reserved_bytes
        return save(image, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    monkeypatch.setattr(Image.Image, "save", recording_save)
    to_grayscale(data, max_pixels=MAX_PIXELS, budget=budget)

    assert budget.requests == [estimate]
    assert held_at == {"load": estimate, "save": estimate}
    assert budget.reserved_bytes == 0


def test_an_oversized_image_is_refused_without_reserving_or_waiting() -> None:
    budget = RecordingBudget()
    full = Holder(budget, budget.limit_bytes)  # no room left: a reservation would wait
    assert full.holds()
    with pytest.raises(TooManyPixels):
        to_grayscale(black_bilevel_png(40_000, 40_000), max_pixels=MAX_PIXELS, budget=budget)
    assert budget.requests == [budget.limit_bytes]
    full.let_go()


def test_a_corrupt_image_gives_its_reservation_back() -> None:
    budget = RecordingBudget()
    data = encode(photo(120, 80, seed=23), "PNG")
    with pytest.raises(TruncatedImage):
        to_grayscale(data[: len(data) // 2], max_pixels=MAX_PIXELS, budget=budget)
    assert len(budget.requests) == 1
    assert budget.reserved_bytes == 0


# --- ICO: Pillow decodes the largest frame inside open() ---------------------------------


def _ico(frame: bytes, listed: tuple[int, int] = (16, 16)) -> bytes:
    """An ICO of one frame whose directory entry claims ``listed`` (as any entry can)."""
    entry = struct.pack("<BBBBHHII", listed[0] % 256, listed[1] % 256, 0, 0, 1, 32, len(frame), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + frame


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR for ``width`` × ``height`` RGBA, then a few bytes of nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + bytes(16)


@pytest.mark.parametrize(
    "frame",
    [
        _png_header_only(3000, 3000),
        struct.pack("<IiiHH", 40, 3000, 6000, 1, 32) + bytes(24),  # a BMP frame: XOR 3000×3000 + AND mask
    ],
    ids=["png frame", "bmp frame"],
)
def test_an_ico_frame_larger_than_max_pixels_is_refused_from_its_own_header(frame: bytes):
    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(_ico(frame), max_pixels=1_000_000, formats={"ICO"})

    assert refused.value.reason == "too many pixels: 3000x3000"


def test_an_ico_frame_is_reserved_at_its_real_size_before_it_is_decoded(monkeypatch: pytest.MonkeyPatch):
    picture = photo(600, 400, seed=3, mode="RGBA")
    data = _ico(encode(picture, "PNG"))  # the directory says 16×16
    events: list[tuple[str, int]] = []
    real_getdecoder = Image._getdecoder
    monkeypatch.setattr(
        Image, "_getdecoder", lambda *args: events.append(("decode", 0)) or real_getdecoder(*args)
    )
    budget = DecodeBudget(64 * 1024 * 1024)
    real_reserve = budget.reserve
    monkeypatch.setattr(
        budget, "reserve", lambda nbytes: events.append(("reserve", nbytes)) or real_reserve(nbytes)
    )

    mode, pixels = gray_of(data, budget=budget, formats={"ICO"})

    assert events[0][0] == "reserve" and events[0][1] >= 600 * 400 * 4
    assert [kind for kind, _ in events].count("reserve") == 1
    assert mode == "LA"
    assert pixels.shape[:2] == (400, 600)


# --- what make mutate found untested --------------------------------------------------------


def test_a_budget_makes_pillow_allocate_in_blocks_of_64_mb() -> None:
    before = Image.core.get_block_size()
    try:
        Image.core.set_block_size(16 * 1024 * 1024)  # Pillow's own default
        DecodeBudget(1)
        assert Image.core.get_block_size() == 64 * 1024 * 1024
    finally:
        Image.core.set_block_size(before)


def _formula(width: int, height: int, bands: int, itemsize: int, factor: float) -> int:
    return math.ceil(width * height * bands * itemsize * factor) + imaging._CONVERSION_OVERHEAD


def test_the_estimate_is_the_decoded_size_times_the_factor_measured_for_the_mode() -> None:
    with Image.open(io.BytesIO(encode(photo(100, 50, seed=30), "PNG"))) as header:
        assert estimated_decode_bytes(header) == _formula(
            100, 50, 3, 1, imaging._PEAK_FACTORS[("RGB", False)]
        )
    sixteen = encode(from_array(SIXTEEN_BIT.astype("<u2"), "I;16"), "PNG")
    with Image.open(io.BytesIO(sixteen)) as header:
        height, width = SIXTEEN_BIT.shape
        assert estimated_decode_bytes(header) == _formula(
            width, height, 1, 2, imaging._PEAK_FACTORS[("I;16", False)]
        )


def test_a_mode_never_measured_is_estimated_as_the_costliest() -> None:
    image = Image.new("RGBX", (30, 20))
    assert ("RGBX", False) not in imaging._PEAK_FACTORS
    assert estimated_decode_bytes(image) == _formula(30, 20, 4, 1, max(imaging._PEAK_FACTORS.values()))


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_is_estimated_with_its_decoders_own_factor() -> None:
    with Image.open(io.BytesIO(encode(photo(100, 50, seed=31), "WEBP"))) as header:
        assert header.mode == "RGB"
        expected = _formula(100, 50, 3, 1, imaging._FORMAT_PEAK_FACTORS[("WEBP", "RGB", False)])
        assert estimated_decode_bytes(header) == expected


def test_a_bomb_found_while_opening_is_too_many_pixels_by_that_name() -> None:
    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(black_bilevel_png(40_000, 40_000), max_pixels=MAX_PIXELS)
    assert refused.value.reason == "too many pixels"


def test_a_bomb_found_while_loading_is_too_many_pixels_by_that_name(monkeypatch) -> None:
    def bomb(image, *args, **kwargs):
        raise Image.DecompressionBombError("a frame larger than the image said")

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)
    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(encode(photo(20, 10, seed=32), "PNG"), max_pixels=MAX_PIXELS)
    assert refused.value.reason == "too many pixels"


def test_a_recognised_image_that_its_decoder_cannot_open_is_a_corrupt_image() -> None:
    with pytest.raises(TruncatedImage) as refused:
        to_grayscale(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5, max_pixels=MAX_PIXELS)
    assert refused.value.reason == "corrupt image"


def test_one_of_our_formats_with_a_broken_header_is_not_an_image_not_an_unsupported_one() -> None:
    ihdr = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
    broken = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + b"\0\0\0\0"  # bad CRC
    with pytest.raises(NotAnImage) as refused:
        to_grayscale(broken, max_pixels=MAX_PIXELS)
    assert refused.value.reason == "not an image"


def _ico_of(frames: list[bytes], listed: list[tuple[int, int]]) -> bytes:
    """An ICO of ``frames``, each listed in the directory with the size given."""
    offset = 6 + 16 * len(frames)
    entries, data = b"", b""
    for frame, (width, height) in zip(frames, listed, strict=True):
        entries += struct.pack(
            "<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(frame), offset + len(data)
        )
        data += frame
    return struct.pack("<HHH", 0, 1, len(frames)) + entries + data


def test_an_ico_is_reserved_for_its_frame_of_most_pixels() -> None:
    # The widest (400×10), the tallest (50×100) and the largest (300×20) are three frames.
    sizes = [(400, 10), (300, 20), (50, 100)]
    data = _ico_of([encode(photo(w, h, seed=33, mode="RGBA"), "PNG") for w, h in sizes], sizes)
    budget = RecordingBudget()

    with contextlib.suppress(ImageError):
        to_grayscale(data, max_pixels=MAX_PIXELS, budget=budget, formats={"ICO"})

    factor = imaging._PEAK_FACTORS[("RGBA", True)]
    assert budget.requests == [math.ceil(300 * 20 * 4 * factor) + imaging._CONVERSION_OVERHEAD]


@pytest.mark.parametrize(
    ("frame", "size"),
    [
        (_png_header_only(3000, 3000), "3000x3000"),
        (struct.pack("<IiiHH", 40, 3000, -6000, 1, 32) + bytes(24), "3000x3000"),  # top-down BMP
        (struct.pack("<IHHHH", 12, 40_000, 2000, 1, 32) + bytes(24), "40000x1000"),  # BITMAPCOREHEADER
    ],
    ids=["png frame", "top-down bmp frame", "os/2 bmp frame"],
)
def test_an_oversized_ico_frame_is_refused_by_its_size_before_any_decoder_runs(
    frame: bytes, size: str, monkeypatch
):
    decoders: list[object] = []
    real_getdecoder = Image._getdecoder
    monkeypatch.setattr(Image, "_getdecoder", lambda *args: decoders.append(args) or real_getdecoder(*args))

    with pytest.raises(TooManyPixels) as refused:
        to_grayscale(_ico(frame), max_pixels=1_000_000, formats={"ICO"})

    assert refused.value.reason == f"too many pixels: {size}"
    assert decoders == []


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_a_format_this_pillow_has_no_codec_for_is_unsupported_by_its_name(monkeypatch) -> None:
    from PIL import WebPImagePlugin

    data = encode(photo(20, 10, seed=34), "WEBP")
    monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)  # as a Pillow built without libwebp
    with pytest.raises(UnsupportedFormat) as refused:
        to_grayscale(data, max_pixels=MAX_PIXELS)
    assert refused.value.reason == UnsupportedFormat("WEBP").reason
