"""What a Fetcher refuses to take from its surroundings, on real sockets: proxies, cookies, TLS trust.

The fetcher's module docstring: no cookies are kept and the environment (proxies…) is ignored,
since one client serves every job of a worker. README "Troubleshooting": ``HTTP_PROXY`` and
``HTTPS_PROXY`` are ignored on purpose. ``fetching._fetch_error``: a certificate that fails
verification is ``tls certificate rejected`` (permanent), any other TLS failure ``tls error``
(transient). Each test also shows, with a plain httpx client, that what it sets up would change
the outcome of a client that did take it: none of them passes for want of a working trap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from image_crawler import storage
from image_crawler.config import Settings
from image_crawler.errors import ConnectionFailed, CrawlError, FetchError
from image_crawler.fetching import Fetcher
from support.http_server import LocalHttpServer
from support.images import png_bytes
from support.tls import SelfSigned, self_signed

LOCAL = Settings(fetch_timeout=5.0, fetch_max_redirects=3, fetch_allow_private=True)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
CAT = png_bytes(16, 16, seed=3)


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    with Fetcher(LOCAL) as made:
        yield made


@pytest.fixture
def certificate(tmp_path) -> SelfSigned:
    return self_signed(tmp_path, ("127.0.0.1", "localhost"))


@pytest.fixture
def tls_server(certificate: SelfSigned) -> Iterator[LocalHttpServer]:
    with LocalHttpServer(ssl_context=certificate.server_context()) as running:
        running.add("/cat.png", body=CAT, content_type="image/png")
        yield running


def _error_of(fetcher: Fetcher, url: str) -> CrawlError:
    with pytest.raises(CrawlError) as caught:
        fetcher.fetch(url)
    return caught.value


def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _crawl(pipeline, urls: list[str]) -> dict[str, tuple[str, str | None]]:
    """Enqueue ``urls``, wait for their outcomes: ``{url: (outcome, reason)}``."""
    report = pipeline.enqueue_text("".join(f"{url}\n" for url in urls))
    pipeline.wait_for(report.run, report.jobs, timeout=60)
    ledger = storage.ledger(pipeline.db).find({"run": report.run})
    return {doc["url"]: (doc["outcome"], doc.get("reason")) for doc in ledger}


# --- proxies in the environment ------------------------------------------------------------


@pytest.fixture
def dead_proxy(monkeypatch: pytest.MonkeyPatch, dead_port: int) -> str:
    """Every proxy variable names a port where nothing listens; nothing is exempt from them."""
    proxy = f"http://127.0.0.1:{dead_port}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return proxy


def test_a_client_that_trusts_the_environment_would_go_through_the_dead_proxy(dead_proxy, server):
    server.add("/cat.png", body=CAT)

    with httpx.Client(trust_env=True) as client, pytest.raises(httpx.ConnectError):
        client.get(server.url("/cat.png"))
    assert server.requests() == []


def test_proxies_in_the_environment_are_ignored_by_the_fetcher(dead_proxy, server):
    server.add("/cat.png", body=CAT, content_type="image/png")

    with Fetcher(LOCAL) as fetcher:  # made while the variables are set
        download = fetcher.fetch(server.url("/cat.png"))

    assert download.content == CAT
    assert server.hits("/cat.png") == 1  # straight to the server, not through a proxy


def test_proxies_in_the_environment_are_ignored_by_the_pipeline(dead_proxy, make_pipeline, server):
    server.add("/cat.png", body=CAT, content_type="image/png")
    pipeline = make_pipeline()
    url = server.url("/cat.png")

    assert _crawl(pipeline, [url]) == {url: ("success", None)}
    assert server.hits("/cat.png") == 1


# --- cookies -----------------------------------------------------------------------------------

SET_COOKIE = {"Set-Cookie": "session=s3cret; Path=/"}


def test_a_client_with_a_cookie_jar_would_send_the_cookie_back(server):
    server.add("/login", body=b"welcome", headers=SET_COOKIE)
    server.add("/cat.png", body=CAT)

    with httpx.Client() as client:
        client.get(server.url("/login"))
        client.get(server.url("/cat.png"))

    assert server.header_values("/cat.png", "Cookie") == ["session=s3cret"]


def test_a_cookie_a_response_sets_is_never_sent_back(fetcher, server):
    server.add("/login", body=b"welcome", headers=SET_COOKIE)
    server.add("/cat.png", body=CAT)

    fetcher.fetch(server.url("/login"))
    fetcher.fetch(server.url("/cat.png"))
    fetcher.fetch(server.url("/login"))

    assert server.header_values("/cat.png", "Cookie") == [None]
    assert server.header_values("/login", "Cookie") == [None, None]


def test_a_cookie_a_redirect_sets_is_not_sent_to_the_next_hop(fetcher, server):
    server.add("/go", status=302, headers={**SET_COOKIE, "Location": "/cat.png"}, content_type=None)
    server.add("/cat.png", body=CAT)

    assert fetcher.fetch(server.url("/go")).content == CAT
    assert server.header_values("/cat.png", "Cookie") == [None]

    with httpx.Client(follow_redirects=True) as client:  # where the trap would catch a cookie jar
        client.get(server.url("/go"))
    assert server.header_values("/cat.png", "Cookie") == [None, "session=s3cret"]


def test_a_cookie_one_job_gets_never_reaches_the_next_job(make_pipeline, server):
    server.add("/login.png", body=CAT, content_type="image/png", headers=SET_COOKIE)
    server.add("/cat.png", body=png_bytes(18, 18, seed=4), content_type="image/png")
    pipeline = make_pipeline()

    first = _crawl(pipeline, [server.url("/login.png")])
    second = _crawl(pipeline, [server.url("/cat.png")])  # the same worker's Fetcher, later

    assert first == {server.url("/login.png"): ("success", None)}
    assert second == {server.url("/cat.png"): ("success", None)}
    assert server.header_values("/cat.png", "Cookie") == [None]


# --- TLS ---------------------------------------------------------------------------------------


def test_the_local_https_server_serves_a_client_that_trusts_its_certificate(certificate, tls_server):
    # What the refusals below are measured against: the server's TLS works, for 127.0.0.1.
    response = httpx.get(tls_server.url("/cat.png"), verify=certificate.client_context())

    assert response.content == CAT
    assert tls_server.tls_failures() == 0


def test_a_self_signed_certificate_ends_as_tls_certificate_rejected(fetcher, tls_server):
    error = _error_of(fetcher, tls_server.url("/cat.png"))

    assert type(error) is FetchError  # not ConnectionFailed: no retry will fix a certificate
    assert (error.reason, error.transient) == ("tls certificate rejected", False)
    assert _eventually(lambda: tls_server.tls_failures() == 1)
    assert tls_server.requests() == []  # no request went over the refused connection


def test_a_self_signed_certificate_ends_a_crawled_url_at_once(make_pipeline, tls_server):
    pipeline = make_pipeline()  # FETCH_RETRIES=2: a transient error would be tried three times
    url = tls_server.url("/cat.png")

    assert _crawl(pipeline, [url]) == {url: ("error", "tls certificate rejected")}
    assert _eventually(lambda: tls_server.tls_failures() >= 1)
    time.sleep(0.2)
    assert tls_server.tls_failures() == 1  # tried once: permanent
    assert tls_server.requests() == []


def test_ssl_cert_file_in_the_environment_is_not_trusted(monkeypatch, certificate, tls_server):
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    # A client that trusts the environment now accepts the certificate...
    assert httpx.get(tls_server.url("/cat.png"), trust_env=True).content == CAT

    with Fetcher(LOCAL) as fetcher:  # ...one made while it is set does not.
        error = _error_of(fetcher, tls_server.url("/cat.png"))

    assert error.reason == "tls certificate rejected"
    assert tls_server.hits("/cat.png") == 1  # the trusting client's request only


def test_https_to_a_server_that_does_not_speak_tls_is_a_transient_tls_error(fetcher, server):
    server.add("/cat.png", body=CAT)

    error = _error_of(fetcher, f"https://127.0.0.1:{server.port}/cat.png")

    assert isinstance(error, ConnectionFailed)
    assert (error.reason, error.transient) == ("tls error", True)
    assert server.hits("/cat.png") == 0
