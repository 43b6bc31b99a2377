"""Peak memory, read from the kernel's high-water mark, and the peak of one ``to_grayscale`` call.

A process's peak resident set size is ``VmHWM`` in ``/proc/<pid>/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux >= 4.0), so a peak can be measured
from any moment on. Linux only (``/proc``); callers skip elsewhere, or fall back on what they can.

:func:`conversion_peak` measures one conversion in a fresh interpreter: the child reads the file,
warms up on a tiny image of the same format and mode (plugins registered, decoder code paged
in), resets the high-water mark and converts the file once (:func:`measure_conversion`): its
``VmHWM`` minus its RSS just before the call is what that one conversion held at its worst, on
top of the bytes it was given.

The tests import this module as ``support.peak_memory``, the benchmarks as
``tests.support.peak_memory``; it imports ``image_crawler`` only where it converts.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "can_measure",
    "conversion_peak",
    "high_water_mark",
    "measure_conversion",
    "reset_high_water_mark",
]

#: The directory ``support`` is in, for the child of :func:`conversion_peak`.
_TESTS = Path(__file__).resolve().parent.parent
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from support.peak_memory import _child; _child(sys.argv[2:])"
)


def can_measure() -> bool:
    """Whether this system reports a resettable peak RSS (Linux ``/proc``)."""
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def high_water_mark(pid: int | str = "self") -> int:
    """The peak RSS of process ``pid`` (default: this one) so far, in bytes: its ``VmHWM``.

    Raises :class:`OSError` when its status cannot be read (no ``/proc``, the process is gone)
    and :class:`LookupError` when the status has no ``VmHWM`` line.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmHWM in /proc/{pid}/status")


def reset_high_water_mark() -> None:
    """Make this process's ``VmHWM`` its current RSS; :class:`OSError` where ``/proc`` cannot."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_conversion(
    data: bytes, *, max_pixels: int, compress_level: int, budget: Any = None
) -> dict[str, int]:
    """Convert ``data`` once in this process, after a warm-up; its peak beyond the RSS before the call.

    Returns ``extra`` (that peak, in bytes), ``baseline`` (the RSS before the call) and ``png``
    (the PNG's size). ``budget`` (a ``DecodeBudget``) is passed to both conversions: as in a
    worker, it also sets Pillow's block size.
    """
    from PIL import Image

    from image_crawler.imaging import to_grayscale

    with Image.open(io.BytesIO(data)) as header:
        fmt, mode = header.format, header.mode
    try:
        tiny = io.BytesIO()
        Image.new(mode, (8, 8)).save(tiny, fmt)
        to_grayscale(tiny.getvalue(), max_pixels=max_pixels, compress_level=compress_level, budget=budget)
    except Exception:
        pass  # a format Pillow cannot write: warm up on what it can
    reset_high_water_mark()
    baseline = high_water_mark()
    gray = to_grayscale(data, max_pixels=max_pixels, compress_level=compress_level, budget=budget)
    return {"extra": high_water_mark() - baseline, "baseline": baseline, "png": len(gray.png)}


def _child(argv: list[str]) -> None:
    path, max_pixels, compress_level = Path(argv[0]), int(argv[1]), int(argv[2])
    measured = measure_conversion(path.read_bytes(), max_pixels=max_pixels, compress_level=compress_level)
    print(json.dumps(measured))


def conversion_peak(path: Path, *, max_pixels: int = 100_000_000, compress_level: int = 1) -> int:
    """Bytes the conversion of the image file at ``path`` held at its peak, beyond the process before it."""
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, str(_TESTS), str(path), str(max_pixels), str(compress_level)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(output.strip().splitlines()[-1])["extra"])
