"""Peak memory of ``to_grayscale`` by source mode: the measurements behind ``estimated_decode_bytes``.

Every case is one source mode in one format (RGBA PNG, CMYK JPEG, 16-bit gray PNG with a tRNS
key...), written at each size with each content, once, into a cache directory:

- ``flat``: black but for a few pixels — what a mostly empty scan or diagram costs;
- ``noise``: random values — the worst case for the PNG we write (it does not compress);
- ``rotated``: ``flat`` with EXIF orientation 6, so the upright copy is made too.

Each file is converted in a fresh interpreter (``--measure FILE``), which first warms up on a tiny
image of the same format and mode, then resets the kernel's high-water mark through
``/proc/self/clear_refs``: the conversion's peak is ``VmHWM`` minus the RSS just before it, on
top of the bytes it was given (``tests/support/peak_memory.py``, with which the tests measure
too). Its factor is that peak, less the megabyte ``estimated_decode_bytes`` adds to any image
(decoder and zlib state), over the decoded source: ``width × height × bands × bytes per band``.
The table ends with the largest factor of each (mode, transparency) and what
``estimated_decode_bytes`` reserves for every row: it must never be less than the peak.
Linux only (``/proc``).

``--threads N`` measures something else: whether memory a conversion frees leaves the process.
N threads convert 24 images (six each of RGBA PNG, 16-bit PNG with a tRNS key, CMYK JPEG and
palette PNG with tRNS, ``flat``) through a budget they all exceed, so strictly one at a time; the
peak is shown with Pillow's default 16 MB blocks and with the 64 MB blocks a budget sets.

    .venv/bin/python -m benchmarks.decode_memory                  # 5 sizes, ~12 minutes
    .venv/bin/python -m benchmarks.decode_memory --sides 3000 --only "I;16"
    .venv/bin/python -m benchmarks.decode_memory --threads 8      # 7000², ~2 minutes
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageMode
from tests.support.peak_memory import high_water_mark, measure_conversion, reset_high_water_mark

from image_crawler.imaging import _CONVERSION_OVERHEAD, DecodeBudget, estimated_decode_bytes, to_grayscale

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
#: Bump when the images change, so stale caches are not reused.
VERSION = 1
CONTENTS = ("flat", "noise", "rotated")
#: zlib level of the PNGs we write: the workers' default (PNG_COMPRESS_LEVEL).
COMPRESS_LEVEL = 1
#: Measured factors are rounded up to a quarter, after this margin, for the table in imaging.py.
MARGIN = 1.10
#: Pillow's default block size (PILLOW_BLOCK_SIZE).
PILLOW_DEFAULT_BLOCK = 16 * MB


@dataclass(frozen=True)
class Case:
    """One source mode in one format."""

    name: str
    mode: str
    fmt: str
    #: The value (or colour) made transparent with a tRNS key / GIF transparency, if any.
    transparency: Any = None
    save: dict[str, Any] = field(default_factory=dict)


CASES = (
    Case("RGBA PNG", "RGBA", "PNG"),
    Case("RGB PNG", "RGB", "PNG"),
    Case("RGB PNG, tRNS key", "RGB", "PNG", transparency=(1, 2, 3)),
    Case("RGB JPEG", "RGB", "JPEG", save={"quality": 90}),
    Case("CMYK JPEG", "CMYK", "JPEG", save={"quality": 90}),
    Case("RGB WebP", "RGB", "WEBP", save={"quality": 80, "method": 0}),
    Case("RGBA WebP", "RGBA", "WEBP", save={"quality": 80, "method": 0}),
    # WebP's decoder keeps a copy of the whole file: lossless noise is the largest file there is.
    Case("RGB WebP, lossless", "RGB", "WEBP", save={"lossless": True, "method": 0}),
    Case("RGBA WebP, lossless", "RGBA", "WEBP", save={"lossless": True, "method": 0}),
    Case("P PNG", "P", "PNG"),
    Case("P PNG, tRNS", "P", "PNG", transparency=1),
    Case("P GIF, transparent", "P", "GIF", transparency=1),
    Case("L PNG", "L", "PNG"),
    Case("L PNG, tRNS key", "L", "PNG", transparency=7),
    Case("LA PNG", "LA", "PNG"),
    Case("I;16 PNG", "I;16", "PNG"),
    Case("I;16 PNG, tRNS key", "I;16", "PNG", transparency=30000),
    Case("I;16B TIFF", "I;16B", "TIFF"),
    Case("I TIFF", "I", "TIFF"),
    Case("F TIFF", "F", "TIFF"),
    Case("YCbCr TIFF", "YCbCr", "TIFF"),
    Case("LAB TIFF", "LAB", "TIFF"),
    Case("1 PNG", "1", "PNG"),
)
#: The kinds ``--threads`` converts, six files each.
TURN_CASES = ("RGBA PNG", "I;16 PNG, tRNS key", "CMYK JPEG", "P PNG, tRNS")


def _pixels(mode: str, side: int, content: str, seed: int) -> Image.Image:
    """A ``side``² image of ``mode``: black with a few distinct pixels, or random values."""
    rng = np.random.default_rng(seed)
    layout = ImageMode.getmode(mode)
    if content == "noise":
        if mode == "1":
            return Image.frombytes(mode, (side, side), rng.bytes((side + 7) // 8 * side))
        if mode == "F":
            values = rng.uniform(-10, 300, size=(side, side)).astype("<f4")
            return Image.frombytes(mode, (side, side), values.tobytes())
        if mode == "I":
            values = rng.integers(-1000, 100_000, size=(side, side), dtype="<i4")
            return Image.frombytes(mode, (side, side), values.tobytes())
        size = side * side * len(layout.bands) * np.dtype(layout.typestr).itemsize
        image = Image.frombytes(mode, (side, side), rng.bytes(size))
    else:
        image = Image.new(mode, (side, side))
        for n in range(8):
            image.putpixel((n, 0), 1 if mode == "1" else tuple([1 + n] * len(layout.bands)))
    if mode == "P":
        image.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
    return image


def _encode(case: Case, side: int, content: str) -> bytes:
    image = _pixels(case.mode, side, content, seed=side)
    params = dict(case.save)
    if case.fmt == "PNG":
        params["compress_level"] = 1  # the file's own compression does not change what decoding holds
    if case.transparency is not None:
        params["transparency"] = case.transparency
    if content == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        params["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, case.fmt, **params)
    return buffer.getvalue()


def case_file(case: Case, side: int, content: str, cache_dir: Path) -> Path:
    """The case's file at ``side`` with ``content``, written once into ``cache_dir``."""
    slug = "".join(c if c.isalnum() else "-" for c in case.name).lower()
    path = cache_dir / f"v{VERSION}-{slug}-{side}-{content}.{case.fmt.lower()}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(_encode(case, side, content))
        partial.rename(path)
    return path


