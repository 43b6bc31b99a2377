"""Dramatiq middleware of the pipeline."""

from __future__ import annotations

import logging

import pymongo.errors
import redis.exceptions
from dramatiq.middleware import Middleware, TimeLimitExceeded

from .errors import CrawlError

logger = logging.getLogger(__name__)

_UNAVAILABLE: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.ConnectionError, "redis unavailable"),
    (redis.exceptions.TimeoutError, "redis unavailable"),
    # A transaction whose watched key changed, or whose connection was lost while watching.
    (redis.exceptions.WatchError, "redis unavailable"),
    (pymongo.errors.ConnectionFailure, "mongodb unavailable"),
)


def is_transient(exception: BaseException) -> bool:
    """Whether trying the same message again later may succeed."""
    if isinstance(exception, CrawlError):
        return exception.transient
    return any(isinstance(exception, kind) for kind, _ in _UNAVAILABLE)


def reason_for(exception: BaseException) -> str:
    """The short reason an exception leaves in a job's outcome."""
    if isinstance(exception, CrawlError):
        return exception.reason
    if isinstance(exception, TimeLimitExceeded):
        return "time limit exceeded"
    for kind, reason in _UNAVAILABLE:
        if isinstance(exception, kind):
            return reason
    return f"internal error: {type(exception).__name__}"


def retry_transient(max_retries: int):
    """A ``retry_when`` predicate: retry transient errors up to ``max_retries`` times, nothing else."""

    def retry_when(retries: int, exception: BaseException) -> bool:
        limit = getattr(exception, "retry_limit", None)
        return retries < (max_retries if limit is None else min(limit, max_retries)) and is_transient(
            exception
        )

    return retry_when


class ExpectedFailures(logging.Filter):
    """Logs a job's :class:`CrawlError` (a 404, a timeout, not an image) as one warning line.

    Dramatiq logs every exception an actor raises as an error with a traceback; for a URL list
    where one line in ten is dead that buries real faults. Attach to Dramatiq's worker logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CrawlError):
            record.msg = f"{record.msg} ({record.exc_info[1].reason})"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class RecordFailures(Middleware):
    """Hands every message that failed for good to an actor that records the job's error.

    A group's completion callback never fires when a member fails, so without this a
    job whose fetch, md5, grayscale or collect gave up would never get an outcome.
    It must be placed before :class:`~dramatiq.middleware.Retries`: ``after_*`` hooks run
    in reverse order, so Retries has decided ``message.failed`` by the time this runs.

    The recorder is sent the failed message's first argument and the reason. An actor can
    name its own recorder with the ``failure_recorder`` option (``None``: failures of this
    actor are only logged, as a recorder's own must be).

    Parameters:
      actor_name(str): The default recorder, sent ``(job, reason)``; its own failures are only logged.
    """

    def __init__(self, actor_name: str = "record_failure") -> None:
        self.actor_name = actor_name

    @property
    def actor_options(self) -> set[str]:
        return {"failure_recorder"}

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is None or not message.failed:
            return
        reason = reason_for(exception)
        options = broker.get_actor(message.actor_name).options
        recorder = options.get("failure_recorder", self.actor_name)
        if recorder is None or message.actor_name == self.actor_name:
            logger.error("Could not record the failure of %s%r: %s", message.actor_name, message.args, reason)
            return
        if not isinstance(exception, CrawlError):
            logger.error("Message %s of %s failed: %r", message.message_id, message.actor_name, exception)
        try:
            broker.get_actor(recorder).send(message.args[0], reason)
        except Exception:  # a lost outcome must at least be visible in the log
            logger.exception("Could not send the failure of %s%r", message.actor_name, message.args)
