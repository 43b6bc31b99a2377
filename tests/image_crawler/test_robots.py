"""robots.txt and X-Robots-Tag: what may be requested and kept, with one robots.txt fetch per origin."""

from __future__ import annotations

import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import redis

from image_crawler import robots as robots_module
from image_crawler.config import Settings
from image_crawler.errors import FetchError, FetchTimeout, InvalidUrl
from image_crawler.fetching import Fetcher
from image_crawler.robots import (
    DISALLOWED,
    MAX_ROBOTS_BYTES,
    TAG_DISALLOWED,
    Robots,
    RobotsDisallowed,
    RobotsPending,
    fetch_with,
    forbids_indexing,
    origin,
    product_token,
)
from support.clock import FakeClock, fake_time_of
from support.http_server import LocalHttpServer

ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"

MakeRobots = Callable[..., Robots]


@pytest.fixture
def server(redis_client: redis.Redis) -> Iterator[LocalHttpServer]:
    """A fresh host; what Redis remembers of its origin is forgotten (its port may come again)."""
    with LocalHttpServer() as server:
        _forget(redis_client, origin(server.url()))
        yield server
        _forget(redis_client, origin(server.url()))


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    """The project's Fetcher as the integration uses it for robots.txt: small limits, quick timeout."""
    settings = replace(Settings(), fetch_max_bytes=512 * 1024, fetch_timeout=1.0, fetch_allow_private=True)
    with Fetcher(settings) as fetcher:
        yield fetcher


