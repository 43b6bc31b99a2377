"""Downloading: limits, typed errors and the private-address policy.

The limits are those of docs/architecture.md, "Limits of a download".
"""

from __future__ import annotations

import gzip
import select
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from image_crawler import fetching
from image_crawler.config import Settings
from image_crawler.errors import (
    ConnectionFailed,
    CrawlError,
    FetchError,
    FetchTimeout,
    ForbiddenAddress,
    HttpStatusError,
    InvalidUrl,
    TooLarge,
    TooManyRedirects,
)
from image_crawler.fetching import (
    MAX_URL_LENGTH,
    Download,
    Fetcher,
    _BodyDecoder,
    check_url,
    is_public_address,
)
from support.clock import FakeClock, fake_time_of
from support.http_server import LocalHttpServer, Response

MB = 1024 * 1024
LOCAL = Settings(fetch_timeout=5.0, fetch_max_bytes=1 * MB, fetch_max_redirects=3, fetch_allow_private=True)

MakeFetcher = Callable[..., Fetcher]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as server:
        yield server


@pytest.fixture
def make_fetcher() -> Iterator[MakeFetcher]:
    """Fetchers from LOCAL settings with some fields replaced; closed after the test."""
    fetchers: list[Fetcher] = []

    def make(transport: httpx.BaseTransport | None = None, resolver=None, **overrides: object) -> Fetcher:
        fetcher = Fetcher(replace(LOCAL, **overrides), transport=transport, resolver=resolver)
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.close()


def raises_from(fetcher: Fetcher, url: str) -> CrawlError:
    with pytest.raises(CrawlError) as caught:
        fetcher.fetch(url)
    return caught.value


# --- answers ----------------------------------------------------------------------------


