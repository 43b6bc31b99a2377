"""The suite's own services cannot be raced for their ports."""

from __future__ import annotations

import shutil
import socket

import pytest

from support import services


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_free_port_taken_before_redis_binds_it_is_not_raced(tmp_path, monkeypatch):
    with socket.socket() as taken:  # another process got there first, and answers nothing
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real = services.free_port
        monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or real())

        process, url = services.start_redis(tmp_path)
        try:
            assert not url.endswith(f":{busy}/0")
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            assert services._redis_pid(port) == process.pid  # the server answering is ours
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_a_missing_service_skips_on_a_developers_machine_and_fails_in_ci(monkeypatch):
    from support.skips import unavailable

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no redis-server"):
        unavailable("no redis-server")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no redis-server \(CI=true"):
        unavailable("no redis-server")
