"""The installed ``image-crawler`` command when Redis or MongoDB cannot be reached.

README "Troubleshooting": the command gives up on a store it cannot reach after about
``cli.OUTAGE_BUDGET_S`` seconds, with one line naming it (password hidden) and exit code 2
(``cli.ServiceUnreachable``, raised by ``cli._reporting_outages``).

tests/image_crawler/test_cli.py already runs ``python -m image_crawler`` against a dead or silent
Redis (``enqueue``) and a dead or silent MongoDB (``enqueue``, ``enqueue --wait``, ``status``,
and MongoDB lost mid-run). These run the console script itself, as a user does, for the
commands those leave out: ``retry`` with Redis down (Redis is checked before MongoDB), and
``runs``, ``failed``, ``retry`` and ``reconcile`` with MongoDB down (``status`` again, through
the console script).
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

from support.processes import run_bounded
from support.skips import unavailable

#: Generous bound on how long the command may take to give up.
_BOUND_S = 30


@pytest.fixture(scope="module")
def command() -> Path:
    """The ``image-crawler`` console script installed beside this interpreter."""
    path = Path(sysconfig.get_path("scripts")) / "image-crawler"
    if not path.exists():
        unavailable(f"no console script at {path} (pip install -e .)")
    return path


@pytest.fixture
def url_file(tmp_path) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("http://example.com/a.png\n")
    return path


def _run(command: Path, env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    # The bound only tells a command that gives up from one that hangs: how long it waits is
    # the outage budget's (tests/image_crawler/test_cli.py proves it on a fake clock).
    return run_bounded([str(command), *map(str, args)], env, _BOUND_S)


def _args(args: tuple[str, ...], url_file: Path) -> tuple[str, ...]:
    return tuple(str(url_file) if arg == "URLS" else arg for arg in args)


@pytest.mark.parametrize(
    "args",
    [
        ("enqueue", "URLS"),
        ("enqueue", "URLS", "--wait"),
        ("retry", "some-run"),
        ("retry", "some-run", "--wait"),
    ],
    ids=" ".join,
)
def test_a_command_that_needs_redis_names_it_when_both_stores_are_down(command, dead_port, url_file, args):
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0",
        "MONGO_URI": f"mongodb://127.0.0.1:{dead_port}/db",
    }

    finished = _run(command, env, *_args(args, url_file))

    assert (finished.returncode, finished.stdout) == (2, "")
    assert finished.stderr == (
        f"Error: cannot reach Redis at redis://127.0.0.1:{dead_port}/0:"
        f" Error 111 connecting to 127.0.0.1:{dead_port}. Connection refused.\n"
    )
    # One budget ridden out, for the first store asked (seconds of interpreter start-up aside).


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("runs",),
        ("failed", "some-run"),
        ("retry", "some-run"),
        ("reconcile",),
        ("reconcile", "--all"),
    ],
    ids=" ".join,
)
def test_a_command_names_an_unreachable_mongodb_without_its_password(command, redis_url, dead_port, args):
    env = {
        "REDIS_URL": redis_url,
        "MONGO_URI": f"mongodb://crawler:hunter2@127.0.0.1:{dead_port}/image_crawler",
    }

    finished = _run(command, env, *args)

    assert (finished.returncode, finished.stdout) == (2, "")
    assert finished.stderr == (
        f"Error: cannot reach MongoDB at mongodb://***@127.0.0.1:{dead_port}/image_crawler:"
        f" 127.0.0.1:{dead_port}: [Errno 111] Connection refused\n"
    )
