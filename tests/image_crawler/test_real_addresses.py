"""The private-address policy in the whole pipeline, with its default setting, on real sockets.

The suite runs with ``FETCH_ALLOW_PRIVATE=1`` (its servers are on 127.0.0.1); these pipelines
set ``fetch_allow_private=False``, as every deployment does. Names that must look public go
through ``support.network.FakeNetwork``: ``socket.getaddrinfo`` (the resolver the network
backend calls) answers a public address for them, and the connection to that address is
forwarded to a local server. Nothing else is faked: the fetcher's backend, its address check,
its redirects and the worker are the real ones (README "Security", docs/architecture.md
"Addresses").
"""

from __future__ import annotations

import pytest

from image_crawler import storage
from support.images import png_bytes
from support.network import PUBLIC_STAND_IN, FakeNetwork

SECRET = b"the admin panel, or a cloud metadata endpoint"


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> FakeNetwork:
    return FakeNetwork(monkeypatch)


def _crawl(pipeline, urls: list[str]) -> dict[str, tuple[str, str | None]]:
    """Enqueue ``urls``, wait for their outcomes: ``{url: (outcome, reason)}``."""
    report = pipeline.enqueue_text("".join(f"{url}\n" for url in urls))
    assert report.enqueued == len(urls)
    pipeline.wait_for(report.run, report.jobs, timeout=60)
    ledger = storage.ledger(pipeline.db).find({"run": report.run})
    return {doc["url"]: (doc["outcome"], doc.get("reason")) for doc in ledger}


def test_a_url_on_loopback_ends_as_private_address_and_the_server_sees_nothing(make_pipeline, server):
    server.add("/secret.png", body=png_bytes(20, 20, seed=1), content_type="image/png")
    pipeline = make_pipeline(fetch_allow_private=False)
    urls = [
        server.url("/secret.png"),
        f"http://localhost:{server.port}/secret.png",
        f"http://2130706433:{server.port}/secret.png",  # 127.0.0.1 as one number: resolved, then refused
    ]

    outcomes = _crawl(pipeline, urls)

    assert outcomes == dict.fromkeys(urls, ("error", "private address"))
    assert server.requests() == []
    assert server.connections() == 0  # refused before connecting, not after
    assert storage.images(pipeline.db).count_documents({}) == 0


def test_a_public_name_is_downloaded_through_the_address_that_was_checked(make_pipeline, server, network):
    # What the refusals below are measured against: the same name, on the same plumbing, works.
    body = png_bytes(24, 16, seed=2)
    server.add("/cat.png", body=body, content_type="image/png")
    network.name("images.example", [PUBLIC_STAND_IN])
    network.forward(PUBLIC_STAND_IN, server.port, server.port)
    pipeline = make_pipeline(fetch_allow_private=False)
    url = f"http://images.example:{server.port}/cat.png"

    assert _crawl(pipeline, [url]) == {url: ("success", None)}
    assert [(host, path) for _, host, path, _ in server.requests()] == [
        (f"images.example:{server.port}", "/cat.png")
    ]
    assert network.connected() == [(PUBLIC_STAND_IN, server.port)]
    assert server.connections() == 1  # what the refusals' "0" is counted with
    assert network.lookups("images.example") == 1


@pytest.mark.parametrize(
    ("target", "answers"),
    [
        ("http://127.0.0.1:{port}/secret.png", {}),
        ("http://localhost:{port}/secret.png", {}),
        ("http://internal.example:{port}/secret.png", {"internal.example": ["127.0.0.1"]}),
        # One private address among public ones is enough to refuse the name.
        ("http://half.example:{port}/secret.png", {"half.example": [PUBLIC_STAND_IN, "127.0.0.1"]}),
    ],
    ids=["loopback literal", "localhost", "name resolving to loopback", "name with one private address"],
)
def test_a_public_name_that_redirects_to_a_private_address_is_refused_at_the_hop(
    make_pipeline, server, network, target, answers
):
    target = target.format(port=server.port)
    server.add_redirect("/a.png", target)
    server.add("/secret.png", body=SECRET, content_type="image/png")
    network.name("images.example", [PUBLIC_STAND_IN])
    for name, addresses in answers.items():
        network.name(name, addresses)
    network.forward(PUBLIC_STAND_IN, server.port, server.port)
    pipeline = make_pipeline(fetch_allow_private=False)
    url = f"http://images.example:{server.port}/a.png"

    assert _crawl(pipeline, [url]) == {url: ("error", "private address")}
    assert server.hits("/a.png") == 1  # the public hop was answered
    assert server.hits("/secret.png") == 0  # the private one never asked
    assert network.connected() == [(PUBLIC_STAND_IN, server.port)]  # and never connected to


def test_every_hop_is_checked_not_only_the_first_redirect(make_pipeline, server, network):
    server.add_redirect("/a.png", f"http://cdn.example:{server.port}/b.png")
    server.add_redirect("/b.png", f"http://127.0.0.1:{server.port}/secret.png")
    server.add("/secret.png", body=SECRET, content_type="image/png")
    network.name("images.example", [PUBLIC_STAND_IN])
    network.name("cdn.example", [PUBLIC_STAND_IN])
    network.forward(PUBLIC_STAND_IN, server.port, server.port)
    pipeline = make_pipeline(fetch_allow_private=False)
    url = f"http://images.example:{server.port}/a.png"

    assert _crawl(pipeline, [url]) == {url: ("error", "private address")}
    assert [path for _, _, path, _ in server.requests()] == ["/a.png", "/b.png"]
    assert server.hits("/secret.png") == 0
