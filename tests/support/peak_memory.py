"""The peak memory of one ``to_grayscale`` call, measured in a fresh interpreter.

The child reads the file, warms up on a tiny image of the same format and mode (plugins
registered, decoder code paged in), resets the kernel's high-water mark through
``/proc/self/clear_refs`` and converts the file once: its ``VmHWM`` minus its RSS just before
the call is what that one conversion held at its worst, on top of the bytes it was given.
Linux only (``/proc``); callers skip elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

__all__ = ["can_measure", "conversion_peak"]

_CHILD = r"""
import io, json, sys
from PIL import Image
from image_crawler.imaging import to_grayscale

def high_water_mark():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

path, max_pixels, compress_level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = open(path, "rb").read()
with Image.open(io.BytesIO(data)) as header:
    fmt, mode = header.format, header.mode
try:
    tiny = io.BytesIO()
    Image.new(mode, (8, 8)).save(tiny, fmt)
    to_grayscale(tiny.getvalue(), max_pixels=max_pixels, compress_level=compress_level)
except Exception:
    pass  # a format Pillow cannot write: warm up on what it can
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # VmHWM := current RSS (Linux >= 4.0)
baseline = high_water_mark()
gray = to_grayscale(data, max_pixels=max_pixels, compress_level=compress_level)
print(json.dumps({"extra": high_water_mark() - baseline, "baseline": baseline, "png": len(gray.png)}))
"""


def can_measure() -> bool:
    """Whether this system reports a resettable peak RSS (Linux ``/proc``)."""
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def conversion_peak(path: Path, *, max_pixels: int = 100_000_000, compress_level: int = 1) -> int:
    """Bytes the conversion of the image file at ``path`` held at its peak, beyond the process before it."""
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(max_pixels), str(compress_level)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(output.strip().splitlines()[-1])["extra"])
