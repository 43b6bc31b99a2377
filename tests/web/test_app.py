"""What every response has in common: security headers, and errors that are never a 500."""

from __future__ import annotations

import subprocess
import sys

import pytest

from web import create_app


@pytest.fixture
def mongo_down_client(redis_url, dead_port):
    """A client of an app whose MongoDB does not answer."""
    app = create_app(
        {
            "MONGO_URI": f"mongodb://127.0.0.1:{dead_port}/image_crawler",
            "REDIS_URL": redis_url,
            "SERVICE_TIMEOUT": 0.3,
        }
    )
    return app.test_client()


def test_every_kind_of_response_has_the_security_headers(client, seed):
    md5 = seed.image(1)
    seed.outcome("success")
    paths = ["/", "/monitoring", "/monitoring.json", f"/image/{md5}", f"/image/{md5}.json", "/healthz"]
    paths += ["/static/style.css", "/static/dashboard.js", "/nowhere", "/image/nope", "/monitoring?minutes=0"]

    for path in paths:
        response = client.get(path)
        policy = response.headers.get("Content-Security-Policy", "")
        assert response.headers.get("X-Content-Type-Options") == "nosniff", path
        assert "default-src 'self'" in policy or "default-src 'none'" in policy, path
        assert "http" not in policy and "*" not in policy and "unsafe-eval" not in policy, path
        if response.mimetype == "text/html":
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path


def test_unknown_path_is_404_html_and_unknown_json_path_is_404_json(client):
    html = client.get("/nowhere")
    json = client.get("/nowhere.json")

    assert html.status_code == 404 and html.mimetype == "text/html" and "Back to the dashboard" in html.text
    assert json.status_code == 404 and json.get_json()["status"] == 404


@pytest.mark.parametrize("path", ["/", "/monitoring", "/monitoring.json", "/healthz"])
def test_wrong_method_is_405_and_says_which_are_allowed(client, path):
    response = client.post(path)

    assert response.status_code == 405
    assert "GET" in response.headers.get("Allow", "").split(", ")


@pytest.mark.parametrize(
    ("path", "status", "mimetype"),
    [
        ("/?minutes=%00&page=%FF", 400, "text/html"),
        ("/?page=1e9", 400, "text/html"),
        ("/?page=99999999999999999999999999", 400, "text/html"),
        ("/monitoring?minutes=", 200, "image/svg+xml"),  # empty: the default window
        ("/monitoring?minutes=60&minutes=x", 200, "image/svg+xml"),  # the first value counts
        ("/monitoring.json?minutes=ALL", 400, "application/json"),
        ("/image/%00", 400, "text/html"),
        ("/image/" + "a" * 5000, 400, "text/html"),
        ("/image/" + "a" * 32 + ".json.json", 400, "application/json"),
        ("/image/" + "%F0%9F%98%80" * 8, 400, "text/html"),
        ("/static/../../etc/passwd", 404, "text/html"),
        ("/static/%2e%2e/setup.cfg", 404, "text/html"),
        ("/static/..%2fsetup.cfg", 404, "text/html"),
    ],
)
def test_odd_input_is_a_client_error_or_a_default_never_a_500(client, path, status, mimetype):
    response = client.get(path)

    assert (response.status_code, response.mimetype) == (status, mimetype), response.text


def test_pages_say_503_while_mongo_is_down(mongo_down_client):
    html = mongo_down_client.get("/")
    json = mongo_down_client.get("/monitoring.json")
    png = mongo_down_client.get("/image/0123456789abcdef0123456789abcdef")

    assert html.status_code == 503 and html.mimetype == "text/html" and "try again" in html.text
    assert json.status_code == 503 and json.get_json()["error"] == "Service Unavailable"
    assert png.status_code == 503


def test_the_web_process_logs_no_url_credentials():
    # In a process of its own: importing image_crawler.actors (other tests do) would install the
    # redaction for the whole test session.
    script = """
import logging, sys
from web import create_app
app = create_app({"MONGO_URI": "mongodb://127.0.0.1:1/x", "REDIS_URL": "redis://127.0.0.1:1/0"})
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
app.logger.warning("MongoDB unavailable: %s", "auth failed for mongodb://crawler:hunter2@db.internal/x")
try:
    raise RuntimeError("cannot reach redis://:hunter2@cache.internal:6379/0")
except RuntimeError:
    app.logger.exception("unexpected")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert "mongodb://***@db.internal/x" in done.stderr and "redis://***@cache.internal" in done.stderr
    assert "hunter2" not in done.stderr
