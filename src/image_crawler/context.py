"""The per-process resources actors use: one MongoDB client, one Redis pool, one HTTP client,
the threads that run downloads, and the budget of decoded pixels; and the workers' download
counters in Redis (:func:`count_downloads`)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import redis
from pymongo.database import Database

from . import storage
from .broker import connect_redis
from .claims import ClaimCheck
from .config import Settings, get_settings
from .fetching import Fetcher
from .imaging import DecodeBudget
from .politeness import HostGate
from .robots import MAX_ROBOTS_BYTES, Robots, fetch_with, product_token

#: Seconds a robots.txt may take to download (at most FETCH_TIMEOUT).
ROBOTS_TIMEOUT_S = 10.0

#: Redis counter of the bytes of the bodies workers downloaded in full (web: ``/metrics``).
DOWNLOADED_BYTES_KEY = "image-crawler:downloaded:bytes"
#: Redis counter of how many bodies workers downloaded in full.
DOWNLOADED_BODIES_KEY = "image-crawler:downloaded:bodies"


def count_downloads(pipe: redis.client.Pipeline, bodies: int, size: int) -> None:
    """Add ``bodies`` bodies downloaded in full, ``size`` bytes in all, to the download counters.

    The INCRBYs are queued on ``pipe`` (the one that parks a fetch's bodies: no round trip of
    their own) and nothing is queued for a zero. A body counts once read to its end, whatever
    becomes of it (not an image, a duplicate); one cut short (over ``FETCH_MAX_BYTES``, a
    timeout) or never sent (an HTTP error) does not. The counts are approximate, for rates
    (Prometheus counters), not a ledger: a fetch that runs again after its pipeline was sent (a
    lost ack, a pipeline sent again after its connection dropped) counts its bodies twice, and
    the counters start again from zero when Redis loses its data.
    """
    if bodies:
        pipe.incrby(DOWNLOADED_BODIES_KEY, bodies)
    if size:
        pipe.incrby(DOWNLOADED_BYTES_KEY, size)


def longest_download_s(settings: Settings) -> float:
    """The longest one download may take, with a margin: FETCH_TIMEOUT is one deadline for the
    whole download (fetching.py); with ``OBEY_ROBOTS`` the URL's robots.txt comes first and a
    redirect hop's may end past the deadline (each at most ROBOTS_TIMEOUT_S). Twice each."""
    robots = 2 * min(settings.fetch_timeout, ROBOTS_TIMEOUT_S) if settings.obey_robots else 0.0
    return 2 * settings.fetch_timeout + robots


@dataclass
class Context:
    """Everything an actor needs from the outside world."""

    settings: Settings
    db: Database
    claims: ClaimCheck
    fetcher: Fetcher
    owns_redis: bool = True
    #: Runs the downloads of every batch this process fetches: ``FETCH_CONCURRENCY`` at once.
    downloads: ThreadPoolExecutor = field(init=False)
    #: Bytes of decoded pixels this process's threads may hold at once (``DECODE_MEMORY_MB``).
    decode_budget: DecodeBudget = field(init=False)
    #: Turns to request each host, shared with every worker (``HOST_CONCURRENCY``, ``HOST_DELAY_MS``).
    hosts: HostGate = field(init=False)
    #: What each host's robots.txt allows, with ``OBEY_ROBOTS`` (None: not asked).
    robots: Robots | None = field(init=False, default=None)
    _robots_fetcher: Fetcher | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.downloads = ThreadPoolExecutor(self.settings.fetch_concurrency, thread_name_prefix="download")
        self.decode_budget = DecodeBudget(self.settings.decode_memory_mb * 1024 * 1024)
        self.hosts = HostGate(
            self.claims.client,
            concurrency=self.settings.host_concurrency,
            delay_ms=self.settings.host_delay_ms,
            # A download ends within longest_download_s; a dead worker's turn comes back after.
            turn_ms=int(self.longest_download_s * 1000) + 10_000,
            longest_pause_s=self.settings.retry_after_max,
        )
        if self.settings.obey_robots:
            # robots.txt has limits of its own (Google reads 500 KiB of it), and the same
            # address policy as every other request.
            robots_settings = replace(
                self.settings,
                fetch_max_bytes=2 * MAX_ROBOTS_BYTES,
                fetch_timeout=min(self.settings.fetch_timeout, ROBOTS_TIMEOUT_S),
            )
            self._robots_fetcher = Fetcher(robots_settings)
            self.robots = Robots(
                self.claims.client,
                fetch_with(self._robots_fetcher),  # its first 500 KiB: a longer one is cut, not refused
                user_agent=product_token(self.settings.user_agent),
                lock_ttl=2 * robots_settings.fetch_timeout + 10,
                # A parsed robots.txt may take megabytes: a few hosts' worth per process.
                cache_size=64,
            )

    @property
    def longest_download_s(self) -> float:
        """The longest one download may take, with a margin (:func:`longest_download_s`)."""
        return longest_download_s(self.settings)

    @classmethod
    def create(
        cls, settings: Settings, db: Database | None = None, redis_client: redis.Redis | None = None
    ) -> Context:
        """Open the connections ``settings`` name.

        ``db`` overrides MongoDB (e.g. for embedding); ``redis_client`` is a client to share
        (the broker's: one Redis pool per process), which :meth:`close` leaves open.
        """
        database = db if db is not None else storage.get_database(settings)
        storage.ensure_indexes(database)
        client = redis_client if redis_client is not None else connect_redis(settings.redis_url)
        claim_check = ClaimCheck(client, settings.claim_ttl)
        return cls(settings, database, claim_check, Fetcher(settings), owns_redis=redis_client is None)

    def close(self) -> None:
        """Release the download threads, the HTTP client and the Redis pool (unless it is shared)."""
        self.downloads.shutdown(wait=True, cancel_futures=True)
        self.fetcher.close()
        if self._robots_fetcher is not None:
            self._robots_fetcher.close()
        if self.owns_redis:
            self.claims.client.close()


_lock = threading.Lock()
_current: Context | None = None
_shared_redis: redis.Redis | None = None


def share_redis(client: redis.Redis | None) -> None:
    """Make contexts created from now on use ``client`` (the broker's) for claim checks."""
    global _shared_redis
    _shared_redis = client


def get_context() -> Context:
    """This process's context, created on first use (after any fork of the worker)."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = Context.create(get_settings(), redis_client=_shared_redis)
    return _current


def set_context(context: Context | None) -> Context | None:
    """Install ``context`` for this process (None: create lazily again); returns the previous one."""
    global _current
    with _lock:
        previous, _current = _current, context
    return previous
