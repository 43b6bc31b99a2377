"""``docker compose up`` as a newcomer runs it from the README, for real, on this machine.

It needs a Docker API. ``compose-standins``, named by ``COMPOSE_STANDINS`` (``.ci/run`` sets it),
serves one with podman and provides stand-ins for the ``python``, ``mongo`` and ``redis``
images; with ``COMPOSE_UP_TEST_DOCKER=1`` the Docker engine at ``DOCKER_HOST`` (or
/var/run/docker.sock) is used instead. The project's own image is built for real from
``docker/Dockerfile`` (from PyPI), and the committed ``docker-compose.yml`` runs unchanged but for
``tests/compose/override.yml``: an ``images`` service (a slow local image host on the compose
network), the ``crawl`` service pointed at a generated list instead of ``./urls.txt``, and the
image tagged for this run (``image-crawler:<project>``), so that runs of the suite going on at
the same time on one machine do not rebuild each other's image under a running stack.

What it checks is what the Quick start and Operations promise: the image builds; ``up`` starts
mongo, redis, worker, web and the one-shot crawl; ``--scale worker=2`` in the middle of the
crawl; ``docker compose stop worker`` in the middle of the crawl stops the workers with exit
code 0 (they finish what they are running, nothing is killed at the end of the grace period that
docker-compose.yml gives them), and once they are started again the crawl logs ``crawling`` and
ends with its exact summary and exit code 0 while the rest keeps running: nothing lost, nothing
fetched or counted twice; the web app answers ``/healthz``, ``/monitoring`` and
``/image/<md5>`` on the published port; ``docker compose stop`` (what Ctrl-C does) stops
everything, nothing killed, and keeps the data; ``down -v`` removes it.

Where what it needs is missing (no Docker API, not root for rootful podman, podman unable to run
a container or to resolve service names) it skips and says why; under ``CI=true`` it fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from support.skips import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "tests" / "compose" / "override.yml"
STANDIN_IMAGES = ("python:3.11.13-slim-bookworm", "mongo:7", "redis:7-alpine")

#: The generated list: distinct images (success), then repeats (duplicate) and failures (error).
DISTINCT_IMAGES = 300
REPEATED_URLS = 40  # the same URL on a second line
COPIED_IMAGES = 30  # another URL, the same bytes
MISSING = 30  # 404
NOT_IMAGES = 15  # text/plain bodies: `not an image`
REJECTED = ("not a url",)  # rejected by enqueue itself: an `error` outcome too
#: Seconds the image host waits before each answer: with the workers' HOST_CONCURRENCY of 8
#: requests in flight to one host, ~ lines x delay / 8 seconds of crawl (~40 s), enough to scale
#: the workers, wait for the second one to fetch, and stop them all, well before its end.
DELAY_S = 0.8
#: URLs per fetch message: more messages than one worker prefetches, so a second one gets some.
BATCH_SIZE = 4

APP_SERVICES = ("worker", "web", "crawl")
#: What the image's services must not log in a run that goes well.
_TROUBLE = re.compile(r"\[ERROR\]|\[CRITICAL\]|Traceback|Permission denied")


def _seconds(duration: str) -> float:
    """A Compose duration (``3m``, ``1m30s``, ``90s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _worker_grace_s() -> float:
    """The workers' stop_grace_period in docker-compose.yml (tests/test_deployment.py checks its reasons)."""
    return _seconds(str(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["worker"]["stop_grace_period"]))


# --- where to run ---------------------------------------------------------------------


def _standins() -> Path | None:
    """The compose-standins script named by COMPOSE_STANDINS, if it names a file."""
    named = os.environ.get("COMPOSE_STANDINS")
    return Path(named) if named and Path(named).is_file() else None


def _quiet(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Engine:
    """A Docker API to run compose against, and the CLI that inspects its containers."""

    env: dict[str, str]
    cli: str  # podman or docker
    compose: list[str]


def _base_env() -> dict[str, str]:
    """An environment without the suite's own settings (FETCH_ALLOW_PRIVATE=1, REDIS_URL…)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}


def _compose_cli(env: dict[str, str]) -> list[str] | None:
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    docker = shutil.which("docker")
    if docker and _quiet([docker, "compose", "version"], env).returncode == 0:
        return [docker, "compose"]
    return None


def _docker_engine() -> Engine:
    env = _base_env()
    host = os.environ.get("DOCKER_HOST", "")
    if host:
        env["DOCKER_HOST"] = host
    docker = shutil.which("docker")
    if docker is None or _quiet([docker, "info"], env).returncode != 0:
        unavailable(
            f"COMPOSE_UP_TEST_DOCKER=1 but no Docker engine answers at {host or '/var/run/docker.sock'}"
        )
    compose = _compose_cli(env)
    if compose is None:
        unavailable("COMPOSE_UP_TEST_DOCKER=1 but neither docker-compose nor docker compose is installed")
    return Engine(env=env, cli=docker, compose=compose)


def _podman_problem(env: dict[str, str]) -> str | None:
    """Why podman cannot run the stack on this machine (None: it can).

    It must run a container (crun, for one, refuses cgroup v1 with controllers on the cgroup2
    hierarchy), and containers on one network must find each other by name, as Compose's
    services do (``redis://redis:6379``): CNI networks resolve names only with the dnsname plugin.
    """
    info = _quiet(["podman", "info"], env)
    if info.returncode != 0:
        return f"podman does not work on this machine: {info.stderr.strip()[-300:]}"
    image = f"docker.io/library/{STANDIN_IMAGES[0]}"
    ran = _quiet(["podman", "run", "--rm", "--network", "none", image, "true"], env)
    if ran.returncode != 0:
        return f"podman cannot run a container on this machine: {ran.stderr.strip()[-300:]}"
    probe = f"ictest-probe-{os.getpid()}"
    try:
        made = _quiet(["podman", "network", "create", probe], env)
        assert made.returncode == 0, made.stderr
        alias = ["--network", probe, "--network-alias", "peer"]
        peer = _quiet(["podman", "run", "-d", "--init", "--name", probe, *alias, image, "sleep", "120"], env)
        assert peer.returncode == 0, peer.stderr
        lookup = "import socket; socket.gethostbyname('peer')"
        found = _quiet(["podman", "run", "--rm", "--network", probe, image, "python3", "-c", lookup], env)
        if found.returncode != 0:
            return (
                "containers on a podman network do not find each other by name (a CNI network needs"
                " the dnsname plugin: apt-get install golang-github-containernetworking-plugin-dnsname):"
                f" {found.stderr.strip()[-200:]}"
            )
    finally:
        _quiet(["podman", "rm", "-f", "-t", "0", probe], env)
        _quiet(["podman", "network", "rm", "-f", probe], env)
    return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.environ.get("COMPOSE_UP_TEST_DOCKER") == "1":
        yield _docker_engine()
        return
    standins = _standins()
    if standins is None:
        unavailable(
            "no Docker API to run docker-compose.yml on: set COMPOSE_STANDINS to compose-standins"
            f" (now {os.environ.get('COMPOSE_STANDINS', 'unset')!r}), or COMPOSE_UP_TEST_DOCKER=1"
            " for a Docker engine"
        )
    if os.geteuid() != 0:
        unavailable("compose-standins runs rootful podman: run this test as root")
    missing = [tool for tool in ("podman", "docker-compose") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{' and '.join(missing)} not installed: run `{standins} prepare` first")
    absent = [
        image
        for image in STANDIN_IMAGES
        if _quiet(["podman", "image", "exists", f"docker.io/library/{image}"]).returncode != 0
    ]
    if absent:
        unavailable(f"stand-in images {', '.join(absent)} missing: run `{standins} prepare` first")
    if problem := _podman_problem(_base_env()):
        unavailable(problem)
    directory = tmp_path_factory.mktemp("standins")
    served = _quiet(["bash", str(standins), "serve", str(directory)], _base_env(), timeout=60)
    assert served.returncode == 0, served.stdout + served.stderr
    host = re.search(r"export DOCKER_HOST=(\S+)", served.stdout)
    try:
        assert host, served.stdout
        env = {**_base_env(), "DOCKER_HOST": host.group(1)}
        yield Engine(env=env, cli="podman", compose=["docker-compose"])
    finally:
        _quiet(["bash", str(standins), "stop", str(directory)], _base_env())


# --- the data: images, and the list that names them -------------------------------------


@dataclass
class Crawl:
    lines: list[str]
    expected: dict[str, int]  # outcome -> lines
    md5s: dict[str, str]  # file name -> md5, of every image served
    pngs: list[str]  # file names of served PNGs


def _image_bytes(number: int, fmt: str) -> bytes:
    rng = random.Random(number)
    size = (8 + number % 17, 6 + number % 11)
    image = Image.new("RGB", size)
    image.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])]
    )
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _make_crawl(data: Path) -> Crawl:
    images = data / "images"
    (images / "img").mkdir(parents=True)
    (images / "notes").mkdir()
    base = "http://images:8000"
    md5s: dict[str, str] = {}
    originals: list[str] = []
    for number in range(DISTINCT_IMAGES):
        fmt, ext = ("PNG", "png") if number % 2 else ("JPEG", "jpg")
        name = f"img/{number:04d}.{ext}"
        body = _image_bytes(number, fmt)
        (images / name).write_bytes(body)
        md5s[name] = hashlib.md5(body).hexdigest()
        originals.append(name)
    assert len(set(md5s.values())) == DISTINCT_IMAGES
    lines = [f"{base}/{name}" for name in originals]
    lines += [f"{base}/{name}" for name in originals[:REPEATED_URLS]]
    for number, name in enumerate(originals[-COPIED_IMAGES:]):
        copy = f"img/copy-{number:03d}{Path(name).suffix}"
        shutil.copyfile(images / name, images / copy)
        md5s[copy] = md5s[name]
        lines.append(f"{base}/{copy}")
    lines += [f"{base}/img/missing-{number:03d}.png" for number in range(MISSING)]
    for number in range(NOT_IMAGES):
        (images / f"notes/{number:03d}.txt").write_text(f"note {number}: not an image\n")
        lines.append(f"{base}/notes/{number:03d}.txt")
    lines += list(REJECTED)
    random.Random(15).shuffle(lines)
    # Comments and blank lines are skipped, not counted (README: Running by hand).
    text = "# generated by tests/test_compose_up.py\n\n" + "\n".join(lines) + "\n\n# end\n"
    (data / "urls.txt").write_text(text)
    for path in [data, images, *images.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    expected = {
        "success": DISTINCT_IMAGES,
        "duplicate": REPEATED_URLS + COPIED_IMAGES,
        "error": MISSING + NOT_IMAGES + len(REJECTED),
    }
    assert sum(expected.values()) == len(lines)
    pngs = [name for name in originals if name.endswith(".png")]
    return Crawl(lines=lines, expected=expected, md5s=md5s, pngs=pngs)


# --- the stack ------------------------------------------------------------------------


#: Compose's answer when the published port was taken by another process first.
_PORT_TAKEN = re.compile(r"address already in use|port is already allocated", re.IGNORECASE)


class Stack:
    """One compose project: ``docker-compose -p NAME -f docker-compose.yml -f override.yml``."""

    def __init__(self, engine: Engine, data: Path, project: str) -> None:
        self.engine = engine
        self.project = project
        self.image = f"image-crawler:{project}"
        self.web = ""  # http://127.0.0.1:PORT, once `up` has published it
        empty = data / "empty.env"  # a developer's own .env must not change what is tested
        empty.touch()
        self.env = {
            **engine.env,
            "COMPOSE_TEST_DATA": str(data),
            "COMPOSE_TEST_DELAY": str(DELAY_S),
            "COMPOSE_TEST_IMAGE": self.image,
            # Port 0: the engine picks a free port as it binds it, so no other process can take
            # it in between (a port the test picked first could be); `compose port` says which.
            "WEB_PORT": "0",
            "BATCH_SIZE": str(BATCH_SIZE),
        }
        self.base = [
            *engine.compose,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(empty),
            "-p",
            project,
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(OVERRIDE),
        ]
        self.timings: dict[str, float] = {}

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.base, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"compose {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def up(self, tries: int = 3) -> None:
        """``up -d``, every service, and the web app's published port found.

        Should the port still be taken by another process as the engine binds it, the web
        container is made again, on another port.
        """
        for attempt in range(tries):
            result = self.compose("up", "-d", timeout=600, check=False)
            if result.returncode == 0:
                break
            output = result.stdout + result.stderr
            assert _PORT_TAKEN.search(output) and attempt < tries - 1, f"compose up -d: {output}"
            self.compose("rm", "-f", "-s", "web", timeout=120)
        published = self.compose("port", "web", "5000").stdout.strip()
        host, _, port = published.rpartition(":")
        assert host == "127.0.0.1" and port.isdigit() and port != "0", published
        self.web = f"http://127.0.0.1:{port}"

    def timed(self, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = self.compose(*args, timeout=timeout)
        self.timings[name] = time.monotonic() - started
        return result

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-a", "-q", service).stdout.split()

    def inspect(self, container: str, template: str) -> str:
        result = _quiet([self.engine.cli, "inspect", "-f", template, container], self.env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def state(self, container: str) -> tuple[str, int]:
        status, code = self.inspect(container, "{{.State.Status}} {{.State.ExitCode}}").split()
        return status, int(code)

    def address(self, container: str) -> str:
        return self.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", *services, timeout=60, check=False).stdout

    def tail(self) -> str:
        """The last lines of every service's log, for a failure message."""
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout[-8000:]

    def get(self, path: str, timeout: float = 10) -> tuple[int, str, bytes]:
        try:
            with _DIRECT.open(self.web + path, timeout=timeout) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


#: Requests to the published port, never through a proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _service_lines(log: str) -> list[str]:
    """A service's log lines without compose's ``name_1  | `` prefixes."""
    return [line.split("| ", 1)[1] for line in log.splitlines() if "| " in line]  # not "Attaching to"


def _wait(condition, timeout: float, what: str, stack: Stack, pause: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(pause)
    pytest.fail(f"{what} within {timeout:g} s\n{stack.tail()}")


def _web_healthcheck(stack: Stack, web: str) -> subprocess.CompletedProcess:
    """The web service's healthcheck command, run in its container as Docker runs it.

    Podman's Docker API splits an exec-form healthcheck on spaces, so its own health status of
    the web app is no verdict on the file (compose-standins' header): run the command itself.
    """
    test = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["web"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return _quiet([stack.engine.cli, "exec", web, *test[1:]], stack.env, timeout=30)


# --- the test ---------------------------------------------------------------------------


def _served(stack: Stack) -> list[tuple[str, str]]:
    """(client address, path) of each image host request answered so far, in order."""
    return [
        (line.split()[0], line.split()[2])
        for line in _service_lines(stack.logs("images"))
        if re.match(r"\S+ GET /(img|notes)/", line)
    ]


def _charted(stack: Stack, query: str, outcomes: tuple[str, ...]) -> Counter:
    """The outcomes /monitoring.json?QUERY counts, summed over its buckets."""
    status, _, body = stack.get(f"/monitoring.json?{query}")
    assert status == 200, body
    charted: Counter = Counter()
    for bucket in json.loads(body)["buckets"]:
        charted.update({name: bucket[name] for name in outcomes})
    return charted


def test_compose_up_crawls_scales_and_stops_as_the_readme_says(engine, tmp_path, capsys):
    data = tmp_path / "data"
    crawl = _make_crawl(data)
    fetchable = len(crawl.lines) - len(REJECTED)
    grace_s = _worker_grace_s()
    stack = Stack(engine, data, f"ictest{os.getpid()}")
    try:
        # The image, built for real (README: the first run builds it).
        stack.timed("build", "build", "worker", timeout=900)

        # `docker compose up`: every service, the crawl included. Detached, where the Quick start
        # runs it in the foreground: with podman's Docker API, Compose's foreground log follower
        # re-attaches to exited containers (podman replays its event log when it rotates the file,
        # and ORs an event filter's labels), which re-initializes the crawl's container. The
        # services, their order and their logs are the same; Ctrl-C is `stop`, run below.
        started = time.monotonic()
        stack.up()
        crawler = stack.containers("crawl")[0]

        def enqueued() -> re.Match | None:
            return re.search(r"run (\S+): enqueued (\d+) urls \((\d+) rejected", stack.logs("crawl"))

        sent = _wait(enqueued, 180, "the crawl did not enqueue its list", stack)
        stack.timings["up"] = time.monotonic() - started  # until the crawl has sent its list
        run = sent.group(1)
        assert int(sent.group(2)) + int(sent.group(3)) == len(crawl.lines), sent.group(0)
        crawl_started = time.monotonic()

        # A second worker while the crawl runs (README: Scaling out), naming the service: a bare
        # `up -d` would start the crawl again once it has ended.
        first_worker = stack.containers("worker")
        assert len(first_worker) == 1, first_worker
        stack.timed("scale", "up", "-d", "--scale", "worker=2", "worker")
        assert stack.state(crawler)[0] == "running", (
            f"the crawl ended before the second worker started: make the list longer\n{stack.tail()}"
        )
        workers = stack.containers("worker")
        assert len(workers) == 2 and set(first_worker) < set(workers), (first_worker, workers)
        assert all(stack.state(worker)[0] == "running" for worker in workers), stack.tail()
        owner = {stack.address(worker): worker for worker in workers}  # image host client -> worker

        # `docker compose stop worker` in the middle of the crawl, once both workers fetch: each
        # finishes what it is running and puts back what it had prefetched (README: Stop, restart),
        # and exits 0, not killed at the end of its grace period.
        (second,) = set(workers) - set(first_worker)
        _wait(
            lambda: any(owner.get(client) == second for client, _ in _served(stack)),
            120,
            "the second worker fetched nothing",
            stack,
        )
        served_at_sigterm = len(_served(stack))
        stack.timed("stop worker", "stop", "worker", timeout=grace_s + 60)
        for worker in workers:
            assert stack.state(worker) == ("exited", 0), f"{worker}: {stack.state(worker)}\n{stack.tail()}"
        served_at_stop = _served(stack)
        recorded_at_stop = sum(_charted(stack, f"run={run}&minutes=all", tuple(crawl.expected)).values())
        assert stack.state(crawler)[0] == "running", (
            f"the crawl ended before the workers were stopped: make the list longer\n{stack.tail()}"
        )
        assert 0 < len(served_at_stop) < fetchable, (len(served_at_stop), fetchable)
        assert recorded_at_stop < len(crawl.lines), (recorded_at_stop, len(crawl.lines))

        # Started again, they carry on where they stopped: what was queued survived in Redis.
        stack.timed("start worker", "start", "worker")
        assert all(stack.state(worker)[0] == "running" for worker in workers), stack.tail()
        owner.update({stack.address(worker): worker for worker in workers})  # new addresses, maybe

        # The crawl exits 0 with the exact summary; everything else keeps running.
        def crawl_exited() -> tuple[str, int] | None:
            state = stack.state(crawler)
            return state if state[0] == "exited" else None

        _, code = _wait(crawl_exited, 420, "the crawl did not finish", stack, pause=1)
        stack.timings["crawl"] = time.monotonic() - crawl_started
        lines = [line.strip() for line in _service_lines(stack.logs("crawl")) if line.strip()]
        summary = (
            f"done: {len(crawl.lines)} urls — {crawl.expected['success']} success,"
            f" {crawl.expected['duplicate']} duplicate, {crawl.expected['error']} error"
        )
        assert code == 0, "\n".join(lines)
        assert [line.split(":")[0] for line in lines] == [f"run {run}", "crawling", "done"], lines
        assert lines[-1] == summary, "\n".join(lines)
        for service in ("mongo", "redis", "web", "worker", "images"):
            for container in stack.containers(service):
                assert stack.state(container)[0] == "running", f"{service} stopped\n{stack.tail()}"
        for service in APP_SERVICES:  # e.g. gunicorn's control socket under a $HOME there is none of
            trouble = [line for line in _service_lines(stack.logs(service)) if _TROUBLE.search(line)]
            assert not trouble, f"{service} logged:\n" + "\n".join(trouble[:20])

        # Every line fetched exactly once, across the stop: a message the workers had been
        # running when stopped was finished, not dropped and done again after the start. Both
        # workers fetched (the image host logs who asked).
        served = _served(stack)
        assert Counter(path for _, path in served) == Counter(
            line.removeprefix("http://images:8000") for line in crawl.lines if line not in REJECTED
        ), "a URL was fetched twice, or never"
        per_worker = Counter(owner.get(client, client) for client, _ in served)
        assert set(per_worker) == set(workers), f"a worker fetched nothing, or a stranger did: {per_worker}"

        # The web app on the published port (README: The web app).
        web = stack.containers("web")[0]
        check = _web_healthcheck(stack, web)
        assert check.returncode == 0, check.stdout + check.stderr
        status, kind, body = stack.get("/healthz")
        assert status == 200, body
        assert json.loads(body) == {"status": "ok", "down": [], "mongo": "ok", "redis": "ok"}
        status, kind, body = stack.get("/monitoring")
        assert status == 200 and kind.startswith("image/svg+xml") and b"<svg" in body[:2000], (status, kind)
        # The chart's counters, kept apart from the ledger the summary reads: the run's, and every
        # outcome ever (the crawl ran once, and nothing was counted twice).
        for query in (f"run={run}&minutes=all", "minutes=all"):
            charted = _charted(stack, query, tuple(crawl.expected))
            assert dict(charted) == crawl.expected, f"/monitoring.json?{query} counts the lines otherwise"
        # Every distinct image stored once, under the MD5 of its bytes; a PNG's copy is exact.
        for md5 in set(crawl.md5s.values()):
            status, _, body = stack.get(f"/image/{md5}.json")
            assert status == 200, (md5, body)
        name = crawl.pngs[0]
        status, kind, body = stack.get(f"/image/{crawl.md5s[name]}")
        assert status == 200 and kind == "image/png", (status, kind)
        stored = Image.open(io.BytesIO(body))
        source = Image.open(data / "images" / name).convert("RGB")
        assert (stored.mode, stored.size) == ("L", source.size)
        rgb = source.tobytes()
        assert stored.tobytes() == bytes((sum(rgb[i : i + 3]) // 3) for i in range(0, len(rgb), 3))

        # What Ctrl-C does: stop it all, each within its grace period; the data stays.
        stack.timed("stop", "stop", timeout=grace_s + 120)
        ended = {
            service: [stack.state(container) for container in stack.containers(service)]
            for service in ("mongo", "redis", "images", *APP_SERVICES)
        }
        assert all(status == "exited" for states in ended.values() for status, _ in states), str(ended)
        killed = {service for service, states in ended.items() if any(code == 137 for _, code in states)}
        assert not killed, f"SIGKILLed at the end of their grace period: {ended}"
        assert all(code == 0 for service in APP_SERVICES for _, code in ended[service]), str(ended)
        volumes = _quiet([engine.cli, "volume", "ls", "-q"], stack.env).stdout.split()
        assert {f"{stack.project}_mongo-data", f"{stack.project}_redis-data"} <= set(volumes)

        stack.timed("down -v", "down", "-v", "--remove-orphans", timeout=180)
        volumes = _quiet([engine.cli, "volume", "ls", "-q"], stack.env).stdout.split()
        assert not [v for v in volumes if v.startswith(f"{stack.project}_")], volumes

        with capsys.disabled():
            took = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stack.timings.items())
            print(
                f"\n[compose up] {summary} (run {run}); `stop worker` after {served_at_sigterm}"
                f" fetches, stopped after {len(served_at_stop)}, {recorded_at_stop} outcomes;"
                " fetches per worker"
                f" {sorted(per_worker.values())}; {took}"
            )
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, check=False)
        _quiet([engine.cli, "rmi", stack.image], stack.env)  # the tag; layers stay cached
