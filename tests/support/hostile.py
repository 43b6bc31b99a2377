"""Hostile bodies built in milliseconds, and the peak memory of a tree of processes.

Both bombs use the same trick: deflate forgets its history at a full flush, so every
further block of identical input compresses to the very same bytes. Compress one block,
repeat its output: a body that inflates to gigabytes costs a few hundred kB to build.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from types import TracebackType

import psutil

from support.peak_memory import high_water_mark

__all__ = ["ProcessTreeMemory", "bilevel_png", "gzip_bomb"]

_MB = 1024 * 1024


def _repeated_deflate(block: bytes, times: int) -> tuple[bytes, bytes]:
    """Raw deflate of ``block * times`` without building it: (the repeated blocks, the final block)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    return deflated * times, compressor.flush()


def gzip_bomb(decompressed_size: int, block: int = _MB) -> bytes:
    """A valid gzip stream of ``decompressed_size`` zero bytes (a multiple of ``block``)."""
    if decompressed_size % block:
        raise ValueError("decompressed_size must be a multiple of block")
    zeros = bytes(block)
    blocks = decompressed_size // block
    body, end = _repeated_deflate(zeros, blocks)
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0, max compression
    return header + body + end + struct.pack("<II", crc, decompressed_size & 0xFFFF_FFFF)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG however large it claims to be (40000×40000 is ~200 kB).

    The same construction as ``black_bilevel_png`` in ``test_imaging.py``, whose tests check
    that a small one decodes to what it claims.
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then 0-bits: black
    per_block = next(n for n in (1000, 100, 10, 1) if height % n == 0)
    block = row * per_block
    blocks = height // per_block
    body, end = _repeated_deflate(block, blocks)
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    stream = b"\x78\xda" + body + end + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def _peak_rss(process: psutil.Process) -> int:
    """The process's peak resident set size so far: the kernel's ``VmHWM``, else its current RSS."""
    try:
        return high_water_mark(process.pid)
    except (OSError, LookupError):
        return int(process.memory_info().rss)


class ProcessTreeMemory:
    """Watches a process and all its descendants, keeping each one's peak RSS; a context manager.

    On Linux the peak is the kernel's high-water mark (``VmHWM``), so a spike between two
    samples is not missed; sampling only has to see each process before it exits.

    :param root: pid of the process at the top of the tree (e.g. ``dramatiq``'s main process).
    :param interval: seconds between two looks at the tree.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        #: pid → (command line, peak RSS in bytes) of every process seen in the tree.
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def peak(self) -> int:
        """The largest peak RSS of any one process seen, in bytes."""
        return max((rss for _, rss in self.peaks.values()), default=0)

    def report(self) -> str:
        """One line per process: pid, peak RSS in MB, whether it is the root, its command line."""
        lines = []
        for pid, (command, rss) in sorted(self.peaks.items()):
            role = "root " if pid == self.root else "child"
            lines.append(f"  pid {pid:>7}  peak RSS {rss / _MB:7.1f} MB  {role}  {command}")
        return "\n".join(lines)

    def sample(self) -> None:
        """Look at the tree once."""
        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for process in processes:
            try:
                rss = _peak_rss(process)
                command = " ".join(process.cmdline()[1:])
            except psutil.Error:
                continue  # exited meanwhile
            previous = self.peaks.get(process.pid, ("", 0))[1]
            self.peaks[process.pid] = (command, max(previous, rss))

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> ProcessTreeMemory:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
