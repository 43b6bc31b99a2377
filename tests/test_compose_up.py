"""``docker compose up`` as a newcomer runs it from the README, for real, on this machine.

Our build machines have no Docker engine; ``compose-standins`` (a local test instrument in the
workplace's shared tools) serves the Docker API with podman and provides stand-ins for the
``python``, ``mongo`` and ``redis`` images. The project's own image is built for real from
``docker/Dockerfile`` (from PyPI), and the committed ``docker-compose.yml`` runs unchanged but for
``tests/compose/override.yml``: an ``images`` service (a slow local image host on the compose
network) and the ``crawl`` service pointed at a generated list instead of ``./urls.txt``, and
the image tagged for this run (``image-crawler:<project>``), so that runs of the suite going on
at the same time on one machine do not rebuild each other's image under a running stack.

What it checks is what the Quick start and Operations promise: the image builds; ``up`` starts
mongo, redis, worker, web and the one-shot crawl; the crawl logs ``crawling`` and ends with its
exact summary and exit code 0 while the rest keeps running; the web app answers ``/healthz``,
``/monitoring`` and ``/image/<md5>`` on the published port; ``--scale worker=2`` in the middle of
the crawl loses and double-counts nothing; ``docker compose stop worker`` stops the workers
within their grace period with exit code 0; ``docker compose stop`` (what Ctrl-C does) stops
everything, nothing killed, and keeps the data; ``down -v`` removes it.

Skipped, with the reason, where compose-standins is not found, not as root, or where podman does
not work on the machine. With ``COMPOSE_UP_TEST_DOCKER=1`` it runs against the Docker engine at
``DOCKER_HOST`` (or /var/run/docker.sock) instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
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
#: requests in flight to one host, ~ lines x delay / 8 seconds of crawl, enough to scale mid-run.
DELAY_S = 0.6
#: URLs per fetch message: more messages than one worker prefetches, so a second one gets some.
BATCH_SIZE = 4

APP_SERVICES = ("worker", "web", "crawl")
#: What the image's services must not log in a run that goes well.
_TROUBLE = re.compile(r"\[ERROR\]|\[CRITICAL\]|Traceback|Permission denied")

#: docker-compose.yml's stop_grace_period of the workers (tests/test_deployment.py checks its reasons).
WORKER_GRACE_S = 180


# --- where to run ---------------------------------------------------------------------


def _standins() -> Path | None:
    """COMPOSE_STANDINS, else the workplace's shared tools beside this clone, else /work/shared."""
    if named := os.environ.get("COMPOSE_STANDINS"):
        return Path(named) if Path(named).is_file() else None
    for candidate in (ROOT.parent / "shared" / "tools", Path("/work/shared/tools")):
        if (candidate / "compose-standins").is_file():
            return candidate / "compose-standins"
    return None


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
        pytest.skip(
            f"COMPOSE_UP_TEST_DOCKER=1 but no Docker engine answers at {host or '/var/run/docker.sock'}"
        )
    compose = _compose_cli(env)
    if compose is None:
        pytest.skip("COMPOSE_UP_TEST_DOCKER=1 but neither docker-compose nor docker compose is installed")
    return Engine(env=env, cli=docker, compose=compose)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.environ.get("COMPOSE_UP_TEST_DOCKER") == "1":
        yield _docker_engine()
        return
    standins = _standins()
    if standins is None:
        pytest.skip(
            "compose-standins not found (COMPOSE_STANDINS, ../shared/tools or /work/shared/tools):"
            " no Docker engine to run docker-compose.yml on (COMPOSE_UP_TEST_DOCKER=1 uses a real one)"
        )
    if os.geteuid() != 0:
        pytest.skip("compose-standins runs rootful podman: run this test as root")
    missing = [tool for tool in ("podman", "docker-compose") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{' and '.join(missing)} not installed: run `{standins} prepare` first")
    info = _quiet(["podman", "info"], _base_env())
    if info.returncode != 0:
        pytest.skip(f"podman does not work on this machine: {info.stderr.strip()[-300:]}")
    absent = [
        image
        for image in STANDIN_IMAGES
        if _quiet(["podman", "image", "exists", f"docker.io/library/{image}"]).returncode != 0
    ]
    if absent:
        unavailable(f"stand-in images {', '.join(absent)} missing: run `{standins} prepare` first")
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """One compose project: ``docker-compose -p NAME -f docker-compose.yml -f override.yml``."""

    def __init__(self, engine: Engine, data: Path, project: str, web_port: int) -> None:
        self.engine = engine
        self.project = project
        self.image = f"image-crawler:{project}"
        self.web = f"http://127.0.0.1:{web_port}"
        empty = data / "empty.env"  # a developer's own .env must not change what is tested
        empty.touch()
        self.env = {
            **engine.env,
            "COMPOSE_TEST_DATA": str(data),
            "COMPOSE_TEST_DELAY": str(DELAY_S),
            "COMPOSE_TEST_IMAGE": self.image,
            "WEB_PORT": str(web_port),
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


def test_compose_up_crawls_scales_and_stops_as_the_readme_says(engine, tmp_path, capsys):
    data = tmp_path / "data"
    crawl = _make_crawl(data)
    stack = Stack(engine, data, f"ictest{os.getpid()}", _free_port())
    try:
        # The image, built for real (README: the first run builds it).
        stack.timed("build", "build", "worker", timeout=900)

        # `docker compose up`: every service, the crawl included. Detached, where the Quick start
        # runs it in the foreground: with podman's Docker API, Compose's foreground log follower
        # re-attaches to exited containers (podman replays its event log when it rotates the file,
        # and ORs an event filter's labels), which re-initializes the crawl's container. The
        # services, their order and their logs are the same; Ctrl-C is `stop`, run below.
        started = time.monotonic()
        stack.compose("up", "-d", timeout=600)
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

        # Both workers fetched: the image host logs who asked.
        requests = Counter(
            line.split()[0]
            for line in _service_lines(stack.logs("images"))
            if re.match(r"\S+ GET /(img|notes)/", line)
        )
        per_worker = {worker: requests.get(stack.address(worker), 0) for worker in workers}
        assert sum(per_worker.values()) >= len(crawl.lines) - len(REJECTED), (requests, per_worker)
        assert all(per_worker.values()), f"a worker fetched nothing: {per_worker}"

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
            status, kind, body = stack.get(f"/monitoring.json?{query}")
            assert status == 200, body
            charted = Counter()
            for bucket in json.loads(body)["buckets"]:
                charted.update({name: bucket[name] for name in crawl.expected})
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

        # `docker compose stop worker`: within the grace period, each worker exiting 0.
        stack.timed("stop worker", "stop", "worker", timeout=WORKER_GRACE_S + 60)
        assert stack.timings["stop worker"] < WORKER_GRACE_S
        for worker in workers:
            assert stack.state(worker) == ("exited", 0), stack.tail()

        # What Ctrl-C does: stop it all, each within its grace period; the data stays.
        stack.timed("stop", "stop", timeout=300)
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
                f"\n[compose up] {summary} (run {run});"
                f" fetches per worker {list(per_worker.values())}; {took}"
            )
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, check=False)
        _quiet([engine.cli, "rmi", stack.image], stack.env)  # the tag; layers stay cached
