"""Doing without a service or tool: a visible skip on a developer's machine, a failure in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI=true``, as GitHub Actions and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of what ``reason`` names; under ``CI=true``, fail it instead.

    A CI run must not pass by skipping the multi-process, browser or deployment tests because
    a service or tool went missing from its install.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI=true: what the suite needs must be installed)", pytrace=False)
    pytest.skip(reason)
