"""A decoder that kills its process, for poison-message tests.

Imported by test workers next to the actors (``dramatiq image_crawler.actors support.poison``):
decoding a body that starts with :data:`MARK` ends the worker process at once, as a crashing
decoder or the kernel's OOM killer would — no exception, no cleanup, no ack.
"""

from __future__ import annotations

import os

from image_crawler import imaging

MARK = b"POISON"
_to_grayscale = imaging.to_grayscale


def _deadly_to_grayscale(data: bytes, **kwargs):
    if data.startswith(MARK):
        os._exit(70)
    return _to_grayscale(data, **kwargs)


imaging.to_grayscale = _deadly_to_grayscale
