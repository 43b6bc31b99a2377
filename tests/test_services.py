"""The suite's own machinery: services that cannot be raced for their ports, fixtures that clean up."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import services
from support.pipeline import Pipeline
from support.skips import unavailable


@contextlib.contextmanager
def _first_port_picked_is_taken(monkeypatch) -> Iterator[int]:
    """The first port ``free_port`` picks is then taken by another process, which answers nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real = services.free_port
        monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or real())
        yield busy


def test_a_free_port_taken_before_redis_binds_it_is_not_raced(tmp_path, monkeypatch):
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not on PATH (apt-get install redis-server)")
    with _first_port_picked_is_taken(monkeypatch) as busy:
        process, url = services.start_redis(tmp_path)
        try:
            assert not url.endswith(f":{busy}/0")
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            assert services._redis_pid(port) == process.pid  # the server answering is ours
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_a_missing_service_skips_on_a_developers_machine_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no redis-server"):
        unavailable("no redis-server")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no redis-server \(CI=true"):
        unavailable("no redis-server")


def test_a_free_port_taken_before_the_mongo_shim_binds_it_is_not_raced(tmp_path, monkeypatch):
    if services.MONGO_SHIM is None:
        if os.environ.get("MONGO_URI"):
            pytest.skip("MONGO_SHIM is not set: a MongoDB at MONGO_URI stands in for the shim here")
        unavailable("MONGO_SHIM is not set and no MONGO_URI either: no MongoDB endpoint for the suite")
    with _first_port_picked_is_taken(monkeypatch) as busy:
        process, uri = services.start_mongo_shim(tmp_path)
        try:
            port = int(uri.rsplit(":", 1)[1])
            assert port != busy
            assert services._listens(process.pid, port)  # the server answering is ours
            assert not services._listens(process.pid, busy)
        finally:
            services.stop_group(process)


def _current_context():
    """The process's context, without creating one."""
    from image_crawler import context

    current = context.set_context(None)
    context.set_context(current)
    return current


def _closing_pipelines(config: pytest.Config):
    """``closing_pipelines`` of this suite's tests/conftest.py (the module pytest loaded)."""
    path = str(Path(__file__).with_name("conftest.py"))
    conftest = next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == path)
    return conftest.closing_pipelines


@pytest.mark.parametrize("test", ["passes", "fails", "sets a context of its own first"])
def test_make_pipeline_closes_pipelines_in_reverse_order_and_puts_the_context_back(
    request, redis_url, mongo_db, test
):
    from image_crawler import context
    from image_crawler.config import get_settings

    closing_pipelines = _closing_pipelines(request.config)
    settings = dataclasses.replace(get_settings(), redis_url=redis_url)
    closed: list[tuple[Pipeline, bool]] = []  # each pipeline, and whether its context was current

    def new(threads: int = 1) -> Pipeline:
        pipeline = Pipeline(mongo_db, settings, threads)
        close = pipeline.close

        def recorded() -> None:
            closed.append((pipeline, _current_context() is pipeline.context))
            close()

        pipeline.close = recorded
        return pipeline

    before = types.SimpleNamespace(close=lambda: None)  # the context of whatever ran before
    previous = context.set_context(before)
    try:
        failing = pytest.raises(RuntimeError) if test == "fails" else contextlib.nullcontext()
        with failing, closing_pipelines(new) as make:
            if test == "sets a context of its own first":
                context.set_context(types.SimpleNamespace(close=lambda: None))
            first, second = make(), make()
            assert _current_context() is second.context
            if test == "fails":
                raise RuntimeError("the test failed")
        # Reverse order: each found its own context current, and put back the one before it.
        assert closed == [(second, True), (first, True)]
        assert _current_context() is before
    finally:
        context.set_context(previous)
