"""End to end with MONGO_URI: after a multi-process crawl, the web app shows exactly what was stored."""

from __future__ import annotations

import re

from flask.testing import FlaskClient
from pymongo.database import Database

from image_crawler import storage
from support.http_server import LocalHttpServer
from support.images import png_bytes
from support.processes import crawl
from web import create_app


def check_web_app_matches_crawl(client: FlaskClient, db: Database, summary: dict[str, int]) -> None:
    """/monitoring.json totals equal the crawl's summary, and every stored MD5 is served as stored.

    ``client`` is a test client of ``create_app({"MONGO_URI": <the crawl's database>})``; ``db``
    the same database through pymongo; ``summary`` the counts ``enqueue --wait`` printed.
    """
    buckets = client.get("/monitoring.json?minutes=all").get_json()["buckets"]
    assert {name: sum(b[name] for b in buckets) for name in summary} == summary
    assert client.get("/healthz").status_code == 200
    page = client.get("/")
    assert (
        page.status_code == 200 and f'<span class="count">{sum(summary.values()):,}</span> urls' in page.text
    )
    files = storage.gray_files(db)
    md5s = storage.images(db).distinct("_id")
    assert len(md5s) == summary["success"]
    for md5 in md5s:
        response = client.get(f"/image/{md5}")
        assert response.status_code == 200 and response.mimetype == "image/png", md5
        assert response.data == files.get(md5).read(), md5
        assert client.get(f"/image/{md5}", headers={"If-None-Match": f'"{md5}"'}).status_code == 304
        meta = client.get(f"/image/{md5}.json").get_json()
        document = storage.images(db).find_one({"_id": md5})
        assert (meta["width"], meta["height"]) == (document["width"], document["height"])


def test_web_app_serves_what_the_crawl_stored(crawl_env, tmp_path):
    env, db = crawl_env
    with LocalHttpServer() as server:
        lines = []
        for n in range(40):
            server.add(
                f"/img/{n}.png", png_bytes(30 + n, 20 + n % 7, seed=1000 + n), content_type="image/png"
            )
            lines.append(server.url(f"/img/{n}.png"))
        lines += [server.url(f"/img/{n}.png?again") for n in range(10)]
        for n in range(5):
            server.add(f"/gone/{n}", status=404)
            lines.append(server.url(f"/gone/{n}"))
        result = crawl(env, tmp_path / "urls.txt", lines)
    assert result.returncode == 0, result.stderr
    done = re.search(r"(\d+) success, (\d+) duplicate, (\d+) error", result.stdout.strip().splitlines()[-1])
    assert done is not None, result.stdout
    summary = dict(zip(("success", "duplicate", "error"), map(int, done.groups()), strict=True))
    assert summary == {"success": 40, "duplicate": 10, "error": 5}

    app = create_app({"MONGO_URI": env["MONGO_URI"], "REDIS_URL": env["REDIS_URL"]})
    check_web_app_matches_crawl(app.test_client(), db, summary)
