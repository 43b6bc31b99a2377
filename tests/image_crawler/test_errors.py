"""The errors a job can end with: one tree, one way to ask whether trying again may help."""

from __future__ import annotations

import inspect

import pytest

from image_crawler import errors, robots


def _crawl_errors() -> list[type[errors.CrawlError]]:
    found = [errors.CrawlError]
    pending = [errors.CrawlError]
    while pending:
        for child in pending.pop().__subclasses__():
            if child.__module__.startswith("image_crawler.") and child not in found:
                found.append(child)
                pending.append(child)
    return found


def test_the_module_docstring_draws_every_error_class():
    robots.RobotsDisallowed  # noqa: B018 - imported so that it is among the subclasses
    tree = inspect.getdoc(errors) or ""

    for kind in _crawl_errors():
        name = kind.__name__ if kind.__module__ == errors.__name__ else f"robots.{kind.__name__}"
        assert f"── {name}" in tree or name == "CrawlError", f"{name} is not in the tree of errors.py"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (errors.FetchTimeout(), True),
        (errors.ConnectionFailed("connection reset"), True),
        (errors.HttpStatusError(503), True),
        (errors.HttpStatusError(429), True),
        (errors.HttpStatusError(408), True),
        (errors.HttpStatusError(404), False),
        (errors.ResultMissing("md5 result missing"), True),
        (errors.ShuttingDown(), True),
        (errors.StoreBusy("busy"), True),
        (errors.TooLarge(), False),
        (errors.NotAnImage(), False),
        (errors.InvalidUrl("not an http(s) url"), False),
        (errors.ClaimExpired("body expired"), False),
        (robots.RobotsDisallowed(robots.DISALLOWED), False),
    ],
)
def test_whether_trying_again_may_help_is_the_errors_transient_flag(error, transient):
    assert isinstance(error, errors.CrawlError)
    assert error.transient is transient


def test_there_is_one_way_to_ask_no_transient_base_class():
    assert not hasattr(errors, "TransientError")
    assert errors.ResultMissing.retry_limit == 4 and errors.CrawlError.retry_limit is None
