"""The pipeline's actors: admit → fetch → group[md5, grayscale] → collect, and the recorders.

Importing this module sets up the broker, so ``dramatiq image_crawler.actors`` starts
workers. Actors are thin: they rebuild the job from the message, call a pure function
or a storage helper, and hand on the result. Every job ends in exactly one outcome: the
collector records success or duplicate, and any message that fails for good is handed to
``record_failure`` (``record_admit_failure`` for a batch) by
:class:`~image_crawler.middleware.RecordFailures`.

``enqueue`` sends URL lines in batches (one message per :data:`ADMIT_BATCH` lines, so a
million-line file is queued in seconds); ``admit`` turns a batch into fetch messages. What
bounds the fetch backlog is ``enqueue --max-in-flight``, not admission: idle workers admit
every batch they are given at once.
"""

from __future__ import annotations

import hashlib
from typing import Any

import dramatiq
from dramatiq.results import ResultMissing as _BackendResultMissing
from dramatiq.results import Results

from . import claims, imaging, outcomes, storage
from .broker import ADMIT_QUEUE, FETCH_QUEUE, PROCESS_QUEUE, setup_broker
from .config import get_settings
from .context import get_context, share_redis
from .errors import ClaimExpired, ResultMissing
from .middleware import retry_transient
from .outcomes import Job

settings = get_settings()
broker = setup_broker(settings)
share_redis(broker.client)  # one Redis pool per process: claim checks ride the broker's

#: URL lines per admit message.
ADMIT_BATCH = 1_000
#: How long an admitted batch is remembered, so a redelivered batch is not fetched twice.
ADMITTED_TTL_S = 7 * 24 * 3600
_ADMITTED_PREFIX = "image-crawler:admitted"

# Work already started outranks new work: follow-up actors run on their own queue with
# priority 0 (fetch: 100), so a worker holding both kinds of message runs them first and
# parked bodies and results are consumed long before their TTLs; a worker holding a batch
# and other work admits the batch last (200).


def admitted_key(batch: dict[str, Any]) -> str:
    """The Redis key that marks a batch as admitted (named after its first job)."""
    first_line = batch["lines"][0][0] if batch["lines"] else 0
    return f"{_ADMITTED_PREFIX}:{batch['run']}:{first_line}"


def _jobs(batch: dict[str, Any]) -> list[Job]:
    return [Job.new(batch["run"], int(line), url) for line, url in batch["lines"]]


@dramatiq.actor(
    queue_name=ADMIT_QUEUE,
    priority=200,
    retry_when=retry_transient(20),
    max_backoff=300_000,
    failure_recorder="record_admit_failure",
)
def admit(batch: dict[str, Any]) -> None:
    """Send a fetch message for every ``[line, url]`` of ``batch["lines"]`` of run ``batch["run"]``.

    All of them in one MULTI/EXEC with the batch's admitted mark, which the transaction WATCHes:
    a batch redelivered after a worker died, or delivered twice at once, is admitted once; a
    transaction whose reply was lost is not sent again but retried as a message, and finds
    the mark if it ran.
    """
    key = admitted_key(batch)
    if broker.client.exists(key):
        return
    with broker.pipelined(transaction=True) as pipe:
        pipe.watch(key)
        if pipe.exists(key):
            pipe.unwatch()
            return
        pipe.multi()
        for job in _jobs(batch):
            fetch.send(job.to_message())
        pipe.set(key, 1, ex=ADMITTED_TTL_S)


@dramatiq.actor(
    queue_name=FETCH_QUEUE,
    priority=100,
    retry_when=retry_transient(settings.fetch_retries),
    # A drip just under the read timeout can stretch a download to 2 × FETCH_TIMEOUT.
    time_limit=int(2 * settings.fetch_timeout * 1000) + 60_000,
)
def fetch(job: dict[str, Any]) -> None:
    """Download the job's URL, park the body, and start md5 and grayscale on it."""
    context = get_context()
    crawl_job = Job.from_message(job)
    download = context.fetcher.fetch(crawl_job.url)
    digest_message = md5.message(job)
    gray_message = grayscale.message(job)
    meta = {
        "content_type": download.content_type,
        "byte_size": len(download.content),
        "final_url": download.final_url,
    }
    members = {"md5": digest_message.message_id, "grayscale": gray_message.message_id}
    group = dramatiq.group([digest_message, gray_message])
    group.add_completion_callback(collect.message(job, meta, members))
    # The body and both messages go in one pipeline, the body first: a member never starts
    # before the body is parked. (Resent if its reply is lost: members may then run twice,
    # which the barrier and the collector tolerate.)
    with broker.pipelined() as pipe:
        context.claims.put(claims.body_key(crawl_job.id), download.content, pipe=pipe)
        group.run()


