"""WORKER_METRICS=1: Dramatiq's own Prometheus middleware, its exporter on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit
from dramatiq.middleware.prometheus import Prometheus
from prometheus_client.parser import text_string_to_metric_families

from image_crawler.broker import ADMIT_QUEUE, create_broker
from image_crawler.config import get_settings
from image_crawler.dramatiq_internals import queue_keys
from image_crawler.middleware import WORKER_METRICS_HOST, WORKER_METRICS_PORT, worker_metrics_address
from support.processes import start_workers, stop_workers
from support.services import start_redis


@pytest.fixture
def settings(redis_url):
    return dataclasses.replace(get_settings(), redis_url=redis_url)


#: The sample counting the admit messages the workers processed.
ADMITS_PROCESSED = ("dramatiq_messages_total", (("actor_name", "admit"), ("queue_name", ADMIT_QUEUE)))


def _prometheus(broker) -> list[Prometheus]:
    return [middleware for middleware in broker.middleware if isinstance(middleware, Prometheus)]


# --- the middleware ----------------------------------------------------------------------


def test_without_worker_metrics_the_broker_has_no_prometheus_middleware(settings):
    broker = create_broker(settings)
    try:
        assert settings.worker_metrics is False
        assert _prometheus(broker) == []
    finally:
        broker.close()


def test_with_worker_metrics_the_broker_runs_dramatiqs_prometheus_middleware_first(settings):
    broker = create_broker(dataclasses.replace(settings, worker_metrics=True))
    try:
        assert len(_prometheus(broker)) == 1
        # First: a message another middleware skips in its before-hook (AgeLimit, CrashGuard) is
        # still counted in and out, so the in-progress gauge never goes below zero.
        assert isinstance(broker.middleware[0], Prometheus)
        assert isinstance(broker.middleware[1], AgeLimit)
    finally:
        broker.close()


def test_the_exporter_listens_on_localhost_unless_dramatiqs_variables_say_otherwise():
    assert (WORKER_METRICS_HOST, WORKER_METRICS_PORT) == ("127.0.0.1", 9191)
    assert worker_metrics_address({}) == ("127.0.0.1", 9191)
    assert worker_metrics_address({"dramatiq_prom_host": "", "dramatiq_prom_port": ""}) == ("127.0.0.1", 9191)
    chosen = {"dramatiq_prom_host": "0.0.0.0", "dramatiq_prom_port": "9300"}
    assert worker_metrics_address(chosen) == ("0.0.0.0", 9300)


# --- real `dramatiq image_crawler.actors` workers ----------------------------------------


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own: real workers must not take the suite's messages."""
    process, url = start_redis(tmp_path)
    yield url
    process.terminate()
    process.wait(timeout=10)


