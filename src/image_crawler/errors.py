"""Typed errors of the pipeline.

Every error of a URL's own is a :class:`CrawlError`; its ``reason`` is the short text stored
in the job's outcome (``http 404``, ``timeout``, ``not an image``), and its ``transient`` flag
says whether trying again later may help: the retry policy reads the flag, never the message.
A message that fails as a whole (a store down, a time limit) ends its lines with
``middleware.reason_for``, and ``middleware.is_transient`` answers for both kinds. The flag
is the one way to ask: a class sets it for all its errors (``FetchTimeout``),
:class:`HttpStatusError` per status. ``retry_limit`` caps the retries of a kind of error
whatever the actor allows.

    CrawlError                      reason, transient (False), retry_limit (None)
    ├── FetchError                  the URL could not be downloaded
    │   ├── InvalidUrl
    │   ├── ForbiddenAddress
    │   ├── HttpStatusError         transient for 408, 429 and 5xx
    │   ├── FetchTimeout            transient
    │   ├── ConnectionFailed        transient
    │   ├── TooManyRedirects
    │   ├── TooLarge
    │   └── robots.RobotsDisallowed
    ├── ImageError                  the body could not be turned into an image
    │   ├── NotAnImage
    │   ├── TruncatedImage
    │   ├── TooManyPixels
    │   └── UnsupportedFormat
    ├── ClaimExpired
    ├── ResultMissing               transient, at most 4 retries
    ├── ShuttingDown                transient
    └── StoreBusy                   transient

Not job outcomes, and so not here: ``politeness.HostBusy`` and ``robots.RobotsPending`` (a
line waits for its host's turn, without using a try) and ``config.ConfigError``.
"""

from __future__ import annotations


class CrawlError(Exception):
    """A job failed; ``reason`` is what the outcome ledger records."""

    #: Whether trying again later may succeed (network, 5xx, a store being down).
    transient: bool = False
    #: At most this many retries for this kind of failure, whatever the actor allows (None: no cap).
    retry_limit: int | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- fetching -------------------------------------------------------------------------


class FetchError(CrawlError):
    """The URL could not be downloaded."""


class InvalidUrl(FetchError):
    """The line is not an absolute http(s) URL we are willing to fetch."""


class ForbiddenAddress(FetchError):
    """The host resolves to a loopback, private, link-local or otherwise reserved address."""


class HttpStatusError(FetchError):
    """The server answered with a non-2xx status."""

    def __init__(self, status: int, *, retry_after: float | None = None) -> None:
        super().__init__(f"http {status}")
        self.status = status
        #: Seconds the server asked us to wait (``Retry-After`` of a 429 or 503), if it said.
        self.retry_after = retry_after
        # 408/429 and 5xx are the server asking us to come back later.
        self.transient = status in (408, 429) or status >= 500

    @property
    def overloaded(self) -> bool:
        """Whether the host said it gets too many requests (429, or 503 with ``Retry-After``)."""
        return self.status == 429 or (self.status == 503 and self.retry_after is not None)


class FetchTimeout(FetchError):
    """Connecting or reading took longer than ``FETCH_TIMEOUT``."""

    transient = True

    def __init__(self, reason: str = "timeout") -> None:
        super().__init__(reason)


class ConnectionFailed(FetchError):
    """The connection could not be made or was reset."""

    transient = True


class TooManyRedirects(FetchError):
    """More redirects than ``FETCH_MAX_REDIRECTS``."""

    def __init__(self, reason: str = "too many redirects") -> None:
        super().__init__(reason)


class TooLarge(FetchError):
    """The body is bigger than ``FETCH_MAX_BYTES`` (counted after decompression)."""

    def __init__(self, reason: str = "too large") -> None:
        super().__init__(reason)


# --- imaging --------------------------------------------------------------------------


class ImageError(CrawlError):
    """The body could not be turned into an image."""


class NotAnImage(ImageError):
    """The bytes are not an image format Pillow can decode (HTML, empty, garbage)."""

    def __init__(self, reason: str = "not an image") -> None:
        super().__init__(reason)


class TruncatedImage(ImageError):
    """The image header is valid but its data ends early or is corrupt."""

    def __init__(self, reason: str = "truncated image") -> None:
        super().__init__(reason)


class TooManyPixels(ImageError):
    """More pixels than ``MAX_IMAGE_PIXELS``: refused before decoding (decompression bomb)."""


class UnsupportedFormat(ImageError):
    """A format outside ``IMAGE_FORMATS`` (or EPS, always refused): named by its signature, never parsed."""

    def __init__(self, format_name: str) -> None:
        super().__init__(f"unsupported format {format_name}")
        self.format_name = format_name


# --- pipeline -------------------------------------------------------------------------


class ClaimExpired(CrawlError):
    """A body or PNG parked in Redis between tasks is gone (its TTL ran out)."""


class ResultMissing(CrawlError):
    """A group member's result is not (or no longer) in the result backend.

    Right after a redelivered member fired the group's callback early, the other result is
    seconds away; a result that expired never comes back, so the wait is kept short.
    """

    transient = True
    retry_limit = 4


class ShuttingDown(CrawlError):
    """This worker process is exiting and starts no more downloads: the message goes again."""

    transient = True

    def __init__(self, reason: str = "worker shutting down") -> None:
        super().__init__(reason)


class StoreBusy(CrawlError):
    """Another worker is writing the same grayscale file right now."""

    transient = True