@dataclass(frozen=True)
class Measurement:
    """One conversion in a fresh interpreter."""

    case: Case
    side: int
    content: str
    file_bytes: int
    header_mode: str
    transparent: bool
    decoded_bytes: int
    peak_bytes: int
    estimate_bytes: int

    @property
    def factor(self) -> float:
        """Peak over decoded bytes, once the estimate's constant term is set aside."""
        return (self.peak_bytes - _CONVERSION_OVERHEAD) / self.decoded_bytes


def decoded_bytes(image: Image.Image) -> int:
    """width × height × bands × bytes per band of ``image``'s mode."""
    layout = ImageMode.getmode(image.mode)
    return image.width * image.height * len(layout.bands) * np.dtype(layout.typestr).itemsize


def measure(case: Case, side: int, content: str, cache_dir: Path) -> Measurement | None:
    """Convert the case's file in a fresh interpreter and read its peak (None: the format keeps no EXIF)."""
    path = case_file(case, side, content, cache_dir)
    if content == "rotated":
        with Image.open(path) as header:
            if header.getexif().get(0x0112) != 6:
                return None
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_memory", "--measure", str(path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    peak = json.loads(output.strip().splitlines()[-1])["extra"]
    with Image.open(path) as header:
        if case.mode != header.mode:
            raise RuntimeError(f"{case.name}: the file opens as {header.mode}, not {case.mode}")
        return Measurement(
            case,
            side,
            content,
            path.stat().st_size,
            header.mode,
            header.has_transparency_data,
            decoded_bytes(header),
            peak,
            estimated_decode_bytes(header),
        )


def _measure_here(path: Path) -> None:
    """The child: convert ``path`` once and print its peak over the RSS before the call."""
    # As in a worker: a budget also sets Pillow's block size.
    measured = measure_conversion(
        path.read_bytes(), max_pixels=10**9, compress_level=COMPRESS_LEVEL, budget=DecodeBudget(1)
    )
    print(json.dumps(measured))