def test_ok_response_returns_body_and_content_type(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/ok.png", body=b"\x89PNG fake", content_type="image/png")

    download = make_fetcher().fetch(server.url("/ok.png"))

    assert download == Download(b"\x89PNG fake", "image/png")


def test_empty_body_is_a_download_not_an_error(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/empty", body=b"", content_type=None)

    download = make_fetcher().fetch(server.url("/empty"))

    assert download.content == b""
    assert download.content_type is None


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_client_errors_are_final(server: LocalHttpServer, make_fetcher: MakeFetcher, status: int):
    server.add(f"/status/{status}", body=b"invalid size", status=status, content_type="text/plain")

    error = raises_from(make_fetcher(), server.url(f"/status/{status}"))

    assert isinstance(error, HttpStatusError)
    assert (error.status, error.reason, error.transient) == (status, f"http {status}", False)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_server_errors_and_throttling_are_transient(
    server: LocalHttpServer, make_fetcher: MakeFetcher, status: int
):
    server.add(f"/status/{status}", status=status)

    error = raises_from(make_fetcher(), server.url(f"/status/{status}"))

    assert isinstance(error, HttpStatusError)
    assert error.transient


def test_fetcher_does_not_retry_by_itself(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add_sequence("/flaky.png", [Response(status=503), Response(body=b"image")])
    fetcher = make_fetcher()

    first = raises_from(fetcher, server.url("/flaky.png"))
    second = fetcher.fetch(server.url("/flaky.png"))

    assert isinstance(first, HttpStatusError) and first.transient
    assert second.content == b"image"
    assert server.hits("/flaky.png") == 2


# --- time -------------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The fetcher's clock (its deadline, the time left for each request)."""
    fake = fake_time_of(monkeypatch, fetching)
    return fake


def test_hanging_server_times_out_after_the_fetch_timeout(
    server: LocalHttpServer, make_fetcher: MakeFetcher, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    server.add("/hang", body=b"late", delay=10)
    timeouts: list[dict[str, float | None]] = []
    send = httpx.Client.send

    def sending(client: httpx.Client, request: httpx.Request, **options: object) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return send(client, request, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.Client, "send", sending)

    error = raises_from(make_fetcher(fetch_timeout=0.5), server.url("/hang"))

    assert isinstance(error, FetchTimeout)
    assert (error.reason, error.transient) == ("timeout", True)
    assert isinstance(error.__cause__, httpx.ReadTimeout)  # the wait for the answer was cut…
    assert timeouts == [httpx.Timeout(0.5).as_dict()]  # …at the fetch's budget, not the server's 10 s
    assert server.hits("/hang") == 1


def test_slow_drip_is_cut_off_at_the_total_budget(
    server: LocalHttpServer, make_fetcher: MakeFetcher, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    body = b"x" * 100
    server.add("/drip", body=body, drip=0.5)  # each byte well within any read timeout
    pause = server._wait

    def drip(seconds: float) -> bool:  # the server's pause between bytes, on the fetcher's clock
        clock.now += seconds
        return pause(0.01)  # (and a moment of real time, for the fetcher to read each byte)

    monkeypatch.setattr(server, "_wait", drip)
    received: list[int] = []
    iter_raw = httpx.Response.iter_raw

    def counting(response: httpx.Response, chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in iter_raw(response, chunk_size):
            received.append(len(chunk))
            yield chunk

    monkeypatch.setattr(httpx.Response, "iter_raw", counting)

    error = raises_from(make_fetcher(fetch_timeout=2), server.url("/drip"))

    assert isinstance(error, FetchTimeout)
    # No read timed out: the budget ran out between reads, seen by the read loop or by the
    # connection refusing to start a read past the deadline.
    assert error.__cause__ is None or str(error.__cause__) == fetching._DEADLINE_PASSED
    assert 2 / 0.5 <= sum(received) < len(body)  # what came within the 2 s budget, far from all of it


class HeaderDripServer:
    """A raw HTTP/1.1 server on 127.0.0.1 that can send a response's head one byte at a time.

    ``routes`` maps a path to ``(head, body, drip)``: ``head`` is the status line and headers
    (ending in the blank line), sent a byte per ``pause`` when ``drip``, else at once, and then
    ``body``. Each connection serves one request (``Connection: close``). ``sent[path]`` is how
    many bytes of its head went out before the client closed the connection; ``hangups[path]``
    whether the client closed it before the whole response was sent.
    """

    def __init__(self, pause: float = 0.1) -> None:
        self.pause = pause
        self.routes: dict[str, tuple[bytes, bytes, bool]] = {}
        self.sent: dict[str, int] = {}
        self.hangups: dict[str, bool] = {}
        self._stopping = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}{path}"

    def add(self, path: str, head: bytes, body: bytes = b"", *, drip: bool = False) -> None:
        self.routes[path] = (head, body, drip)

    def finished(self, path: str) -> bool:
        """Wait (a while) for the connection that served ``path`` to be over; whether it is."""
        for thread in list(self._threads):
            thread.join(10)
        return path in self.sent

    def __enter__(self) -> HeaderDripServer:
        self._accepting.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                data = connection.recv(4096)
                if not data:
                    return
                request += data
            path = request.split(b" ", 2)[1].decode()
            head, body, drip = self.routes[path]
            sent, closed = 0, False
            if drip:
                for index in range(len(head)):
                    if self._client_closed(connection, self.pause):
                        closed = True
                        break
                    connection.sendall(head[index : index + 1])
                    sent += 1
            else:
                connection.sendall(head)
                sent = len(head)
            if not closed:
                connection.sendall(body)
                closed = self._client_closed(connection, 10)
            self.sent[path], self.hangups[path] = sent, closed

    def _client_closed(self, connection: socket.socket, wait: float) -> bool:
        """Whether the client closes the connection within ``wait`` seconds (or stops reading)."""
        if self._stopping.is_set():
            return True
        readable, _, _ = select.select([connection], [], [], wait)
        if not readable:
            return False
        try:
            return connection.recv(1) == b""
        except OSError:  # reset: the client closed with our bytes unread
            return True


def _head(status: str, headers: dict[str, str]) -> bytes:
    """A response head padded to 240 bytes; ``Connection: close``, every response its own connection."""
    fields = [f"{name}: {value}" for name, value in headers.items()]
    lines = [f"HTTP/1.1 {status}", *fields, "Connection: close"]
    head = "\r\n".join(lines) + "\r\n"
    padding = 240 - len(head) - len("X-Padding: \r\n\r\n")
    return (head + "X-Padding: " + "p" * padding + "\r\n\r\n").encode()


IMAGE = b"\x89PNG fine image"
IMAGE_HEAD = _head("200 OK", {"Content-Type": "image/png", "Content-Length": str(len(IMAGE))})


@pytest.mark.parametrize(
    "case",
    ["image whose head drips", "redirect whose head drips", "hop after a redirect drips"],
)
def test_a_response_head_sent_a_byte_at_a_time_is_cut_off_at_the_fetch_timeout(
    make_fetcher: MakeFetcher, case: str
):
    # Each byte comes well within any read timeout (0.1 s apart, the budget is 1 s): only a
    # deadline for the whole exchange stops the client from reading all 240 bytes (24 s).
    with HeaderDripServer(pause=0.1) as drip:
        if case == "image whose head drips":
            drip.add("/slow.png", IMAGE_HEAD, IMAGE, drip=True)
            start, dripped = "/slow.png", "/slow.png"
        elif case == "redirect whose head drips":
            moved = _head("302 Found", {"Location": "/fast.png", "Content-Length": "0"})
            drip.add("/moved", moved, drip=True)
            drip.add("/fast.png", IMAGE_HEAD, IMAGE)
            start, dripped = "/moved", "/moved"
        else:
            drip.add("/moved", _head("302 Found", {"Location": "/slow.png", "Content-Length": "0"}))
            drip.add("/slow.png", IMAGE_HEAD, IMAGE, drip=True)
            start, dripped = "/moved", "/slow.png"
        fetcher = make_fetcher(fetch_timeout=1)

        error = raises_from(fetcher, drip.url(start))

        assert drip.finished(dripped)
        assert isinstance(error, FetchTimeout)
        assert (error.reason, error.transient) == ("timeout", True)
        assert drip.hangups[dripped]  # the client hung up on the drip …
        assert drip.sent[dripped] < len(IMAGE_HEAD) / 2  # … long before its head was all sent
        assert "/fast.png" not in drip.sent  # (and never followed a dripping redirect)


def test_a_fetch_nested_in_a_hop_check_leaves_the_outer_deadline_in_force(make_fetcher: MakeFetcher):
    # robots.txt is fetched (by another Fetcher, on the same thread) from inside check_hop: once
    # it is done, the outer download's own deadline must still bound the hop it goes on to.
    with HeaderDripServer(pause=0.1) as drip, LocalHttpServer() as robots_host:
        robots_host.add("/robots.txt", body=b"User-agent: *\nAllow: /\n", content_type="text/plain")
        drip.add("/moved", _head("302 Found", {"Location": "/slow.png", "Content-Length": "0"}))
        drip.add("/slow.png", IMAGE_HEAD, IMAGE, drip=True)
        robots_fetcher = make_fetcher(fetch_timeout=5)
        nested: list[bytes] = []

        def check_hop(hop: str) -> None:
            nested.append(robots_fetcher.fetch(robots_host.url("/robots.txt")).content)

        with pytest.raises(FetchTimeout):
            make_fetcher(fetch_timeout=1).fetch(drip.url("/moved"), check_hop=check_hop)

        assert drip.finished("/slow.png")
        assert nested == [b"User-agent: *\nAllow: /\n"]
        assert drip.hangups["/slow.png"]
        assert drip.sent["/slow.png"] < len(IMAGE_HEAD) / 2


def test_a_kept_alive_connection_reused_by_another_thread_reads_that_threads_deadline(
    make_fetcher: MakeFetcher, clock: FakeClock
):
    with LocalHttpServer() as own:
        own.add("/kept.png", body=b"kept", content_type="image/png")
        fetcher = make_fetcher(fetch_timeout=1, fetch_concurrency=1)

        first = fetcher.fetch(own.url("/kept.png?1"))  # its deadline is long past after this:
        clock.now += 3600
        with ThreadPoolExecutor(max_workers=1) as other:  # a fetch of its own, in another thread
            second = other.submit(fetcher.fetch, own.url("/kept.png?2")).result()
        third = fetcher.fetch(own.url("/kept.png?3"))  # and again on this one, after that fetch

        assert [first.content, second.content, third.content] == [b"kept"] * 3
        assert own.connections() == 1  # one connection, used under three deadlines


# --- redirects --------------------------------------------------------------------------


def test_redirect_chain_within_the_limit_is_followed(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add_redirect("/hop/1", server.url("/hop/2"), status=301)
    server.add_redirect("/hop/2", "/hop/3", status=307)  # relative Location
    server.add_redirect("/hop/3", server.url("/hop/end?x=1"))
    server.add("/hop/end", body=b"arrived", content_type="image/gif")

    download = make_fetcher(fetch_max_redirects=3).fetch(server.url("/hop/1"))

    assert download == Download(b"arrived", "image/gif")
    assert [server.hits(f"/hop/{hop}") for hop in ("1", "2", "3", "end")] == [1, 1, 1, 1]


def test_more_redirects_than_allowed_fail(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add_redirect("/far/1", "/far/2")
    server.add_redirect("/far/2", "/far/3")
    server.add("/far/3", body=b"too far")

    error = raises_from(make_fetcher(fetch_max_redirects=1), server.url("/far/1"))

    assert isinstance(error, TooManyRedirects)
    assert (error.reason, error.transient) == ("too many redirects", False)
    assert server.hits("/far/3") == 0


def test_no_redirect_allowed_means_the_first_one_fails(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add_redirect("/once", "/landing")
    server.add("/landing", body=b"landed")

    assert isinstance(raises_from(make_fetcher(fetch_max_redirects=0), server.url("/once")), TooManyRedirects)


def test_endless_redirect_loop_fails(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add_redirect("/loop", "/loop")

    error = raises_from(make_fetcher(fetch_max_redirects=5), server.url("/loop"))

    assert isinstance(error, TooManyRedirects)
    assert server.hits("/loop") == 6


# --- size -------------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/exact", body=b"a" * MB, chunked=True)

    assert len(make_fetcher(fetch_max_bytes=MB).fetch(server.url("/exact")).content) == MB


def test_declared_length_over_the_limit_is_refused(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/big", body=b"a" * (MB + 1))

    error = raises_from(make_fetcher(fetch_max_bytes=MB), server.url("/big"))

    assert isinstance(error, TooLarge)
    assert (error.reason, error.transient) == ("too large", False)


def test_streamed_body_over_the_limit_is_aborted(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/big-chunked", body=b"a" * (8 * MB), chunked=True)

    assert isinstance(raises_from(make_fetcher(fetch_max_bytes=MB), server.url("/big-chunked")), TooLarge)


def test_gzip_body_is_decoded(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/small.gz", body=b"pixels " * 1000, content_type="image/x-portable-pixmap", gzip=True)

    download = make_fetcher().fetch(server.url("/small.gz"))

    assert download.content == b"pixels " * 1000
    assert download.content_type == "image/x-portable-pixmap"


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_body_is_decoded_wrapped_or_raw(server: LocalHttpServer, make_fetcher: MakeFetcher, wbits):
    compressor = zlib.compressobj(wbits=wbits)
    body = compressor.compress(b"deflated " * 500) + compressor.flush()
    server.add(f"/deflate/{wbits}", body=body, headers={"Content-Encoding": "deflate"})

    assert make_fetcher().fetch(server.url(f"/deflate/{wbits}")).content == b"deflated " * 500


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_body_whose_first_chunk_is_one_byte_is_decoded(wbits):
    compressor = zlib.compressobj(wbits=wbits)
    body = compressor.compress(b"deflated " * 500) + compressor.flush()
    decoder = _BodyDecoder("deflate")

    decoded = b"".join(piece for chunk in (body[:1], body[1:2], body[2:]) for piece in decoder.decode(chunk))
    decoder.finish()

    assert decoded == b"deflated " * 500


def test_deflate_body_dripped_one_byte_at_a_time_is_decoded(
    server: LocalHttpServer, make_fetcher: MakeFetcher
):
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS)
    body = compressor.compress(b"dripped " * 50) + compressor.flush()
    server.add("/deflate/drip", body=body, headers={"Content-Encoding": "deflate"}, drip=0.01)

    assert make_fetcher().fetch(server.url("/deflate/drip")).content == b"dripped " * 50


def test_gzip_bomb_is_aborted_without_inflating_it(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/bomb.gz", body=bytes(50 * MB), gzip=True)  # about 50 kB on the wire
    fetcher = make_fetcher(fetch_max_bytes=MB)

    tracemalloc.start()
    try:
        error = raises_from(fetcher, server.url("/bomb.gz"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert isinstance(error, TooLarge)
    assert peak < 8 * MB


def test_corrupt_gzip_is_a_final_error(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/corrupt.gz", body=b"this is not gzip", headers={"Content-Encoding": "gzip"})

    error = raises_from(make_fetcher(), server.url("/corrupt.gz"))

    assert type(error) is FetchError
    assert (error.reason, error.transient) == ("bad content encoding", False)


def test_encoding_we_did_not_ask_for_is_a_final_error(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/brotli", body=b"\x1b\x03", headers={"Content-Encoding": "br"})

    error = raises_from(make_fetcher(), server.url("/brotli"))

    assert (error.reason, error.transient) == ("unsupported content encoding", False)


# --- connections ------------------------------------------------------------------------


def test_connection_refused_is_transient(make_fetcher: MakeFetcher, dead_port: int):
    error = raises_from(make_fetcher(), f"http://127.0.0.1:{dead_port}/image.png")

    assert isinstance(error, ConnectionFailed)
    assert (error.reason, error.transient) == ("connection refused", True)


def test_connection_dropped_without_answer_is_transient(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/drop", abort=True)

    error = raises_from(make_fetcher(), server.url("/drop"))

    assert isinstance(error, ConnectionFailed)
    assert error.transient


def test_one_fetcher_serves_many_threads(server: LocalHttpServer, make_fetcher: MakeFetcher):
    for index in range(20):
        server.add(f"/many/{index}.png", body=bytes([index]) * 10_000, content_type="image/png")
    fetcher = make_fetcher()

    def fetch(n: int) -> bytes:
        return fetcher.fetch(server.url(f"/many/{n % 20}.png?n={n}")).content

    with ThreadPoolExecutor(max_workers=8) as pool:
        bodies = list(pool.map(fetch, range(200)))

    assert all(body == bytes([n % 20]) * 10_000 for n, body in enumerate(bodies))
    assert sum(server.hits(f"/many/{index}.png") for index in range(20)) == 200


def test_sequential_downloads_from_one_server_reuse_one_kept_alive_connection(make_fetcher: MakeFetcher):
    with LocalHttpServer() as own:  # its own server: the module's counts every test's connections
        for n in range(10):
            own.add(f"/seq/{n}.png", body=bytes([n]) * 1_000, content_type="image/png")
        fetcher = make_fetcher()

        bodies = [fetcher.fetch(own.url(f"/seq/{n}.png")).content for n in range(10)]

        assert bodies == [bytes([n]) * 1_000 for n in range(10)]
        assert own.connections() == 1  # ten requests, one TCP connection


@pytest.mark.parametrize("concurrency", [1, 3])
def test_the_pool_is_one_per_fetcher_and_as_large_as_fetch_concurrency(
    make_fetcher: MakeFetcher, concurrency
):
    with LocalHttpServer() as own:
        own.add("/held.png", body=b"held", content_type="image/png", delay=0.2)
        # Room for every request to wait its turn at the pool: 12 of them, `concurrency` at a time.
        fetcher = make_fetcher(fetch_concurrency=concurrency, fetch_timeout=30.0)

        def fetch(n: int) -> bytes:
            return fetcher.fetch(own.url(f"/held.png?n={n}")).content

        with ThreadPoolExecutor(max_workers=6) as pool:
            bodies = list(pool.map(fetch, range(12)))

        assert bodies == [b"held"] * 12
        # Six threads asking at once get FETCH_CONCURRENCY requests in flight, no more (httpcore's
        # own default would let all six through) …
        assert own.most_in_flight(f"127.0.0.1:{own.port}") == concurrency
        # … over that many connections, kept alive and shared by every thread.
        assert own.connections() == concurrency


def test_requests_identify_the_crawler(make_fetcher: MakeFetcher):
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"x")

    make_fetcher(transport=httpx.MockTransport(answer)).fetch("http://images.example/a.png")

    assert seen[0].headers["user-agent"].startswith("image-crawler/")
    assert seen[0].headers["accept-encoding"] == "gzip, deflate"


# --- private addresses ------------------------------------------------------------------


def test_loopback_is_refused_by_default(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/secret", body=b"admin panel")

    for url in (server.url("/secret"), f"http://localhost:{server.port}/secret"):
        error = raises_from(make_fetcher(fetch_allow_private=False), url)
        assert isinstance(error, ForbiddenAddress)
        assert (error.reason, error.transient) == ("private address", False)
    assert server.hits("/secret") == 0


def test_loopback_is_allowed_when_private_addresses_are(server: LocalHttpServer, make_fetcher: MakeFetcher):
    server.add("/internal.png", body=b"ok")

    assert make_fetcher(fetch_allow_private=True).fetch(server.url("/internal.png")).content == b"ok"


FAKE_DNS = {
    "images.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    "internal.example": ["192.168.1.5"],
    "half.example": ["93.184.216.34", "10.0.0.1"],
}


def fake_resolver(host: str, port: int) -> list[str]:
    """FAKE_DNS for names, the literal itself for IP addresses, NXDOMAIN otherwise."""
    if host in FAKE_DNS:
        return FAKE_DNS[host]
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)]
    except socket.gaierror:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


class FakeInternet:
    """A MockTransport app: images.example redirects to ?to=…, everything else answers 200."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requested.append(str(request.url))
        if request.url.host == "images.example" and "to" in request.url.params:
            return httpx.Response(302, headers={"Location": request.url.params["to"]})
        return httpx.Response(200, content=b"public image", headers={"Content-Type": "image/png"})


def test_public_host_is_allowed(make_fetcher: MakeFetcher):
    fetcher = make_fetcher(
        transport=httpx.MockTransport(FakeInternet()), resolver=fake_resolver, fetch_allow_private=False
    )

    assert fetcher.fetch("https://images.example/a.png").content == b"public image"


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.0.0.7/",
        "http://internal.example/",
        "http://half.example/",
        "http://2130706433/",  # 127.0.0.1 as one decimal number
    ],
)
def test_redirect_from_a_public_host_to_a_private_address_is_refused(make_fetcher: MakeFetcher, target: str):
    internet = FakeInternet()
    fetcher = make_fetcher(
        transport=httpx.MockTransport(internet), resolver=fake_resolver, fetch_allow_private=False
    )

    error = raises_from(fetcher, str(httpx.URL("https://images.example/a.png", params={"to": target})))

    assert isinstance(error, ForbiddenAddress)
    assert len(internet.requested) == 1  # the private hop was never sent


# --- DNS rebinding: one lookup, and the connection goes to the checked address ------------------
#
# No packet leaves the machine: names resolve through a patched ``socket.getaddrinfo``, and every
# connection to an address that is not loopback is refused, except PUBLIC_STAND_IN at one port,
# which is forwarded to a local server (the "public" host of a test).

PUBLIC_STAND_IN = "93.184.216.34"


class FakeNetwork:
    """Answers for names (one list per lookup, the last one repeating) and the connections made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: dict[str, int] = {}
        self.forward: dict[tuple[str, int], int] = {}
        self.connected: list[tuple[str, int]] = []
        self._getaddrinfo = socket.getaddrinfo
        self._create_connection = socket.create_connection
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", self.create_connection)

    def name(self, host: str, *answers: list[str]) -> None:
        self.answers[host] = list(answers)

    def getaddrinfo(self, host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self._getaddrinfo(host, port, *args, **kwargs)
        seen = self.lookups.get(name, 0)
        self.lookups[name] = seen + 1
        answers = self.answers[name]
        addresses = answers[min(seen, len(answers) - 1)]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port or 0)))
            for a in addresses
        ]

    def create_connection(self, address, *args, **kwargs):
        host, port = address[0], int(address[1])
        for info in self.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            ip = info[4][0]
            self.connected.append((ip, port))
            if (ip, port) in self.forward:
                return self._create_connection(("127.0.0.1", self.forward[(ip, port)]), *args, **kwargs)
            if ip.startswith("127.") or ip == "::1":
                return self._create_connection((ip, port), *args, **kwargs)
        raise ConnectionRefusedError(111, "no packet leaves this test")


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> FakeNetwork:
    return FakeNetwork(monkeypatch)


def test_a_name_that_rebinds_to_loopback_after_the_check_is_never_reached(
    server: LocalHttpServer, make_fetcher: MakeFetcher, network: FakeNetwork
):
    server.add("/rebind/secret", body=b"admin panel")
    network.name("rebind.example", [PUBLIC_STAND_IN], ["127.0.0.1"])

    with pytest.raises(FetchError):
        make_fetcher(fetch_allow_private=False).fetch(f"http://rebind.example:{server.port}/rebind/secret")

    assert server.hits("/rebind/secret") == 0
    assert network.lookups["rebind.example"] == 1  # resolved once
    assert network.connected == [(PUBLIC_STAND_IN, server.port)]  # and connected where it was checked


def test_a_redirect_to_a_name_that_rebinds_is_refused(make_fetcher: MakeFetcher, network: FakeNetwork):
    with LocalHttpServer() as public, LocalHttpServer() as private:
        private.add("/secret", body=b"admin panel")
        public.add_redirect("/a.png", f"http://rebind.example:{private.port}/secret")
        network.name("public.example", [PUBLIC_STAND_IN])
        network.name("rebind.example", [PUBLIC_STAND_IN], ["127.0.0.1"])
        network.forward[(PUBLIC_STAND_IN, public.port)] = public.port

        with pytest.raises(FetchError):
            make_fetcher(fetch_allow_private=False).fetch(f"http://public.example:{public.port}/a.png")

        assert public.hits("/a.png") == 1
        assert private.hits("/secret") == 0


@pytest.mark.parametrize("answer", [["127.0.0.1"], [PUBLIC_STAND_IN, "10.0.0.1"], ["fec0::1"]])
def test_a_name_with_any_non_public_address_is_refused_before_connecting(
    make_fetcher: MakeFetcher, network: FakeNetwork, answer: list[str]
):
    network.name("mixed.example", answer)

    error = raises_from(make_fetcher(fetch_allow_private=False), "http://mixed.example/a.png")

    assert isinstance(error, ForbiddenAddress)
    assert network.connected == []


def test_a_public_host_is_fetched_through_the_checked_address(
    make_fetcher: MakeFetcher, network: FakeNetwork
):
    with LocalHttpServer() as public:
        public.add("/a.png", body=b"public image")
        network.name("public.example", [PUBLIC_STAND_IN])
        network.forward[(PUBLIC_STAND_IN, public.port)] = public.port

        download = make_fetcher(fetch_allow_private=False).fetch(f"http://public.example:{public.port}/a.png")

    assert download.content == b"public image"
    assert network.lookups["public.example"] == 1


def test_tls_verifies_the_certificate_and_sends_sni_for_the_host_name(
    make_fetcher: MakeFetcher, network: FakeNetwork, tmp_path
):
    import ssl
    import threading

    from support.tls import self_signed

    certificate = self_signed(tmp_path, ("images.example",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert, certificate.key)
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def serve_one() -> None:
        connection, _ = listener.accept()
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass  # the client refuses our self-signed certificate

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    network.name("images.example", [PUBLIC_STAND_IN])
    network.forward[(PUBLIC_STAND_IN, port)] = port
    try:
        error = raises_from(make_fetcher(fetch_allow_private=False), f"https://images.example:{port}/a.png")
    finally:
        thread.join(5)
        listener.close()

    assert error.reason == "tls certificate rejected"
    assert server_names == ["images.example"]
    assert network.connected == [(PUBLIC_STAND_IN, port)]


@pytest.mark.parametrize("route", ["resolver to 127.0.0.1", "public address, forwarded"])
def test_https_to_a_name_verifies_and_sends_sni_for_the_name_and_connects_to_the_checked_address(
    make_fetcher: MakeFetcher, network: FakeNetwork, tmp_path, monkeypatch: pytest.MonkeyPatch, route: str
):
    import certifi

    from support.tls import self_signed

    certificate = self_signed(tmp_path, ("images.test",))  # for the name only, not for 127.0.0.1
    context = certificate.server_context()
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    # Trusted where httpx looks for the roots it trusts (certifi's bundle), as a real CA is: the
    # fetcher's own context still verifies the chain and the host name it is given.
    monkeypatch.setattr(certifi, "where", lambda: str(certificate.cert))
    looked_up: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        looked_up.append((host, port))
        if host != "images.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.1"]

    with LocalHttpServer(ssl_context=context) as tls:
        tls.add("/cat.png", body=b"\x89PNG over tls", content_type="image/png")
        if route == "resolver to 127.0.0.1":
            # The resolver seam answers; images.test (a reserved name) resolves nowhere else.
            fetcher, address = make_fetcher(resolver=resolver, fetch_allow_private=True), "127.0.0.1"
        else:  # the default policy: a public address, which the fake network forwards to the server
            network.name("images.test", [PUBLIC_STAND_IN])
            network.forward[(PUBLIC_STAND_IN, tls.port)] = tls.port
            fetcher, address = make_fetcher(fetch_allow_private=False), PUBLIC_STAND_IN

        download = fetcher.fetch(f"https://images.test:{tls.port}/cat.png")
        names, connected = list(server_names), list(network.connected)
        # The same server by its address: the certificate is not for it, so verification is on and
        # checks the name it is given: above, that name was the URL's host, not the address.
        refused = raises_from(make_fetcher(fetch_allow_private=True), tls.url("/cat.png"))

    assert download.content == b"\x89PNG over tls"
    assert names == ["images.test"]  # SNI carried the name
    assert connected == [(address, tls.port)]  # the socket went to the address that was checked
    if route == "resolver to 127.0.0.1":
        assert looked_up == [("images.test", tls.port)]  # resolved once, by the fetcher's resolver
    else:
        assert network.lookups["images.test"] == 1
    assert [(host, path) for _, host, path, _ in tls.requests()] == [(f"images.test:{tls.port}", "/cat.png")]
    assert refused.reason == "tls certificate rejected"


def test_credentials_in_a_url_are_not_sent_to_another_host_on_a_redirect(make_fetcher: MakeFetcher):
    import base64

    with LocalHttpServer() as first, LocalHttpServer() as other:
        other.add("/cat.png", body=b"the cat", content_type="image/png")
        first.add_redirect("/private/cat.png", f"http://cdn.test:{other.port}/cat.png")
        names = {"images.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]}
        fetcher = make_fetcher(resolver=lambda host, port: names[host])

        download = fetcher.fetch(f"http://alice:s3cr%40t@images.test:{first.port}/private/cat.png")

        assert download.content == b"the cat"
        sent = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
        assert first.authorizations("/private/cat.png") == [sent]  # the host of the URL got them
        assert other.authorizations("/cat.png") == [None]  # the host it redirected to did not
        assert [host for _, host, _, _ in other.requests()] == [f"cdn.test:{other.port}"]


def test_redirect_to_another_scheme_is_refused(make_fetcher: MakeFetcher):
    fetcher = make_fetcher(transport=httpx.MockTransport(FakeInternet()))

    error = raises_from(fetcher, "http://images.example/a.png?to=ftp://images.example/a.png")

    assert isinstance(error, InvalidUrl)
    assert error.reason == "not an http(s) url"


def test_unresolvable_host_is_a_transient_connection_failure(make_fetcher: MakeFetcher):
    fetcher = make_fetcher(
        transport=httpx.MockTransport(FakeInternet()), resolver=fake_resolver, fetch_allow_private=False
    )

    error = raises_from(fetcher, "http://no-such-host.example/a.png")

    assert isinstance(error, ConnectionFailed)
    assert (error.reason, error.transient) == ("dns lookup failed", True)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%eth0",
        "ff02::1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "not an address",
    ],
)
def test_non_public_addresses_are_refused(address: str):
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "172.32.0.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address: str):
    assert is_public_address(address)


# --- URL policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("ftp://example.com/a.png", "not an http(s) url"),
        ("javascript:alert(1)", "not an http(s) url"),
        ("file:///etc/passwd", "not an http(s) url"),
        ("/relative/a.png", "not an http(s) url"),
        ("example.com/a.png", "not an http(s) url"),
        ("//example.com/a.png", "not an http(s) url"),
        ("", "not an http(s) url"),
        ("http://", "url has no host"),
        ("http://user:pa ss@host/a.png", "credentials in url need percent-encoding"),
        ('http://user:pa"ss@host/a.png', "credentials in url need percent-encoding"),
        ("http://user:<pass>@host/a.png", "credentials in url need percent-encoding"),
        ("http://user:pa\u00a0ss@host/a.png", "credentials in url need percent-encoding"),
        ("http:///a.png", "url has no host"),
        ("http://example.com:99999/a.png", "unparsable url"),
        ("http://[::1/a.png", "unparsable url"),
        ("http://exa mple.com/a.png", "unparsable url"),
        ("http://example.com/" + "a" * 100_000, "url too long"),
    ],
)
def test_check_url_rejects(line: str, reason: str):
    with pytest.raises(InvalidUrl) as caught:
        check_url(line)
    assert caught.value.reason == reason
    assert not caught.value.transient


def test_check_url_strips_whitespace_and_keeps_the_url():
    assert check_url("  \thttps://Example.com/a%20b.png?x=1 \r\n") == "https://Example.com/a%20b.png?x=1"


@pytest.mark.parametrize(
    "url",
    ["http://user:p%20w@host/a.png", "http://u:it's(ok)~!$&*+,;=@host/a.png", "http://user@host/a@b.png"],
)
def test_check_url_accepts_credentials_as_rfc_3986_writes_them(url: str):
    assert check_url(url) == url


def test_check_url_accepts_the_longest_allowed_url():
    url = "http://example.com/" + "a" * (MAX_URL_LENGTH - len("http://example.com/"))
    assert check_url(url) == url


def test_fetch_refuses_an_invalid_url_without_sending_anything(make_fetcher: MakeFetcher):
    internet = FakeInternet()

    error = raises_from(make_fetcher(transport=httpx.MockTransport(internet)), "javascript:alert(1)")

    assert isinstance(error, InvalidUrl)
    assert internet.requested == []


def test_a_gzip_body_of_several_members_is_decoded_whole(server: LocalHttpServer, make_fetcher: MakeFetcher):
    body = bytes(range(256)) * 40
    encoded = gzip.compress(body[:5000]) + gzip.compress(body[5000:])
    server.add("/multi-member", body=encoded, headers={"Content-Encoding": "gzip"})

    assert make_fetcher().fetch(server.url("/multi-member")).content == body


def test_a_gzip_body_cut_short_is_an_error_not_a_shorter_image(
    server: LocalHttpServer, make_fetcher: MakeFetcher
):
    cut = gzip.compress(bytes(range(256)) * 40)[:-200]
    server.add("/cut-gzip", body=cut, headers={"Content-Encoding": "gzip"})

    with pytest.raises(ConnectionFailed) as caught:
        make_fetcher().fetch(server.url("/cut-gzip"))
    assert caught.value.reason == "truncated body"
