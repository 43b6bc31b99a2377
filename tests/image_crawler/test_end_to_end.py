"""Multi-process end to end: `dramatiq` CLI workers, `image-crawler enqueue --wait`, MongoDB at MONGO_URI."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from support.http_server import LocalHttpServer
from support.images import decode_png, expected_gray, png_bytes
from support.processes import crawl, image_crawler


def test_workers_and_enqueue_wait_give_exact_counts(crawl_env, tmp_path):
    env, db = crawl_env
    distinct = {n: png_bytes(40 + n % 50, 30 + n % 20, seed=n) for n in range(200)}
    with LocalHttpServer() as server:
        lines = []
        for n, body in distinct.items():
            server.add(f"/img/{n}.png", body, content_type="image/png")
            lines.append(server.url(f"/img/{n}.png"))
        for n in range(60):  # 30 URLs seen twice, 30 other URLs with bytes seen before
            if n % 2:
                lines.append(server.url(f"/img/{n}.png"))
            else:
                server.add(f"/copy/{n}.png", distinct[n], content_type="image/png")
                lines.append(server.url(f"/copy/{n}.png"))
        for n in range(20):
            server.add(f"/gone/{n}", status=404)
            server.add(f"/page/{n}", b"<html>no</html>", content_type="text/html")
            lines += [server.url(f"/gone/{n}"), server.url(f"/page/{n}")]
        lines += ["# comment", "", "mailto:someone@example.com"]
        result = crawl(env, tmp_path / "urls.txt", lines)

    assert result.returncode == 0, result.stderr
    assert "enqueued 300 urls (1 rejected lines, 2 blank or comment lines skipped)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "done: 301 urls — 200 success, 60 duplicate, 41 error"

    ledger = db.outcomes
    assert ledger.count_documents({}) == 301
    assert len(ledger.distinct("_id")) == 301
    assert {
        r["_id"]: r["n"] for r in ledger.aggregate([{"$group": {"_id": "$reason", "n": {"$sum": 1}}}])
    } == {
        None: 260,
        "http 404": 20,
        "not an image": 20,
        "not an http(s) url": 1,
    }
    assert db.images.count_documents({}) == 200
    assert db["gray.files"].count_documents({}) == 200
    assert set(db.images.distinct("_id")) == {hashlib.md5(body).hexdigest() for body in distinct.values()}
    for n in range(0, 200, 17):
        digest = hashlib.md5(distinct[n]).hexdigest()
        stored = db["gray.files"].find_one({"_id": digest})
        assert stored["filename"] == f"{digest}.png" and stored["contentType"] == "image/png"
        chunks = db["gray.chunks"].find({"files_id": digest}, sort=[("n", 1)])
        mode, pixels = decode_png(b"".join(chunk["data"] for chunk in chunks))
        assert mode == "L" and np.array_equal(pixels, expected_gray(distinct[n]))

    status = image_crawler(env, "status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"done: 301 urls — 200 success, 60 duplicate, 41 error", status.stdout)
