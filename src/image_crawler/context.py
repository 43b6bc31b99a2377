"""The per-process resources actors use: one MongoDB client, one Redis pool, one HTTP client."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pymongo.database import Database

from . import storage
from .broker import connect_redis
from .claims import ClaimCheck
from .config import Settings, get_settings
from .fetching import Fetcher


@dataclass
class Context:
    """Everything an actor needs from the outside world."""

    settings: Settings
    db: Database
    claims: ClaimCheck
    fetcher: Fetcher

    @classmethod
    def create(cls, settings: Settings, db: Database | None = None) -> Context:
        """Open the connections ``settings`` name (``db`` overrides MongoDB, e.g. for embedding)."""
        database = db if db is not None else storage.get_database(settings)
        storage.ensure_indexes(database)
        client = connect_redis(settings.redis_url)
        return cls(settings, database, ClaimCheck(client, settings.claim_ttl), Fetcher(settings))

    def close(self) -> None:
        """Release the HTTP client and the Redis pool."""
        self.fetcher.close()
        self.claims.client.close()


_lock = threading.Lock()
_current: Context | None = None


def get_context() -> Context:
    """This process's context, created on first use (after any fork of the worker)."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = Context.create(get_settings())
    return _current


def set_context(context: Context | None) -> Context | None:
    """Install ``context`` for this process (None: create lazily again); returns the previous one."""
    global _current
    with _lock:
        previous, _current = _current, context
    return previous