def _worker_env(redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(("dramatiq_prom", "prometheus"))}
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env.update(
        REDIS_URL=redis_url,
        # Never reached: the message below needs Redis only.
        MONGO_URI="mongodb://127.0.0.1:1/image_crawler",
        # Port 0: the exporter binds a port the system picks as it binds it, so no other process
        # can take it first (a free port picked by the test could be); /proc says which it is.
        dramatiq_prom_port="0",
        dramatiq_prom_db=str(metrics_dir),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _send_admitted_batch(redis_url: str) -> RedisBroker:
    """Send an ``admit`` message for a batch already admitted: a worker ends it at once, with Redis only."""
    from image_crawler.actors import admitted_key

    batch = {"run": uuid.uuid4().hex, "lines": [[1, "http://images.test/1.png"]]}
    redis.Redis.from_url(redis_url).set(admitted_key(batch), 1, ex=600)
    sender = RedisBroker(url=redis_url, middleware=[])
    sender.enqueue(
        dramatiq.Message(queue_name=ADMIT_QUEUE, actor_name="admit", args=(batch,), kwargs={}, options={})
    )
    return sender


def _wait_until_processed(redis_url: str, timeout: float = 60) -> None:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    admit = queue_keys(ADMIT_QUEUE)
    while client.hlen(admit.messages) or client.llen(admit.waiting):
        if time.monotonic() > deadline:
            pytest.fail("the workers did not process the admit message")
        time.sleep(0.1)


#: What the ``dramatiq`` command logs once it has started every worker and fork process.
_BOOTED = "is booting up."


def _wait_until_booted(log: Path, workers, timeout: float = 60) -> None:
    """Wait for the dramatiq command's boot line: its fork processes (the exporter) exist by then."""
    deadline = time.monotonic() + timeout
    while _BOOTED not in log.read_text():
        if workers.poll() is not None:
            pytest.fail(f"the workers exited with code {workers.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the workers did not boot:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _proc_table() -> Path:
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc to read processes and listening sockets from")
    return table


def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it has exited meanwhile
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _group_listens(pgid: int) -> dict[int, set[str]]:
    """Port -> local IPv4 addresses of the sockets listening in process group ``pgid`` (/proc)."""
    listening: dict[str, tuple[int, str]] = {}  # socket inode -> (port, address)
    for row in _proc_table().read_text().splitlines()[1:]:
        fields = row.split()
        address, port_hex = fields[1].split(":")
        if fields[3] == "0A":  # LISTEN
            dotted = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
            listening[f"socket:[{fields[9]}]"] = (int(port_hex, 16), dotted)
    found: dict[int, set[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            held = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue  # it has exited meanwhile
        for target in held:
            if target in listening:
                port, address = listening[target]
                found.setdefault(port, set()).add(address)
    return found


def _exporter_port(workers, timeout: float = 60) -> tuple[int, set[str]]:
    """The one port the workers' process group listens on, once the exporter has bound it."""
    deadline = time.monotonic() + timeout
    while not (ports := _group_listens(workers.pid)):
        if time.monotonic() > deadline:
            pytest.fail("the exporter never listened")
        time.sleep(0.1)
    assert len(ports) == 1, ports
    return next(iter(ports.items()))


def _scrape(url: str, timeout: float = 60) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Poll the exporter until it reports the admit message as processed."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                last = response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
            continue
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(last)
            for sample in family.samples
        }
        if samples.get(ADMITS_PROCESSED, 0):
            return samples
        time.sleep(0.2)
    pytest.fail(f"the exporter at {url} never counted the admit message; it said: {last[:2000]!r}")


@pytest.mark.timeout(180)
def test_workers_with_worker_metrics_serve_dramatiq_metrics_on_localhost_only(private_redis, tmp_path):
    _proc_table()
    log = tmp_path / "workers.log"
    env = _worker_env(private_redis, tmp_path, WORKER_METRICS="1")
    workers = start_workers(env, processes=2, threads=1, log=log)
    try:
        _wait_until_booted(log, workers)
        assert len(_children(workers.pid)) == 2 + 1, "two worker processes and the exporter"
        port, addresses = _exporter_port(workers)
        assert addresses == {"127.0.0.1"}, "dramatiq#309: not on every interface"
        sender = _send_admitted_batch(private_redis)
        samples = _scrape(f"http://127.0.0.1:{port}/metrics")

        assert samples[ADMITS_PROCESSED] == 1
        assert any(name == "dramatiq_message_duration_milliseconds_count" for name, _ in samples)
        assert "image_crawler.middleware:serve_worker_metrics" in log.read_text()
        sender.close()
    finally:
        stop_workers(workers)


@pytest.mark.timeout(180)
def test_workers_without_worker_metrics_open_no_port(private_redis, tmp_path):
    _proc_table()
    log = tmp_path / "workers.log"
    workers = start_workers(_worker_env(private_redis, tmp_path), processes=1, threads=1, log=log)
    try:
        # The command starts its fork processes before it logs its boot line: once it has, there
        # is the worker process and nothing else (with WORKER_METRICS=1, the exporter too, above).
        _wait_until_booted(log, workers)
        assert len(_children(workers.pid)) == 1, "a fork process beside the worker process"
        sender = _send_admitted_batch(private_redis)
        _wait_until_processed(private_redis)

        assert _group_listens(workers.pid) == {}
        assert "Fork process" not in log.read_text()
        sender.close()
    finally:
        stop_workers(workers)
