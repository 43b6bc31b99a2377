"""Waiting for something to happen in another thread or process: poll until it does, or fail the test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = 30.0,
    pause: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` every ``pause`` seconds until it gives a true value, and return that value.

    After ``timeout`` seconds the test fails, saying it was waiting for ``what`` (and, with
    ``details``, what that returns then: a log's tail, say). How long it took is never asserted.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(pause)
    return value