@dramatiq.actor(store_results=True, retry_when=retry_transient(5), queue_name=PROCESS_QUEUE, priority=0)
def md5(job: dict[str, Any]) -> str:
    """MD5 hex of the downloaded bytes."""
    context = get_context()
    body = context.claims.get(claims.body_key(job["id"]), "body")
    return hashlib.md5(body).hexdigest()


@dramatiq.actor(store_results=True, retry_when=retry_transient(5), queue_name=PROCESS_QUEUE, priority=0)
def grayscale(job: dict[str, Any]) -> dict[str, int]:
    """Decode the body, park its grayscale PNG, and return the upright width and height."""
    context = get_context()
    body = context.claims.get(claims.body_key(job["id"]), "body")
    gray = imaging.to_grayscale(
        body,
        max_pixels=context.settings.max_image_pixels,
        compress_level=context.settings.png_compress_level,
    )
    context.claims.put(claims.gray_key(job["id"]), gray.png)
    return {"width": gray.width, "height": gray.height}


@dramatiq.actor(retry_when=retry_transient(10), max_backoff=120_000, queue_name=PROCESS_QUEUE, priority=0)
def collect(job: dict[str, Any], meta: dict[str, Any], members: dict[str, str]) -> None:
    """Pull md5 and grayscale results, store the image once, and record success or duplicate."""
    context = get_context()
    crawl_job = Job.from_message(job)
    digest: str = _member_result(md5, job, members["md5"])
    size: dict[str, int] = _member_result(grayscale, job, members["grayscale"])
    record = storage.ImageRecord(
        md5=digest,
        width=size["width"],
        height=size["height"],
        source_url=crawl_job.url,
        content_type=meta.get("content_type"),
        byte_size=meta["byte_size"],
    )
    try:
        png: bytes | None = context.claims.get(claims.gray_key(crawl_job.id), "grayscale image")
    except ClaimExpired:
        if not storage.has_image(context.db, digest):
            raise
        png = None
    stored_now = storage.store_image(context.db, record, png, job_id=crawl_job.id)
    outcome = outcomes.SUCCESS if stored_now else outcomes.DUPLICATE
    outcomes.record_outcome(context.db, crawl_job, outcome, md5=digest)
    context.claims.drop(crawl_job.id)


#: Recorders outlast a long MongoDB outage, and their own failures are only logged.
_RECORDER_OPTIONS: dict[str, Any] = {
    "retry_when": retry_transient(20),
    "max_backoff": 300_000,
    "queue_name": PROCESS_QUEUE,
    "priority": 0,
    "failure_recorder": None,
}


@dramatiq.actor(**_RECORDER_OPTIONS)
def record_failure(job: dict[str, Any], reason: str) -> None:
    """Record the error outcome of a job whose message failed for good."""
    context = get_context()
    crawl_job = Job.from_message(job)
    outcomes.record_outcome(context.db, crawl_job, outcomes.ERROR, reason=reason)
    context.claims.drop(crawl_job.id)


@dramatiq.actor(**_RECORDER_OPTIONS)
def record_admit_failure(batch: dict[str, Any], reason: str) -> None:
    """Record an error outcome for every line of a batch that could not be admitted."""
    context = get_context()
    reason = f"not admitted: {reason}"
    documents = [outcomes.outcome_document(job, outcomes.ERROR, reason=reason) for job in _jobs(batch)]
    outcomes.record_outcomes(context.db, documents)


def _member_result(actor: dramatiq.Actor, job: dict[str, Any], message_id: str) -> Any:
    # Result keys are derived from queue, actor and message id; rebuilding the message with
    # the member's id finds its result without carrying whole messages around.
    message = actor.message(job).copy(message_id=message_id)
    try:
        return message.get_result(backend=_result_backend())
    except _BackendResultMissing:
        raise ResultMissing(f"{actor.actor_name} result missing") from None


def _result_backend():
    for middleware in broker.middleware:
        if isinstance(middleware, Results):
            return middleware.backend
    raise RuntimeError("the broker has no Results middleware")