def _take_turns_here(paths: list[Path], threads: int, pillow_default_blocks: bool) -> None:
    """The child of ``--threads``: convert ``paths`` in ``threads`` threads, one at a time; print the peak."""
    bodies = [path.read_bytes() for path in paths]
    budget = DecodeBudget(1)  # every image is over the limit: each runs alone
    if pillow_default_blocks:
        Image.core.set_block_size(PILLOW_DEFAULT_BLOCK)  # undo what the budget set, to see why it does
    reset_high_water_mark()
    baseline = high_water_mark()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(
            lambda body: to_grayscale(body, max_pixels=10**9, compress_level=COMPRESS_LEVEL, budget=budget),
            bodies,
        ):
            pass
    print(json.dumps({"extra": high_water_mark() - baseline}))


def take_turns(threads: int, side: int, cache_dir: Path) -> str:
    """Peaks of 1 and ``threads`` threads taking turns, with Pillow's blocks and with the budget's."""
    cases = {case.name: case for case in CASES}
    paths = [case_file(cases[name], side, "flat", cache_dir) for name in TURN_CASES] * 6
    rows = [["threads", "Pillow blocks", "peak MB"]]
    for count in sorted({1, threads}):
        for default_blocks in (True, False):
            command = [sys.executable, "-m", "benchmarks.decode_memory", "--turns", *map(str, paths)]
            command += ["--threads", str(count)] + (["--pillow-default-blocks"] if default_blocks else [])
            output = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
            peak = json.loads(output.strip().splitlines()[-1])["extra"]
            blocks = "16 MB (Pillow's default)" if default_blocks else "64 MB (DecodeBudget)"
            rows.append([str(count), blocks, f"{peak / MB:.0f}"])
    return f"{len(paths)} images of {side}², converted one at a time:\n\n{_table(rows)}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def report(measurements: list[Measurement]) -> str:
    """Every measurement, then the largest factor per (mode, transparency) and its rounded-up value."""
    rows = [
        ["case", "side", "content", "file MB", "decoded MB", "peak MB", "factor", "estimate MB", "est/peak"]
    ]
    for m in measurements:
        rows.append(
            [
                m.case.name,
                str(m.side),
                m.content,
                f"{m.file_bytes / MB:.1f}",
                f"{m.decoded_bytes / MB:.1f}",
                f"{m.peak_bytes / MB:.1f}",
                f"{m.factor:.2f}",
                f"{m.estimate_bytes / MB:.1f}",
                f"{m.estimate_bytes / m.peak_bytes:.2f}"
                + ("" if m.estimate_bytes >= m.peak_bytes else " UNDER"),
            ]
        )
    # WebP apart: its decoder holds far more than the others, and the estimate knows it.
    worst: dict[tuple[str, bool, bool], Measurement] = {}
    for m in measurements:
        key = (m.header_mode, m.transparent, m.case.fmt == "WEBP")
        if key not in worst or m.factor > worst[key].factor:
            worst[key] = m
    summary = [["mode", "transparent", "WebP", "largest factor", "where", f"x{MARGIN}, rounded up to 1/4"]]
    for (mode, transparent, webp), m in sorted(worst.items()):
        rounded = math.ceil(m.factor * MARGIN * 4) / 4
        where = f"{m.case.name}, {m.side}², {m.content}"
        summary.append([mode, str(transparent), str(webp), f"{m.factor:.2f}", where, f"{rounded:.2f}"])
    under = sum(m.estimate_bytes < m.peak_bytes for m in measurements)
    verdict = "every estimate covers its peak" if not under else f"{under} estimates are UNDER their peak"
    return f"{_table(rows)}\n\n{_table(summary)}\n\n{verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sides", type=int, nargs="+", default=[7000, 4500, 3000, 1000, 500], help="image sides (px)"
    )
    parser.add_argument("--contents", nargs="+", choices=CONTENTS, default=list(CONTENTS))
    parser.add_argument("--only", default="", help="cases whose name contains this")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "image-crawler-decode-memory"
    )
    parser.add_argument("--threads", type=int, help="measure N threads taking turns instead")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the children
    parser.add_argument("--turns", type=Path, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pillow-default-blocks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        _measure_here(args.measure)
        return 0
    if args.turns:
        _take_turns_here(args.turns, args.threads, args.pillow_default_blocks)
        return 0
    if args.threads:
        print(take_turns(args.threads, args.sides[0], args.cache_dir))
        return 0
    measurements = []
    for case in CASES:
        if args.only not in case.name:
            continue
        for side in args.sides:
            for content in args.contents:
                m = measure(case, side, content, args.cache_dir)
                if m is None:
                    print(f"{case.name}: {case.fmt} keeps no EXIF orientation here", file=sys.stderr)
                    continue
                measurements.append(m)
                print(f"{case.name}, {side}², {content}: factor {m.factor:.2f}", file=sys.stderr, flush=True)
    print(report(measurements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
