"""A real browser (headless Chromium) loads the dashboard and the histogram from a running app.

Screenshots go to ``$WEB_SHOTS_DIR`` when set (to look at them), else to the test's tmp dir.
Any message on the browser console (a script error, a resource refused by the
Content-Security-Policy) fails the test, and so does any request the app did not answer
with 200/304 (Chromium does not print failed loads on stderr): the pages write nothing to the
console when all is well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image
from werkzeug.serving import make_server

from image_crawler import outcomes
from support.skips import unavailable
from web import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    if CHROMIUM is None:
        unavailable("Chromium is not installed (apt-get install chromium; .ci/run does)")


_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]
# Chromium logs every console message (log, warning, error, CSP refusal) on stderr this way.
_CONSOLE = re.compile(r":CONSOLE[(:]\d*\)?\] (.*)")

SVG = "{http://www.w3.org/2000/svg}"


class Browser:
    """Runs headless Chromium once per page; collects what it printed on the console."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.console: list[str] = []

    def run(self, url: str, *args: str) -> str:
        command = [str(CHROMIUM), *_FLAGS, f"--user-data-dir={self.profile}", *args, url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        self.console += [f"{url}: {message}" for message in _CONSOLE.findall(done.stderr)]
        return done.stdout

    def screenshot(self, url: str, path: Path, width: int, height: int) -> Image.Image:
        self.run(url, f"--screenshot={path}", f"--window-size={width},{height}")
        with Image.open(path) as shot:
            return shot.convert("RGB")

    def dom(self, url: str, *args: str) -> str:
        return self.run(url, "--dump-dom", "--window-size=1280,2000", *args)


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots are written."""
    directory = Path(os.environ.get("WEB_SHOTS_DIR") or tmp_path / "shots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browser(tmp_path) -> Browser:
    """Headless Chromium with a throw-away profile."""
    return Browser(tmp_path / "profile")


@pytest.fixture
def crawled(seed) -> list[str]:
    """A database as a crawl leaves it: images, and a run of 150 lines, 120 ended over the last half hour."""
    outcomes.start_run(seed.db, "seed")
    outcomes.run_progress(seed.db, "seed", enqueued=150, rejected=0, skipped=0, sent=True)
    md5s = [seed.image(n, width=60 + 7 * n, height=40 + 3 * n) for n in range(10)]
    for minutes_ago, (success, duplicate, error) in {
        25: (12, 3, 2),
        24: (20, 0, 1),
        21: (8, 6, 0),
        12: (0, 0, 5),
        7: (30, 10, 4),
        2: (15, 2, 1),
    }.items():
        seed.outcome("success", minutes_ago=minutes_ago, count=success)
        seed.outcome("duplicate", minutes_ago=minutes_ago, count=duplicate)
        seed.outcome("error", minutes_ago=minutes_ago, count=error, reason="http 404")
    seed.outcome(
        "error",
        minutes_ago=1,
        url='http://evil.test/<script>alert("url")</script>',
        reason="<script>alert('reason')</script>",
    )
    return md5s


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], tuple[str, list[tuple[str, int]]]]]:
    """Serve an app over HTTP on a free port: gives its base URL and the log of (path, status)."""
    servers = []

    def start(app: Flask) -> tuple[str, list[tuple[str, int]]]:
        answered: list[tuple[str, int]] = []
        wsgi_app = app.wsgi_app

        def recording(environ, start_response):
            def start(status, headers, exc_info=None):
                path = environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")
                answered.append((path, int(status[:3])))
                return start_response(status, headers, exc_info)

            return wsgi_app(environ, start)

        app.wsgi_app = recording  # type: ignore[method-assign]
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}", answered

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def served(app, crawled, serve) -> tuple[str, list[tuple[str, int]]]:
    """The app serving the crawled database."""
    return serve(app)


def colour_share(image: Image.Image, rgb: tuple[int, int, int]) -> float:
    """Share of the pixels within a small distance of ``rgb``."""
    pixels = np.asarray(image, dtype=np.int16)
    return float((np.abs(pixels - np.array(rgb)).sum(axis=-1) <= 30).mean())


# The chart draws its bars in these colours at pygal's default 0.7 opacity on white.
_BAR_COLOURS = {"success": (109, 187, 124), "duplicate": (128, 161, 212), "error": (224, 122, 117)}


def test_histogram_renders_with_bars_in_the_browser(served, browser, shots):
    base, answered = served

    shot = browser.screenshot(f"{base}/monitoring?minutes=30", shots / "monitoring.png", 900, 360)
    dom = browser.dom(f"{base}/monitoring?minutes=30")

    assert len(shot.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "blank screenshot"
    for name, rgb in _BAR_COLOURS.items():
        assert colour_share(shot, rgb) > 0.002, f"no {name} bars in the screenshot"
    root = ET.fromstring(dom[dom.index("<svg") :])
    bars = [
        rect
        for rect in root.iter(f"{SVG}rect")
        if "rect" in (rect.get("class") or "").split() and float(rect.get("height", 0)) > 0
    ]
    assert len(bars) == 15  # the non-zero (minute, outcome) pairs of the crawl
    assert browser.console == []
    assert all(status == 200 for _, status in answered), answered


class _Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.html_attrs: dict[str, str | None] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        elif tag == "html":
            self.html_attrs = dict(attrs)


def test_dashboard_renders_and_refreshes_itself_in_the_browser(served, browser, shots, crawled):
    base, answered = served

    shot = browser.screenshot(f"{base}/", shots / "dashboard.png", 1280, 2000)
    # Virtual time lets the page's 5 s refresh timer fire (and its fetch finish) before the dump.
    page = _Page(browser.dom(f"{base}/", "--virtual-time-budget=12000"))

    assert len(shot.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, "blank screenshot"
    assert colour_share(shot, _BAR_COLOURS["success"]) > 0.0005, "no histogram bars on the dashboard"
    assert {f"/image/{md5}" for md5 in crawled} <= set(page.images)
    assert any(src.startswith("/monitoring?minutes=60") for src in page.images)
    assert "data-refreshed-at" in page.html_attrs, "the refresh script did not run"
    assert browser.console == []
    paths = [path for path, _ in answered]
    assert sum(1 for path in paths if path.startswith("/?")) >= 3  # two loads and one refresh
    for needed in ("/static/style.css?", "/static/dashboard.js?", "/monitoring?minutes=60"):
        assert any(path.startswith(needed) for path in paths), needed
    assert {f"/image/{md5}?" for md5 in crawled} <= set(paths), "gallery images were not loaded"
    assert all(status in (200, 304) for _, status in answered), answered


def test_a_run_page_renders_with_its_progress_chart_and_failed_list_in_the_browser(served, browser, shots):
    base, answered = served

    shot = browser.screenshot(f"{base}/runs/seed", shots / "run.png", 1280, 1600)
    dom = browser.dom(f"{base}/runs/seed")

    assert len(shot.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, "blank screenshot"
    assert colour_share(shot, _BAR_COLOURS["error"]) > 0.0005, "no histogram bars on the run page"
    assert '<progress max="150" value="120"' in dom
    assert 'href="/runs/seed/failed.txt"' in dom
    assert browser.console == []
    paths = [path for path, _ in answered]
    assert any(path.startswith("/monitoring?") and "run=seed" in path for path in paths), paths
    assert all(status in (200, 304) for _, status in answered), answered


def test_empty_database_renders_in_the_browser(app, serve, browser, shots):
    base, answered = serve(app)

    dashboard = browser.screenshot(f"{base}/", shots / "dashboard-empty.png", 1280, 900)
    chart = browser.screenshot(f"{base}/monitoring", shots / "monitoring-empty.png", 900, 360)

    assert len(dashboard.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    assert len(chart.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 5
    assert browser.console == []
    assert all(status in (200, 304) for _, status in answered), answered


def test_the_checks_see_script_errors_refusals_and_failed_loads(app, served, browser):
    # A page with three faults, served by the same app (and so under the same security headers).
    app.add_url_rule(
        "/faulty",
        "faulty",
        lambda: '<script>inline()</script><script src="/faulty.js"></script><img src="/image/nope">',
    )
    app.add_url_rule("/faulty.js", "faulty_js", lambda: ("missing();", {"Content-Type": "text/javascript"}))
    base, answered = served

    browser.dom(f"{base}/faulty")

    console = "\n".join(browser.console)
    assert "Content Security Policy" in console and "Uncaught ReferenceError" in console, console
    # Chromium does not print failed loads on stderr: the server's log of statuses catches them.
    assert ("/image/nope?", 400) in answered


def test_dashboard_works_behind_basic_auth_in_the_browser(mongo_db, redis_url, crawled, serve, browser):
    app = create_app(
        {
            "MONGO_DATABASE": mongo_db,
            "REDIS_URL": redis_url,
            "WEB_USER": "crawler",
            "WEB_PASSWORD": "s3cret pw",
        }
    )
    base, answered = serve(app)
    signed_in = base.replace("http://", "http://crawler:s3cret%20pw@")

    browser.dom(f"{base}/")
    refused = list(answered)
    page = _Page(browser.dom(f"{signed_in}/", "--virtual-time-budget=12000"))

    assert refused and all(status == 401 for _, status in refused), refused
    assert {f"/image/{md5}" for md5 in crawled} <= set(page.images)
    assert "data-refreshed-at" in page.html_attrs, "the refresh script did not run"
    assert browser.console == []
    signed = answered[len(refused) :]
    paths = [path for path, status in signed if status in (200, 304)]
    assert sum(1 for path in paths if path.startswith("/?")) >= 2  # the page, and the script's refresh
    for needed in ("/static/style.css?", "/static/dashboard.js?", "/monitoring?minutes=60"):
        assert any(path.startswith(needed) for path in paths), needed
    assert {f"/image/{md5}?" for md5 in crawled} <= set(paths), "gallery images were not loaded"