@pytest.fixture
def make_robots(redis_client: redis.Redis, fetcher: Fetcher) -> MakeRobots:
    """Robots (one per worker, say) on the shared Redis, fetching through the project's Fetcher."""

    def make(**options: object) -> Robots:
        return Robots(redis_client, fetch_with(fetcher), **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock of :class:`Robots` (its waits and polls, its remembered expiries)."""
    fake = fake_time_of(monkeypatch, robots_module)
    return fake


def _forget(client: redis.Redis, site: str) -> None:
    client.delete(f"image-crawler:robots:{site}", f"image-crawler:robots-lock:{site}")


def _fake_site() -> str:
    return f"http://{uuid.uuid4().hex}.example"


# --- robots.txt decides what is requested ------------------------------------------------


def test_a_disallowed_path_is_not_allowed_and_the_rest_is(server, make_robots):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    robots = make_robots()

    assert robots.allowed(server.url("/private/cat.png")) is False
    assert robots.allowed(server.url("/public/cat.png")) is True
    assert robots.allowed(server.url("/cat.png?private=1")) is True


def test_check_raises_a_permanent_fetch_error_with_the_outcome_reason(server, make_robots):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    robots = make_robots()

    with pytest.raises(RobotsDisallowed) as caught:
        robots.check(server.url("/private/cat.png"))
    assert isinstance(caught.value, FetchError)
    assert caught.value.reason == DISALLOWED == "disallowed by robots.txt"
    assert caught.value.transient is False
    robots.check(server.url("/cat.png"))  # allowed: no error


def test_robots_txt_is_fetched_once_for_every_url_of_a_host_and_every_worker(server, make_robots):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    first_worker, second_worker = make_robots(), make_robots()

    for number in range(50):
        assert first_worker.allowed(server.url(f"/private/{number}.png")) is False
        assert second_worker.allowed(server.url(f"/{number}.png")) is True

    assert server.hits("/robots.txt") == 1


def test_threads_of_two_workers_asking_at_once_fetch_it_once(server, make_robots):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain", delay=0.3)
    workers = [make_robots(), make_robots()]
    urls = [server.url(f"/{'private/' if n % 2 else ''}{n}.png") for n in range(64)]

    with ThreadPoolExecutor(32) as pool:
        verdicts = list(pool.map(lambda n: workers[n % 2].allowed(urls[n]), range(64)))

    assert verdicts == [n % 2 == 0 for n in range(64)]
    assert server.hits("/robots.txt") == 1


def test_a_batch_of_one_host_parses_its_robots_txt_once(server, make_robots, monkeypatch):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain", delay=0.2)
    parses: list[str] = []
    real_parse = robots_module.Protego.parse

    def counting_parse(content: str) -> robots_module.Protego:
        parses.append(content)
        return real_parse(content)

    monkeypatch.setattr(robots_module.Protego, "parse", counting_parse)
    robots = make_robots()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(robots.allowed, [server.url(f"/{n}.png") for n in range(32)]))

    assert len(parses) == 1


def test_each_origin_has_its_own_robots_txt():
    assert origin("HTTP://Example.COM:80/a/cat.png?x=1") == "http://example.com"
    assert origin("https://example.com:443/") == "https://example.com"
    assert origin("https://example.com./cat.png") == "https://example.com"
    assert origin("https://example.com:8443/") == "https://example.com:8443"
    assert origin("http://example.com/") != origin("https://example.com/")
    assert origin("http://user:secret@example.com/cat.png") == "http://example.com"
    assert origin("http://[::1]:8080/cat.png") == "http://[::1]:8080"
    assert origin("http://Bücher.example/cat.png") == "http://xn--bcher-kva.example"


def test_urls_of_one_origin_written_differently_share_one_fetch(redis_client):
    site = _fake_site()
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return ROBOTS_TXT

    robots = Robots(redis_client, fetch)
    assert robots.allowed(f"{site}/private/a.png") is False
    assert robots.allowed(f"{site.upper().replace('HTTP://', 'http://')}:80/private/b.png") is False
    assert robots.allowed(f"http://user:secret@{site.removeprefix('http://')}/c.png") is True

    assert fetched == [f"{site}/robots.txt"]
    _forget(redis_client, site)


def test_a_url_that_is_no_http_url_is_refused(redis_client):
    robots = Robots(redis_client, lambda url: pytest.fail("nothing may be fetched"))

    with pytest.raises(InvalidUrl):
        robots.allowed("ftp://example.com/cat.png")


def test_the_group_naming_us_wins_over_the_one_for_everyone(server, make_robots):
    server.add(
        "/robots.txt",
        b"User-agent: *\nDisallow: /everyone/\n\nUser-agent: image-crawler\nDisallow: /only-us/\n",
        content_type="text/plain",
    )
    us, otherbot = make_robots(), make_robots(user_agent="otherbot")

    assert us.allowed(server.url("/only-us/cat.png")) is False
    assert us.allowed(server.url("/everyone/cat.png")) is True
    assert otherbot.allowed(server.url("/only-us/cat.png")) is True
    assert otherbot.allowed(server.url("/everyone/cat.png")) is False


def test_the_product_token_comes_from_user_agent():
    assert product_token("") == "image-crawler"
    assert product_token("image-crawler/0.1.0 (+https://example.com/bot)") == "image-crawler"
    assert product_token("MyBot/2.0 (+https://example.com/bot)") == "mybot"


def test_allow_and_wildcards_are_read_as_google_reads_them(server, make_robots):
    server.add(
        "/robots.txt",
        b"\xef\xbb\xbfUser-agent: *\nDisallow: /images/\nAllow: /images/public/\nDisallow: /*.gif$\n",
        content_type="text/plain",
    )
    robots = make_robots()

    assert robots.allowed(server.url("/images/cat.png")) is False
    assert robots.allowed(server.url("/images/public/cat.png")) is True
    assert robots.allowed(server.url("/cat.gif")) is False
    assert robots.allowed(server.url("/cat.gif?size=2")) is True


def test_a_redirected_robots_txt_is_followed(server, make_robots):
    server.add_redirect("/robots.txt", "/real-robots.txt", status=301)
    server.add("/real-robots.txt", ROBOTS_TXT, content_type="text/plain")

    assert make_robots().allowed(server.url("/private/cat.png")) is False


# --- a missing or broken robots.txt allows everything -------------------------------------


@pytest.mark.parametrize("status", [404, 410, 401, 403])
def test_a_missing_or_refused_robots_txt_allows_everything_for_the_ttl(
    server, make_robots, redis_client, status
):
    server.add("/robots.txt", b"Disallow: /", status=status, content_type="text/plain")
    robots = make_robots()

    assert robots.allowed(server.url("/private/cat.png")) is True
    assert make_robots().allowed(server.url("/cat.png")) is True
    assert server.hits("/robots.txt") == 1
    assert redis_client.pttl(f"image-crawler:robots:{origin(server.url())}") > 86_000_000


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Welcome to our shop</body></html>",
        bytes(range(256)) * 40,
        b"",
    ],
    ids=["an html page", "binary garbage", "empty"],
)
def test_a_robots_txt_that_is_no_robots_txt_allows_everything(server, make_robots, body):
    server.add("/robots.txt", body)

    assert make_robots().allowed(server.url("/private/cat.png")) is True


def test_a_failing_robots_txt_allows_everything_and_is_asked_for_again_soon(
    server, make_robots, redis_client
):
    server.add("/robots.txt", b"oops", status=500, content_type="text/plain")
    robots = make_robots(error_ttl=0.3)

    assert robots.allowed(server.url("/private/cat.png")) is True
    assert 0 < redis_client.pttl(f"image-crawler:robots:{origin(server.url())}") <= 300
    assert robots.allowed(server.url("/private/dog.png")) is True
    assert server.hits("/robots.txt") == 1

    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")  # the server recovered
    time.sleep(0.4)
    assert robots.allowed(server.url("/private/cat.png")) is False
    assert server.hits("/robots.txt") == 2


def test_a_robots_txt_that_times_out_allows_everything(server, fetcher, redis_client):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain", delay=3)
    failures: list[Exception] = []
    fetch = fetch_with(fetcher)

    def fetching(url: str) -> bytes | None:
        try:
            return fetch(url)
        except Exception as exc:
            failures.append(exc)
            raise

    robots = Robots(redis_client, fetching, error_ttl=60)

    assert robots.allowed(server.url("/private/cat.png")) is True  # the rules came too late to count
    assert [type(failure) for failure in failures] == [FetchTimeout]  # the fetcher's timeout ended it
    assert 0 < redis_client.pttl(f"image-crawler:robots:{origin(server.url())}") <= 60_000  # error_ttl
    assert robots.allowed(server.url("/private/dog.png")) is True
    assert server.hits("/robots.txt") == 1


def test_an_unreachable_host_allows_everything(redis_client, fetcher):
    with LocalHttpServer() as gone:
        url = gone.url("/private/cat.png")
    _forget(redis_client, origin(url))
    robots = Robots(redis_client, fetch_with(fetcher))

    assert robots.allowed(url) is True
    _forget(redis_client, origin(url))


def test_an_exception_that_is_no_verdict_reaches_the_caller_and_nothing_is_remembered(redis_client):
    site = _fake_site()
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError("the host's turns are taken")
        return ROBOTS_TXT

    robots = Robots(redis_client, fetch)
    with pytest.raises(RuntimeError):
        robots.allowed(f"{site}/private/cat.png")
    assert not redis_client.exists(f"image-crawler:robots-lock:{site}")

    assert robots.allowed(f"{site}/private/cat.png") is False
    assert len(calls) == 2
    _forget(redis_client, site)


# --- what is remembered, and for how long ------------------------------------------------


def test_robots_txt_is_read_again_after_its_ttl(server, make_robots):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    robots = make_robots(ttl=0.5)

    assert robots.allowed(server.url("/private/cat.png")) is False
    assert robots.allowed(server.url("/private/cat.png")) is False
    assert server.hits("/robots.txt") == 1

    server.add("/robots.txt", b"User-agent: *\nDisallow:\n", content_type="text/plain")
    time.sleep(0.6)
    assert robots.allowed(server.url("/private/cat.png")) is True
    assert server.hits("/robots.txt") == 2


def test_redis_keeps_the_raw_body_for_a_day(server, make_robots, redis_client):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")

    make_robots().allowed(server.url("/cat.png"))

    key = f"image-crawler:robots:{origin(server.url())}"
    assert redis_client.get(key) == ROBOTS_TXT
    assert 86_000_000 < redis_client.pttl(key) <= 86_400_000


def test_the_in_process_cache_is_bounded_and_falls_back_to_redis(redis_client, monkeypatch):
    sites = [_fake_site() for _ in range(3)]
    fetched: list[str] = []
    parses: list[str] = []
    real_parse = robots_module.Protego.parse

    def counting_parse(content: str) -> robots_module.Protego:
        parses.append(content)
        return real_parse(content)

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return ROBOTS_TXT

    monkeypatch.setattr(robots_module.Protego, "parse", counting_parse)
    robots = Robots(redis_client, fetch, cache_size=2)
    for site in [*sites, sites[0]]:
        assert robots.allowed(f"{site}/private/cat.png") is False

    assert len(fetched) == 3  # the first site came back from Redis…
    assert len(parses) == 4  # …but had to be parsed again: only two fit in the process
    for site in sites:
        _forget(redis_client, site)


def test_only_the_first_500_kib_of_a_robots_txt_count(redis_client):
    site = _fake_site()
    early = b"User-agent: *\nDisallow: /early/\n"
    padding = b"# " + b"x" * 1000 + b"\n"
    filler = padding * ((MAX_ROBOTS_BYTES - len(early)) // len(padding))
    # The limit falls inside this line: half of it would disallow "/cut-h", more than it says.
    cut = b"Disallow: /cut-here-and-not-before/\n"
    start_of_cut = MAX_ROBOTS_BYTES - 8
    body = early + filler + b"#" * (start_of_cut - len(early) - len(filler) - 1) + b"\n" + cut
    body += b"Disallow: /late/\n" * 100
    assert body.index(cut) == start_of_cut

    robots = Robots(redis_client, lambda url: body)

    assert robots.allowed(f"{site}/early/cat.png") is False
    assert robots.allowed(f"{site}/cut-h/cat.png") is True
    assert robots.allowed(f"{site}/late/cat.png") is True
    assert redis_client.strlen(f"image-crawler:robots:{site}") <= MAX_ROBOTS_BYTES
    _forget(redis_client, site)


def _huge_robots_txt(size: int = 2 * 1024 * 1024) -> bytes:
    """``size`` bytes of robots.txt: ROBOTS_TXT, comments past the 500 KiB cut, then a late rule."""
    comment = b"# " + b"x" * 1000 + b"\n"
    head = ROBOTS_TXT + comment * (MAX_ROBOTS_BYTES // len(comment) + 1)
    assert len(head) > MAX_ROBOTS_BYTES  # everything after here is past the cut
    body = head + b"Disallow: /late/\n"
    allows = b"Allow: /x\n" * ((size - len(body)) // len(b"Allow: /x\n") + 1)
    return body + allows


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_a_robots_txt_far_over_500_kib_is_cut_there_and_still_obeyed(server, make_robots, redis_client, gzip):
    # RFC 9309 §2.5, Google: the first 500 KiB are parsed and the rest is ignored; a huge file
    # is no broken file that allows everything.
    server.add("/robots.txt", _huge_robots_txt(), content_type="text/plain", gzip=gzip)
    robots = make_robots()

    assert robots.allowed(server.url("/private/cat.png")) is False
    assert robots.allowed(server.url("/late/cat.png")) is True  # only after the cut
    assert robots.allowed(server.url("/cat.png")) is True
    assert server.hits("/robots.txt") == 1
    stored = redis_client.get(f"image-crawler:robots:{origin(server.url())}")
    assert stored.startswith(ROBOTS_TXT)
    assert len(stored) <= MAX_ROBOTS_BYTES
    assert stored.endswith(b"\n")


def test_a_robots_txt_over_500_kib_without_content_length_is_cut_too(server, make_robots):
    server.add("/robots.txt", _huge_robots_txt(), content_type="text/plain", chunked=True)

    assert make_robots().allowed(server.url("/private/cat.png")) is False
    assert make_robots().allowed(server.url("/late/cat.png")) is True


def test_an_endless_robots_txt_is_read_no_further_than_the_cut(redis_client):
    site = _fake_site()
    sent: list[int] = []

    class Endless(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield ROBOTS_TXT
            while True:
                sent.append(64 * 1024)
                yield b"Disallow: /late/\n" * 4096  # 68 KiB of rules that come too late

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=Endless())

    settings = replace(Settings(), fetch_timeout=5.0, fetch_allow_private=True)
    with Fetcher(settings, transport=httpx.MockTransport(answer)) as fetcher:
        robots = Robots(redis_client, fetch_with(fetcher))

        assert robots.allowed(f"{site}/private/cat.png") is False
        assert robots.allowed(f"{site}/late/cat.png") is False  # inside the first 500 KiB
    assert sum(sent) < 2 * MAX_ROBOTS_BYTES  # stopped at the cut, not at a limit or the timeout
    assert redis_client.strlen(f"image-crawler:robots:{site}") <= MAX_ROBOTS_BYTES
    _forget(redis_client, site)


def test_rules_within_rfc_9309s_500_kib_are_obeyed_and_those_after_ignored(redis_client):
    # RFC 9309 §2.5: a crawler must parse at least 500 KiB. The numbers are the RFC's, not ours.
    site = _fake_site()
    inside = b"Disallow: /inside/\n"
    filler = b"User-agent: *\n" + b"#" * (500 * 1024 - 15 - len(inside)) + b"\n"
    body = filler + inside + b"Disallow: /outside/\n"
    assert body.index(inside) + len(inside) == 500 * 1024  # the last rule that ends inside

    robots = Robots(redis_client, lambda url: body)

    assert robots.allowed(f"{site}/inside/cat.png") is False
    assert robots.allowed(f"{site}/outside/cat.png") is True
    _forget(redis_client, site)


# --- one fetch at a time, and nobody waits long ------------------------------------------


def test_a_thread_waiting_longer_than_wait_is_told_to_come_back_later(
    server, make_robots, redis_client, fetcher, clock
):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    fetching, release = threading.Event(), threading.Event()
    fetch = fetch_with(fetcher)

    def slow_fetch(url: str) -> bytes | None:  # the leader's download, which takes its time
        fetching.set()
        release.wait(30)
        return fetch(url)

    fetching_worker, waiting_worker = Robots(redis_client, slow_fetch), make_robots(wait=0.2)
    verdict: list[bool] = []
    leader = threading.Thread(
        target=lambda: verdict.append(fetching_worker.allowed(server.url("/private/a")))
    )
    leader.start()
    assert fetching.wait(30)  # the leader holds the fetch lock, and is downloading

    with pytest.raises(RobotsPending) as pending:
        waiting_worker.allowed(server.url("/private/b"))
    assert sum(clock.slept) == pytest.approx(0.2)  # it waited ``wait``, polling, and no longer
    assert pending.value.origin == origin(server.url())
    assert pending.value.wait_ms > 0
    polls = len(clock.slept)
    with pytest.raises(RobotsPending):  # ``until`` cuts the wait shorter still: here, to nothing
        waiting_worker.allowed(server.url("/private/b"), until=clock.now)
    assert len(clock.slept) == polls

    release.set()
    leader.join()
    assert verdict == [False]
    assert waiting_worker.allowed(server.url("/private/b")) is False
    assert server.hits("/robots.txt") == 1


def test_the_lock_of_a_worker_that_died_fetching_runs_out(server, fetcher, redis_client, monkeypatch):
    # Real time: the dead worker's lock runs out in Redis. What is checked is what the waiting
    # worker did meanwhile, not how long it took.
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")
    lock = f"image-crawler:robots-lock:{origin(server.url())}"
    redis_client.set(lock, b"dead worker", px=300)
    polls: list[float] = []

    def poll(seconds: float) -> None:
        polls.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(robots_module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=poll))
    locked_by: list[bytes | None] = []
    fetch = fetch_with(fetcher)

    def fetching(url: str) -> bytes | None:
        locked_by.append(redis_client.get(lock))
        return fetch(url)

    assert Robots(redis_client, fetching, wait=2).allowed(server.url("/private/cat.png")) is False
    assert polls and max(polls) <= 0.25  # it waited for the lock, asking again now and then…
    assert len(locked_by) == 1 and locked_by[0] not in (None, b"dead worker")  # …then fetched under its own
    assert server.hits("/robots.txt") == 1
    assert not redis_client.exists(lock)


def test_the_fetch_lock_is_released_when_the_fetch_ends(server, make_robots, redis_client):
    server.add("/robots.txt", ROBOTS_TXT, content_type="text/plain")

    make_robots().allowed(server.url("/cat.png"))

    assert not redis_client.exists(f"image-crawler:robots-lock:{origin(server.url())}")


def test_a_transient_fetch_error_is_remembered_for_error_ttl_only(redis_client):
    site = _fake_site()

    def fetch(url: str) -> bytes:
        raise FetchTimeout()

    Robots(redis_client, fetch, error_ttl=5).allowed(f"{site}/cat.png")

    assert 0 < redis_client.pttl(f"image-crawler:robots:{site}") <= 5_000
    _forget(redis_client, site)


# --- X-Robots-Tag decides what is kept ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "forbids"),
    [
        ("noai", True),
        ("NoImageIndex", True),
        ("noimageai", True),
        ("noindex", True),
        ("none", True),
        ("nofollow, nosnippet", False),
        ("all", False),
        ("", False),
        ("nosnippet, noai", True),
        ("noarchive,noimageindex", True),
        ("max-image-preview: none", False),
        ("unavailable_after: Sunday, 01-Sep-2030 15:00:00 GMT", False),
        ("image-crawler: noai", True),
        ("Image-Crawler:noimageindex", True),
        ("otherbot: noai", False),
        ("otherbot: noindex, noai", False),
        ("otherbot: noindex, image-crawler: noai", True),
        ("image-crawler: nofollow, otherbot: noai", False),
    ],
)
def test_x_robots_tag_rules_that_keep_an_image_out(value, forbids):
    assert forbids_indexing(httpx.Headers({"X-Robots-Tag": value})) is forbids


def test_every_x_robots_tag_header_of_a_response_counts():
    headers = httpx.Headers([("X-Robots-Tag", "otherbot: noai"), ("x-robots-tag", "noimageindex")])

    others_only = httpx.Headers([("X-Robots-Tag", "otherbot: noai"), ("X-Robots-Tag", "all")])

    assert forbids_indexing(headers) is True
    assert forbids_indexing(others_only) is False


def test_x_robots_tag_can_be_given_as_a_mapping_or_as_values():
    assert forbids_indexing({"x-robots-tag": "noai", "content-type": "image/png"}) is True
    assert forbids_indexing({"Content-Type": "image/png"}) is False
    assert forbids_indexing(["otherbot: noai", "image-crawler: noai"]) is True
    assert forbids_indexing("noai") is True


def test_x_robots_tag_scoped_to_our_own_user_agent_token():
    assert forbids_indexing("mybot: noai", user_agent="MyBot") is True
    assert forbids_indexing("image-crawler: noai", user_agent="mybot") is False


def test_x_robots_tag_has_its_own_outcome_reason():
    assert RobotsDisallowed(TAG_DISALLOWED).reason == "disallowed by x-robots-tag"
