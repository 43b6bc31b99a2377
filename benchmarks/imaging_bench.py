"""``to_grayscale`` alone: a 4000×3000 photo (time, peak RSS) and the PNG compression levels.

The large image runs in a fresh subprocess, so that its peak RSS is that of this one conversion
on top of the interpreter and the imports. The peak is the kernel's high-water mark (``VmHWM``,
what ``ru_maxrss`` reports), reset through ``/proc/self/clear_refs`` once the process is up:
``ru_maxrss`` alone would also carry the high-water mark of the parent the process was forked
from (Linux keeps it across ``execve``), i.e. of the benchmark itself. Without ``/proc`` it falls
back to ``ru_maxrss``.

    python -m benchmarks.imaging_bench FILE --level L     # prints one JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.peak_memory import high_water_mark, reset_high_water_mark

from image_crawler.config import get_settings
from image_crawler.imaging import to_grayscale

REPO = Path(__file__).resolve().parent.parent
LEVELS = (0, 1, 3, 6, 9)


@dataclass(frozen=True)
class LargeImageResult:
    """One conversion of the large photo in a fresh process."""

    level: int
    seconds: float
    #: Peak RSS of the process before the conversion (interpreter, imports, the file's bytes).
    baseline_rss: int
    peak_rss: int
    width: int
    height: int
    source_bytes: int
    png_bytes: int


def large_image(path: Path, level: int) -> LargeImageResult:
    """Convert ``path`` once in a fresh interpreter and report its time and peak RSS."""
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.imaging_bench", str(path), "--level", str(level)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return LargeImageResult(**json.loads(output.strip().splitlines()[-1]))


@dataclass(frozen=True)
class LevelResult:
    """``to_grayscale`` at one zlib level over a sample of the image set."""

    level: int
    images: int
    seconds: float
    png_bytes: int
    source_bytes: int

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / self.images


def compress_levels(
    paths: list[Path], max_pixels: int, levels: tuple[int, ...] = LEVELS
) -> list[LevelResult]:
    """Time ``to_grayscale`` and sum its output size at each level, one image after another."""
    bodies = [path.read_bytes() for path in paths]
    source = sum(len(body) for body in bodies)
    to_grayscale(bodies[0], max_pixels=max_pixels)  # warm-up: plugin registration, first allocations
    results = []
    for level in levels:
        size = 0
        start = time.perf_counter()
        for body in bodies:
            size += len(to_grayscale(body, max_pixels=max_pixels, compress_level=level).png)
        results.append(LevelResult(level, len(bodies), time.perf_counter() - start, size, source))
    return results


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        reset_high_water_mark()


def _peak_rss() -> int:
    """This process's peak RSS in bytes since the last reset."""
    try:
        return high_water_mark()
    except (OSError, LookupError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--level", type=int, default=6)
    args = parser.parse_args(argv)
    data = args.path.read_bytes()
    _reset_peak_rss()
    baseline = _peak_rss()
    start = time.perf_counter()
    gray = to_grayscale(data, max_pixels=get_settings().max_image_pixels, compress_level=args.level)
    seconds = time.perf_counter() - start
    result = LargeImageResult(
        args.level, seconds, baseline, _peak_rss(), gray.width, gray.height, len(data), len(gray.png)
    )
    print(json.dumps(result.__dict__))


if __name__ == "__main__":
    main()
