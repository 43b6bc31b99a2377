"""The workers' download counters in Redis: bytes and number of the bodies fetched in full."""

from __future__ import annotations

import pytest
import redis

from image_crawler import storage
from image_crawler.context import DOWNLOADED_BODIES_KEY, DOWNLOADED_BYTES_KEY, count_downloads
from support.http_server import LocalHttpServer, Response
from support.images import png_bytes


@pytest.fixture
def server():
    with LocalHttpServer() as running:
        yield running


def _counted(client: redis.Redis) -> tuple[int, int]:
    size, bodies = client.mget(DOWNLOADED_BYTES_KEY, DOWNLOADED_BODIES_KEY)
    return int(size or 0), int(bodies or 0)


@pytest.mark.parametrize("batch_size", [1, 8], ids=["one url per message", "batches"])
def test_the_counters_add_up_the_bodies_served_in_full(make_pipeline, server, download_counters, batch_size):
    images = {f"/img/{n}.png": png_bytes(40 + 7 * n, 30 + n, seed=n) for n in range(4)}
    for path, body in images.items():
        server.add(path, body=body, content_type="image/png")
    not_an_image = b"<html><body>no image here</body></html>"
    server.add("/page.png", body=not_an_image, content_type="image/png")  # downloaded, then rejected
    server.add("/missing.png", status=404)  # no body downloaded
    server.add("/huge.png", body=png_bytes(700, 700, seed=5), content_type="image/png")  # cut short
    server.add_sequence("/flaky.png", [Response(status=503), Response(body=images["/img/0.png"])])
    pipeline = make_pipeline(fetch_timeout=1.0, fetch_max_bytes=300_000, batch_size=batch_size)
    paths = [*images, "/img/1.png", "/page.png", "/missing.png", "/huge.png", "/flaky.png"]

    report = pipeline.enqueue_text("".join(f"{server.url(path)}\n" for path in paths))
    pipeline.wait_for(report.run, report.jobs, timeout=60)

    # Every body read to its end counts, whatever became of it: a duplicate URL is fetched (and
    # counted) again, a body that is no image was still downloaded; a 503, a 404 and a body over
    # FETCH_MAX_BYTES were not downloaded in full.
    full = [*images.values(), images["/img/1.png"], not_an_image, images["/img/0.png"]]
    assert _counted(download_counters) == (sum(len(body) for body in full), len(full))
    assert storage.ledger(pipeline.db).count_documents({"run": report.run}) == len(paths)


def test_a_crawl_that_downloads_nothing_leaves_the_counters_alone(make_pipeline, server, download_counters):
    server.add("/missing.png", status=404)
    pipeline = make_pipeline()

    report = pipeline.enqueue_text(f"{server.url('/missing.png')}\n")
    pipeline.wait_for(report.run, report.jobs)

    assert download_counters.exists(DOWNLOADED_BYTES_KEY, DOWNLOADED_BODIES_KEY) == 0


def test_count_downloads_rides_the_pipeline_it_is_given_and_skips_nothing_to_count(download_counters):
    with download_counters.pipeline(transaction=False) as pipe:
        count_downloads(pipe, 0, 0)
        assert len(pipe) == 0, "nothing to count: no command"
        count_downloads(pipe, 2, 1_500)
        count_downloads(pipe, 1, 0)  # an empty body is a body downloaded in full
        assert _counted(download_counters) == (0, 0), "sent only with the pipeline"
        pipe.execute()

    assert _counted(download_counters) == (1_500, 3)
