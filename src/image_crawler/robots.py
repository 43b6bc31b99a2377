"""robots.txt and ``X-Robots-Tag``: whether a URL may be requested, and whether its image may be kept.

With ``OBEY_ROBOTS=1`` a URL that its host's robots.txt disallows is never requested; it ends as
``error: disallowed by robots.txt`` (:data:`DISALLOWED`). An image whose response says
``X-Robots-Tag: noai`` (or another of :data:`FORBIDDING_DIRECTIVES`) is not kept either; it ends
as ``error: disallowed by x-robots-tag`` (:data:`TAG_DISALLOWED`).

How a robots.txt is looked up (:class:`Robots`):

- One robots.txt per **origin** (``scheme://host[:port]``, RFC 9309 §2.3): ``http`` and
  ``https`` of one host are two origins, as are two ports. The host is lower-cased and
  IDNA-encoded, a default port is left out, credentials never go along.
- It is fetched once for every worker: its body is kept in Redis under
  ``image-crawler:robots:<origin>`` for a day (``ttl``), and, parsed, in a bounded in-process
  LRU that forgets it when Redis does. One thread of one process fetches it at a time: a short
  Redis lock (``SET NX`` with an expiry, so a worker that dies holding it cannot block the host
  for longer than ``lock_ttl``), and inside a process the other threads wait for the one that
  went to Redis. Whoever waits longer than ``wait`` gets :class:`RobotsPending` — not the
  URL's fault, so it goes on later without using an attempt — rather than a guess.
- Only the first :data:`MAX_ROBOTS_BYTES` (500 KiB, Google's and RFC 9309's limit) are kept and
  parsed, up to the last whole line in them. A longer robots.txt is no broken one: its download
  stops there (:func:`fetch_with`) and its rules up to the cut are obeyed, the rest ignored.
- A missing or broken robots.txt allows everything, as crawlers do: a 4xx (401 and 403
  included), an unreachable host, a 5xx, a timeout, a body that is no robots.txt at all (HTML,
  garbage). A permanent failure (4xx) is remembered for ``ttl``, a transient one (5xx, timeout,
  connection failure) for ``error_ttl`` only, so the file is asked for again soon. RFC 9309
  §2.3.1.4 would have a crawler assume "disallow all" on a 5xx; we allow, as Scrapy does, so that
  a host's broken server does not end a whole list as disallowed.
- Parsing is protego's (Scrapy's parser): the group of the longest ``User-agent`` matching our
  product token, else ``*``; ``Allow``/``Disallow`` with ``*`` and ``$``, longest match wins.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx
import redis
from protego import Protego

from .errors import CrawlError, FetchError
from .fetching import Fetcher, check_url

__all__ = [
    "DISALLOWED",
    "FORBIDDING_DIRECTIVES",
    "MAX_ROBOTS_BYTES",
    "PRODUCT_TOKEN",
    "TAG_DISALLOWED",
    "Robots",
    "RobotsDisallowed",
    "RobotsFetch",
    "RobotsPending",
    "fetch_with",
    "forbids_indexing",
    "origin",
    "product_token",
]

logger = logging.getLogger(__name__)

#: The outcome reason of a URL its host's robots.txt disallows.
DISALLOWED = "disallowed by robots.txt"
#: The outcome reason of an image whose response carries a forbidding ``X-Robots-Tag``.
TAG_DISALLOWED = "disallowed by x-robots-tag"
#: The name robots.txt groups and ``X-Robots-Tag`` scopes address us by, unless ``USER_AGENT`` says otherwise.
PRODUCT_TOKEN = "image-crawler"
#: Bytes of a robots.txt that are downloaded, kept and parsed; the rest is ignored. RFC 9309 §2.5:
#: a crawler "MUST" parse at least 500 kibibytes (Google reads 500 KiB too), so a longer file is
#: cut here, not refused as too large (which would allow everything).
MAX_ROBOTS_BYTES = 500 * 1024
#: ``X-Robots-Tag`` rules that keep an image out: the AI opt-outs (``noai``, ``noimageai``), and
#: "do not index this image" (``noimageindex``; ``noindex`` and ``none`` say the same of the
#: resource they come with, here an image). img2dataset refuses the same four, ``none`` aside.
FORBIDDING_DIRECTIVES = frozenset({"noai", "noimageai", "noimageindex", "noindex", "none"})

#: How long a robots.txt is remembered (seconds).
DAY = 86_400.0
#: How long a robots.txt that could not be fetched for a transient reason counts as "allow all".
ERROR_TTL = 600.0
#: What :class:`RobotsPending` suggests waiting before asking again.
PENDING_RETRY_MS = 1_000

_PREFIX = "image-crawler:robots:"
_LOCK_PREFIX = "image-crawler:robots-lock:"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FIRST_POLL_S = 0.025
_LONGEST_POLL_S = 0.25

# KEYS: the body, the lock. ARGV: lock token, lock ms.
# Returns {1, body, ms left} when the body is there, {2} when the lock is now ours, {0} when
# someone else holds it. One script, so nobody can store the body between our look and our lock.
_CLAIM = """
local body = redis.call('GET', KEYS[1])
if body then return {1, body, redis.call('PTTL', KEYS[1])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""

# KEYS: the lock. ARGV: our token. A lock that expired and was taken by another is left alone.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: ``X-Robots-Tag`` rules that take a value after a colon, which is then no user-agent scope.
_VALUED_RULES = frozenset({"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"})
_SCOPED_RULE = re.compile(r"([a-z0-9_.*-]+)\s*:\s*(.*)", re.DOTALL)

#: Fetches a robots.txt URL: its body, or None when there is none. It may raise a
#: :class:`~image_crawler.errors.CrawlError` (a failure); anything else goes to the caller.
RobotsFetch = Callable[[str], bytes | None]


def fetch_with(fetcher: Fetcher) -> RobotsFetch:
    """A :data:`RobotsFetch` downloading with ``fetcher``: at most the first :data:`MAX_ROBOTS_BYTES`.

    A longer robots.txt is cut (one byte over, so :class:`Robots` sees the cut and drops the line
    it halves) and its download stopped, rather than failing as too large (RFC 9309 §2.5). The
    fetcher's other limits and its address policy apply as to any request.
    """

    def fetch(url: str) -> bytes:
        return fetcher.fetch(url, head=MAX_ROBOTS_BYTES + 1).content

    return fetch


class RobotsDisallowed(FetchError):
    """robots.txt (or the response's ``X-Robots-Tag``) says no: permanent, never retried."""

    def __init__(self, reason: str = DISALLOWED) -> None:
        super().__init__(reason)


class RobotsPending(Exception):
    """The origin's robots.txt is being fetched by another thread or worker: ask again later.

    Like :class:`~image_crawler.politeness.HostBusy`, not the URL's fault: it goes on after
    ``wait_ms`` without using an attempt.
    """

    def __init__(self, origin: str, wait_ms: int = PENDING_RETRY_MS) -> None:
        super().__init__(f"robots.txt of {origin} is being fetched")
        self.origin = origin
        self.wait_ms = wait_ms


def origin(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) URL: lower case, IDNA, no trailing dot or default port.

    Credentials never go along.

    Raises :class:`~image_crawler.errors.InvalidUrl` for a URL the crawler would not fetch.
    """
    parsed = httpx.URL(check_url(url))
    host = parsed.raw_host.decode("ascii").rstrip(".").lower()
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = parsed.port
    if port is None or port == _DEFAULT_PORTS[parsed.scheme]:
        return f"{parsed.scheme}://{host}"
    return f"{parsed.scheme}://{host}:{port}"


def product_token(user_agent: str) -> str:
    """The product token of a ``User-Agent`` (``MyBot/2.0 (+https://…)`` → ``mybot``); "" → ours."""
    words = user_agent.split()
    token = words[0].split("/", 1)[0].lower() if words else ""
    return token or PRODUCT_TOKEN


def forbids_indexing(
    headers: httpx.Headers | Mapping[str, str] | Iterable[str],
    user_agent: str = PRODUCT_TOKEN,
    directives: frozenset[str] = FORBIDDING_DIRECTIVES,
) -> bool:
    """Whether a response's ``X-Robots-Tag`` keeps its image out (any of ``directives``).

    ``headers`` are the response's headers (every ``X-Robots-Tag`` of an :class:`httpx.Headers`
    counts), or the ``X-Robots-Tag`` values themselves (or one value). A value is a comma list
    of rules, each for every crawler or for the crawler it names (``image-crawler: noai``; the
    name goes on for the rules after it); rules for other crawlers are ignored. Case does not
    matter.
    """
    if isinstance(headers, str):
        values: Iterable[str] = [headers]
    elif isinstance(headers, httpx.Headers):
        values = headers.get_list("x-robots-tag")
    elif isinstance(headers, Mapping):
        values = [value for name, value in headers.items() if name.lower() == "x-robots-tag"]
    else:
        values = headers
    us = user_agent.strip().lower()
    for value in values:
        scope: str | None = None  # every crawler
        for item in value.lower().split(","):
            rule = item.strip()
            scoped = _SCOPED_RULE.fullmatch(rule)
            if scoped and scoped.group(1) not in _VALUED_RULES:
                scope, rule = scoped.group(1), scoped.group(2).strip()
            if scope in (None, "*", us) and rule in directives:
                return True
    return False


@dataclass(frozen=True)
class _Parsed:
    rules: Protego
    expires: float  # time.monotonic() when Redis forgets the body


class Robots:
    """Whether the robots.txt of a URL's origin lets us request it; one fetch per origin for all workers.

    Parameters:
      client(redis.Redis): The Redis client (the broker's); it must return bytes
        (``decode_responses=False``, as everywhere in image-crawler).
      fetch_robots(Callable[[str], bytes | None]): Fetches a robots.txt URL and returns its
        body, or None when there is none (allow all). It may raise a
        :class:`~image_crawler.errors.CrawlError`: a transient one (5xx, timeout) allows all
        for ``error_ttl``, any other for ``ttl``. :func:`fetch_with` a
        :class:`~image_crawler.fetching.Fetcher` does (its 4xx is permanent, its 5xx
        transient), and reads only the first :data:`MAX_ROBOTS_BYTES`. Any other exception
        (:class:`~image_crawler.politeness.HostBusy`, a bug) is not a verdict on the file:
        nothing is remembered, and it reaches the caller of :meth:`allowed`.
      user_agent(str): The product token our groups are found by (:func:`product_token` of
        ``USER_AGENT``). Defaults to ``"image-crawler"``.
      ttl(float): Seconds a robots.txt is remembered. Defaults to a day.
      error_ttl(float): Seconds a robots.txt that failed transiently counts as "allow all"
        before it is asked for again. Defaults to 10 minutes.
      wait(float): Longest time in seconds :meth:`allowed` waits for a robots.txt another thread
        or worker is fetching before it raises :class:`RobotsPending`. Defaults to 3.
      lock_ttl(float): Seconds after which the fetch lock of a worker that died holding it runs
        out; longer than a robots.txt download can take. Defaults to 60.
      cache_size(int): Parsed robots.txt files kept in this process. Defaults to 1024.
    """

    def __init__(
        self,
        client: redis.Redis,
        fetch_robots: RobotsFetch,
        *,
        user_agent: str = PRODUCT_TOKEN,
        ttl: float = DAY,
        error_ttl: float = ERROR_TTL,
        wait: float = 3.0,
        lock_ttl: float = 60.0,
        cache_size: int = 1024,
    ) -> None:
        self.client = client
        self.fetch_robots = fetch_robots
        self.user_agent = user_agent
        self.ttl = ttl
        self.error_ttl = error_ttl
        self.wait = wait
        self.lock_ttl = lock_ttl
        self.cache_size = cache_size
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._lock = threading.Lock()
        self._parsed: OrderedDict[str, _Parsed] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}  # origin → set when its loader is done

    def allowed(self, url: str, *, until: float | None = None) -> bool:
        """Whether ``url`` may be requested.

        Waits at most ``wait`` seconds (and not past the monotonic time ``until``) for a
        robots.txt being fetched elsewhere, then raises :class:`RobotsPending`. Fetching it
        here takes as long as ``fetch_robots`` does. Raises
        :class:`~image_crawler.errors.InvalidUrl` for a URL that is no http(s) URL, and
        ``redis.RedisError`` when Redis is down.
        """
        url = check_url(url)
        site = origin(url)
        return self._rules(site, until).can_fetch(url, self.user_agent)

    def check(self, url: str, *, until: float | None = None) -> None:
        """Raise :class:`RobotsDisallowed` unless :meth:`allowed`."""
        if not self.allowed(url, until=until):
            raise RobotsDisallowed()

    def _rules(self, site: str, until: float | None) -> Protego:
        """The parsed robots.txt of ``site``, from this process, Redis, or the site itself."""
        deadline = time.monotonic() + self.wait
        if until is not None:
            deadline = min(deadline, until)
        while True:
            with self._lock:
                parsed = self._parsed.get(site)
                if parsed is not None and parsed.expires > time.monotonic():
                    self._parsed.move_to_end(site)
                    return parsed.rules
                loading = self._loading.get(site)
                leader = loading is None
                if loading is None:
                    loading = self._loading[site] = threading.Event()
            if leader:
                try:
                    parsed = self._load(site, deadline)
                    with self._lock:
                        self._parsed[site] = parsed
                        self._parsed.move_to_end(site)
                        while len(self._parsed) > self.cache_size:
                            self._parsed.popitem(last=False)
                    return parsed.rules
                finally:
                    with self._lock:
                        del self._loading[site]
                    loading.set()
            # Another thread of this process is at Redis (or the site) for it: wait for that one,
            # then look again; it may have failed, and this thread then tries itself.
            left = deadline - time.monotonic()
            if left <= 0 or not loading.wait(left):
                raise RobotsPending(site)

    def _load(self, site: str, deadline: float) -> _Parsed:
        """The robots.txt of ``site`` from Redis, or fetched and stored there under a lock."""
        key, lock = _PREFIX + site, _LOCK_PREFIX + site
        token = uuid.uuid4().hex
        pause = _FIRST_POLL_S
        while True:
            answer = self._claim(keys=[key, lock], args=[token, _ms(self.lock_ttl)])
            if answer[0] == 1:
                body, ms_left = answer[1], int(answer[2])
                ttl = ms_left / 1000 if ms_left > 0 else self.ttl
                return _Parsed(_parse(body, site), time.monotonic() + ttl)
            if answer[0] == 2:
                try:
                    body, ttl = self._fetch(site)
                    self.client.set(key, body, px=_ms(ttl))
                finally:
                    self._release(keys=[lock], args=[token])
                return _Parsed(_parse(body, site), time.monotonic() + ttl)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RobotsPending(site)
            time.sleep(min(pause, left))
            pause = min(2 * pause, _LONGEST_POLL_S)

    def _fetch(self, site: str) -> tuple[bytes, float]:
        """The body to remember for ``site`` (b"" allows all), and for how long."""
        try:
            body = self.fetch_robots(f"{site}/robots.txt")
        except CrawlError as exc:
            ttl = self.error_ttl if exc.transient else self.ttl
            logger.info("robots.txt of %s: %s; all its URLs allowed for %.0f s", site, exc.reason, ttl)
            return b"", ttl
        return (b"" if body is None else _bounded(body)), self.ttl


def _bounded(body: bytes) -> bytes:
    """The first :data:`MAX_ROBOTS_BYTES` of ``body``, without the line they cut in two."""
    if len(body) <= MAX_ROBOTS_BYTES:
        return body
    head = body[:MAX_ROBOTS_BYTES]
    # A cut "Disallow: /private-stuff" would read "Disallow: /pri" and disallow more than written.
    end = max(head.rfind(b"\n"), head.rfind(b"\r"))
    return head[: end + 1]


def _parse(body: bytes, site: str) -> Protego:
    """Parse a robots.txt body; one that cannot be read allows everything."""
    text = body.decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        return Protego.parse(text)
    except Exception:  # a broken robots.txt allows all, even one that breaks the parser
        logger.warning("robots.txt of %s could not be parsed; all its URLs allowed", site, exc_info=True)
        return Protego.parse("")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
