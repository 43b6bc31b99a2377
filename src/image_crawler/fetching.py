"""Download one URL with httpx within its limits; bytes out, or a typed error.

The limits are those of docs/architecture.md, "Limits of a download".

What a :class:`Fetcher` guarantees, whatever the server does:

- ``fetch_timeout`` bounds the whole download, from the first connection to the last byte of
  the body, redirects included: it sets one monotonic deadline, which every connect, TLS
  handshake, socket read and write of the fetch is cut at (:class:`_DeadlineStream`), however
  the server spreads its bytes out (a status line and headers sent one byte at a time, each
  just inside a read timeout, included). Only the DNS lookup is outside it (see below), and
  waiting for a free connection of the pool is bounded by the time left.
- ``fetch_max_bytes`` bounds the body after decompression, counted while streaming. Content
  decoding is done here in bounded steps (gzip, deflate) because httpx inflates a whole network
  read at once, which lets a 50 kB gzip bomb become 50 MB in memory before anyone can count.
- Redirects are followed here, one hop at a time, rather than by httpx: httpx reads every
  redirect body into memory with no size limit and outside our deadline. A caller's
  ``check_hop`` (robots.txt, with ``OBEY_ROBOTS``) is asked about each hop before it is sent.
- Unless ``fetch_allow_private``, every connection (for the first request and each redirect
  hop) goes only to a host whose addresses are all public. The name is resolved **once**, in
  the connection pool's network backend, and the connection goes to an address that was
  checked: a DNS answer that changes between a check and the connection (DNS rebinding) has no
  second lookup to change. TLS still verifies the certificate for, and sends SNI with, the
  host name. The lookup is not bounded by ``fetch_timeout`` (``getaddrinfo`` takes no timeout;
  the system resolver's own timeouts apply).
- No cookies are kept and the environment (proxies, ``.netrc``) is ignored: one client is shared
  by every job of a worker, and nothing from one job may leak into the next.

Every failure leaves :meth:`Fetcher.fetch` as a :class:`~image_crawler.errors.CrawlError`.
Decisions worth knowing: an unresolvable host is ``ConnectionFailed("dns lookup failed")``,
transient, because resolvers fail transiently far more often than names disappear; a declared
``Content-Length`` above the limit on an uncompressed response is refused before reading; a
body in a content encoding we did not ask for (``br``, ``zstd``) is a permanent error.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from importlib import metadata
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

# Our errors by their module's name: ``errors.TooManyRedirects`` is never httpx's.
from . import errors
from .config import Settings

# httpx logs every request at INFO: a crawl makes millions, and each costs a worker time.
logging.getLogger("httpx").setLevel(logging.WARNING)

__all__ = [
    "MAX_URL_LENGTH",
    "Download",
    "Fetcher",
    "HopCheck",
    "Resolver",
    "check_url",
    "default_user_agent",
    "is_public_address",
    "parse_retry_after",
]

#: Longest URL we accept; longer lines are garbage, not links.
MAX_URL_LENGTH = 8192

#: Resolves ``(host, port)`` to IP address strings; raises ``OSError`` when the name does not resolve.
Resolver = Callable[[str, int], Iterable[str]]
#: Asked about the URL of each redirect hop before it is requested; refuses it
#: (``RobotsDisallowed``) or puts it off (``RobotsPending``) by raising: :meth:`Fetcher.fetch`
#: lets through anything but httpx's errors.
HopCheck = Callable[[str], None]

_SCHEMES = {"http": 80, "https": 443}
#: What RFC 3986 allows in a URL's userinfo: unreserved, percent-encoded, sub-delims and ":".
_RFC3986_USERINFO = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:]*")
#: Largest piece of decompressed output produced from one step of inflating.
_DECODE_STEP = 64 * 1024
#: Compressed bytes allowed per allowed decoded byte: stops a stream that inflates to nothing.
_RAW_BYTES_FACTOR = 2
#: Seconds an idle keep-alive connection is kept for the next request to its host.
_KEEPALIVE_EXPIRY = 15.0
#: Where an IPv6-only network with DNS64 maps the IPv4 internet (RFC 6052).
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
#: Not globally reachable (IANA special-purpose registries) although Python 3.11 calls them global.
_NOT_GLOBAL = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments (only .9 and .10 are global)
    ipaddress.IPv4Network("192.88.99.0/24"),  # 6to4 relay anycast, deprecated (RFC 7526)
)
_GLOBAL_EXCEPTIONS = (ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10"))


@dataclass(frozen=True)
class Download:
    """A successful download."""

    #: The body as served, after transfer and content decoding (gzip, chunked…).
    content: bytes
    content_type: str | None
    #: Its ``X-Robots-Tag`` headers, each as sent.
    robots_tags: tuple[str, ...] = ()


def check_url(url: str) -> str:
    """Return ``url`` stripped of surrounding whitespace if it is an absolute http(s) URL with a host.

    Raises :class:`InvalidUrl` otherwise; this is pure policy, nothing is resolved or fetched.
    """
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise errors.InvalidUrl("url too long")
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in _SCHEMES:
            raise errors.InvalidUrl("not an http(s) url")
        if not parts.hostname:
            raise errors.InvalidUrl("url has no host")
        if any(char.isspace() for char in parts.hostname):
            raise errors.InvalidUrl("unparsable url")
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and not _RFC3986_USERINFO.fullmatch(userinfo):
            # Spaces, quotes or brackets would be sent, yet could hide the credentials from
            # redaction wherever the URL is quoted (a log line, a repr): they must be %-encoded.
            raise errors.InvalidUrl("credentials in url need percent-encoding")
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number in range
        httpx.URL(url)  # what will actually be sent must parse too (IDNA, control characters)
    except (ValueError, httpx.InvalidURL):
        raise errors.InvalidUrl("unparsable url") from None
    return url


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IP literal) is a public unicast address we may connect to.

    Refused: loopback, private, shared (CGNAT), link-local, multicast, reserved, unspecified,
    and the same hidden in IPv6 (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_public(ip.ipv4_mapped)
        if ip in _NAT64_PREFIX:
            return _is_public(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        if ip.sixtofour is not None and not _is_public(ip.sixtofour):
            return False
    return _is_public(ip)


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # ``is_global`` alone lets multicast, IPv6 site-local (fec0::/10) and, on older Pythons, some
    # special ranges through.
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    if (
        isinstance(ip, ipaddress.IPv4Address)
        and ip not in _GLOBAL_EXCEPTIONS
        and any(ip in network for network in _NOT_GLOBAL)
    ):
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as the connection would see them."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


#: A ``Retry-After`` in seconds we can read (ten digits is three centuries: anything longer is noise).
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}")

#: Where a site owner who sees our requests reads what this crawler is.
PROJECT_URL = "https://github.com/image-crawler/image-crawler"


def default_user_agent() -> str:
    """``image-crawler/<version> (+<project URL>)``: who we are, and where to read about it."""
    try:
        version = metadata.version("image-crawler")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"image-crawler/{version} (+{PROJECT_URL})"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date), None if unreadable."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    if value.isdigit() or value.isdecimal():  # too long, or not ASCII digits: unreadable
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT (RFC 9110)
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


class Fetcher:
    """Downloads URLs through one shared, thread-safe httpx client (keep-alive, bounded pool).

    :param settings: ``fetch_timeout``, ``fetch_max_bytes``, ``fetch_max_redirects`` and
        ``fetch_allow_private`` are used.
    :param transport: an httpx transport to use instead of the network (tests).
    :param resolver: how the address policy resolves host names (default: ``socket.getaddrinfo``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.BaseTransport | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._settings = settings
        self._resolve = resolver or _resolve
        # One client per worker process, shared by its downloads: as many connections as
        # downloads may run at once, all of them kept alive between requests.
        limits = httpx.Limits(
            max_connections=settings.fetch_concurrency,
            max_keepalive_connections=settings.fetch_concurrency,
            keepalive_expiry=_KEEPALIVE_EXPIRY,
        )
        hooks: list[Callable[[httpx.Request], None]] = [_check_scheme]
        if transport is None:
            transport = _CheckedTransport(limits, _CheckedBackend(self._addresses))
        else:
            # An injected transport (tests) opens no connection of ours: the address policy
            # runs on each request instead, with the same resolver and rules.
            hooks.append(self._check_destination)
        self._client = httpx.Client(
            transport=transport,
            limits=limits,
            timeout=httpx.Timeout(settings.fetch_timeout),
            headers={
                "User-Agent": settings.user_agent or default_user_agent(),
                "Accept": "image/*,*/*;q=0.8",
                # Only what _BodyDecoder can inflate in bounded steps.
                "Accept-Encoding": "gzip, deflate",
            },
            follow_redirects=False,  # followed hop by hop in _send, see the module docstring
            max_redirects=settings.fetch_max_redirects,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # accept none
            trust_env=False,
            event_hooks={"request": hooks},
        )

    def fetch(self, url: str, *, head: int | None = None, check_hop: HopCheck | None = None) -> Download:
        """Download ``url``; raise a :class:`~image_crawler.errors.FetchError` subclass on any failure.

        With ``head``, only the first ``head`` bytes of the body (after decoding) are read and
        returned: a longer body is cut there and the download stopped, instead of
        :class:`~image_crawler.errors.TooLarge` at ``fetch_max_bytes`` (robots.txt, RFC 9309 §2.5).

        ``check_hop`` is called with the absolute URL of each redirect hop (not ``url`` itself)
        before that hop is requested; what it raises ends the download, that hop unrequested.
        The address policy still checks every hop as it connects.
        """
        url = check_url(url)
        deadline = time.monotonic() + self._settings.fetch_timeout
        # What this thread sends and reads until the fetch is over stops at its deadline. Saved and
        # restored: a fetch may run inside another one's check_hop (robots.txt, by its own Fetcher).
        outer = getattr(_deadlines, "current", None)
        _deadlines.current = deadline
        try:
            response = self._send(url, deadline, check_hop)
            try:
                return self._read(response, deadline, head)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise _fetch_error(exc) from exc
        except httpx.InvalidURL as exc:  # not an HTTPError; e.g. a Location httpx cannot encode
            raise errors.InvalidUrl("unparsable url") from exc
        finally:
            _deadlines.current = outer

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, url: str, deadline: float, check_hop: HopCheck | None = None) -> httpx.Response:
        """Send the request and follow redirects; the returned response is open, its body unread."""
        request = self._client.build_request("GET", url)
        for hop in range(self._settings.fetch_max_redirects + 1):
            if hop and check_hop is not None:
                check_hop(str(request.url))
            request.extensions["timeout"] = _time_left(deadline)
            response = self._client.send(request, stream=True, follow_redirects=False)
            if response.next_request is None:
                return response
            # Closing without reading drops the connection; a redirect body is not worth trusting.
            response.close()
            request = response.next_request
        raise errors.TooManyRedirects()

    def _read(self, response: httpx.Response, deadline: float, head: int | None = None) -> Download:
        """Read the body of a final response within the size and time limits (or its first ``head`` bytes)."""
        if not response.is_success:
            retry_after = None
            if response.status_code in (429, 503):
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise errors.HttpStatusError(response.status_code, retry_after=retry_after)
        limit = self._settings.fetch_max_bytes if head is None else head
        decoder = _BodyDecoder(response.headers.get("content-encoding", ""))
        declared = _content_length(response)
        if head is None and decoder.is_identity and declared is not None and declared > limit:
            raise errors.TooLarge()
        if response.is_stream_consumed:  # an in-memory response (mock transport), decoded by httpx
            decoder, chunks = _BodyDecoder(""), iter([response.content])
        else:
            chunks = response.iter_raw()
        body = bytearray()
        received = 0
        cut = False
        for raw in chunks:
            received += len(raw)
            # Unencoded, raw bytes are body bytes, counted below (and cut there with ``head``).
            if not decoder.is_identity and received > _RAW_BYTES_FACTOR * limit:
                raise errors.TooLarge()
            for piece in decoder.decode(raw):
                body += piece
                if len(body) > limit:
                    if head is None:
                        raise errors.TooLarge()
                    del body[head:]
                    cut = True  # the rest is never read: closing the response drops the connection
                    break
            if cut:
                break
            if time.monotonic() > deadline:
                raise errors.FetchTimeout()
        if not cut:
            decoder.finish()
        return Download(
            bytes(body),
            response.headers.get("content-type"),
            tuple(response.headers.get_list("x-robots-tag")),
        )

    def _addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` may be reached at: all of them public unless ``fetch_allow_private``.

        Raises :class:`ForbiddenAddress` when any is not (a name answering one public and one
        private address could be steered to the private one), ``ConnectionFailed`` when none.
        """
        try:
            addresses = list(self._resolve(host, port))
        except (OSError, UnicodeError):
            raise errors.ConnectionFailed("dns lookup failed") from None
        if not addresses:
            raise errors.ConnectionFailed("dns lookup failed")
        if not self._settings.fetch_allow_private and not all(map(is_public_address, addresses)):
            raise errors.ForbiddenAddress("private address")
        return addresses

    def _check_destination(self, request: httpx.Request) -> None:
        """Request event hook for injected transports: the address policy of :class:`_CheckedBackend`."""
        if self._settings.fetch_allow_private:
            return  # nothing to check, and nothing of ours to connect
        url = request.url
        self._addresses(url.raw_host.decode("ascii"), url.port or _SCHEMES[url.scheme])


def _check_scheme(request: httpx.Request) -> None:
    """Request event hook: refuse a hop to a non-http(s) URL."""
    if request.url.scheme not in _SCHEMES:
        raise errors.InvalidUrl("not an http(s) url")


#: The deadline (``time.monotonic()``) of the fetch running on this thread, as ``current``;
#: unset or None outside :meth:`Fetcher.fetch`.
_deadlines = threading.local()
#: The message of the httpcore timeout raised for an operation begun after the fetch's deadline.
_DEADLINE_PASSED = "fetch deadline passed"


def _bounded(timeout: float | None, timed_out: type[httpcore.TimeoutException]) -> float | None:
    """``timeout`` cut at this thread's fetch deadline; raises ``timed_out`` when it has passed."""
    deadline: float | None = getattr(_deadlines, "current", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out(_DEADLINE_PASSED)
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection's stream whose every operation ends by the deadline of the fetch using it.

    httpcore gives each socket operation the request's timeout afresh, so a server that sends
    one byte just inside it, again and again, holds a download for as long as it likes (and the
    thread with it: a download thread cannot be cancelled). Here each read, write and TLS
    handshake is given at most the time left until the fetch's deadline, and fails with
    httpcore's timeout error (which httpx turns into its own, and :func:`_fetch_error` into
    :class:`~image_crawler.errors.FetchTimeout`) once that has passed. The deadline is the one
    of the thread calling, read at each call: a kept-alive connection serves fetches of
    different threads, one after another.
    """

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # Python bounds a whole TLS handshake by the socket's timeout, not each step of it.
        tls = self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """Connects to a host only at an address its policy returned, resolving the name once.

    ``addresses(host, port)`` resolves and checks (raising a :class:`FetchError` to refuse);
    the addresses are then tried in order, within one connect timeout, exactly as
    ``socket.create_connection`` would try what ``getaddrinfo`` returned. httpcore starts TLS on
    the stream with ``server_hostname`` set to the URL's host, so certificates are verified for
    the name and SNI carries it, whichever address the socket went to. The connect timeout is
    cut at the fetch's deadline, and the stream returned is a :class:`_DeadlineStream`.
    """

    def __init__(self, addresses: Callable[[str, int], list[str]]) -> None:
        self._addresses = addresses
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in self._addresses(host, port):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                stream = self._sockets.connect_tcp(address, port, left, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
            else:
                return _DeadlineStream(stream)
        if failure is None or isinstance(failure, httpcore.ConnectTimeout):
            raise httpcore.ConnectTimeout("connect timed out") from failure
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched from")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _CheckedTransport(httpx.HTTPTransport):
    """httpx's own transport over a connection pool whose connections go through ``backend``.

    ``HTTPTransport`` takes no network backend, so its pool is replaced by one built the same
    way (same limits, TLS context and HTTP/1.1 only) with ``backend``; the request and error
    mapping stay httpx's.
    """

    def __init__(self, limits: httpx.Limits, backend: httpcore.NetworkBackend) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def _time_left(deadline: float) -> dict[str, Any]:
    """The request timeout extension for the rest of the budget; errors.FetchTimeout when none is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.FetchTimeout()
    return httpx.Timeout(left).as_dict()


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


class _BodyDecoder:
    """Undo a ``Content-Encoding`` in steps of at most ``_DECODE_STEP`` output bytes.

    Bounded steps are what make the size limit hold against a gzip bomb: the caller counts (and
    can stop) after every step, instead of after a whole network read was inflated at once.
    """

    def __init__(self, content_encoding: str) -> None:
        encoding = content_encoding.strip().lower()
        self.is_identity = encoding in ("", "identity")
        self._gzip = encoding in ("gzip", "x-gzip")
        self._decompressor: Any = None
        self._head = b""  # the first byte of a deflate body, until the second one comes
        if self._gzip:
            self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding != "deflate" and not self.is_identity:
            raise errors.FetchError("unsupported content encoding")

    def decode(self, data: bytes) -> Iterator[bytes]:
        """Yield the decoded bytes of ``data``, in pieces of bounded size."""
        if self.is_identity:
            yield data
            return
        if self._decompressor is None:
            # "deflate" is meant to be zlib-wrapped (RFC 9110) but is often sent raw; which one it
            # is shows in its first two bytes, which may come in different network reads.
            data = self._head + data
            if len(data) < _ZLIB_HEADER:
                self._head = data
                return
            self._head = b""
            wbits = zlib.MAX_WBITS if _has_zlib_header(data) else -zlib.MAX_WBITS
            self._decompressor = zlib.decompressobj(wbits)
        try:
            while True:
                piece = self._decompressor.decompress(data, _DECODE_STEP)
                if piece:
                    yield piece
                if self._decompressor.eof:
                    # The stream ended: what follows it is in unused_data, or (fed with a bounded
                    # step) still in unconsumed_tail, where decompressing it again would never
                    # consume it. A gzip body may hold several members (RFC 1952), or zero
                    # padding; bytes after a deflate stream are not read.
                    rest = self._decompressor.unused_data + self._decompressor.unconsumed_tail
                    if not (self._gzip and rest.strip(b"\0")):
                        return
                    data = rest
                    self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    continue
                data = self._decompressor.unconsumed_tail
                # A full step may leave output pending even when all input was consumed.
                if not data and len(piece) < _DECODE_STEP:
                    return
        except zlib.error:
            raise errors.FetchError("bad content encoding") from None

    def finish(self) -> None:
        """Check that the encoded body ended where its encoding says it ends."""
        if self._head:  # a one-byte deflate body: no stream is that short
            raise errors.ConnectionFailed("truncated body")
        if self._decompressor is not None and not self._decompressor.eof:
            raise errors.ConnectionFailed("truncated body")


_ZLIB_HEADER = 2


def _has_zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _fetch_error(exc: httpx.HTTPError) -> errors.FetchError:
    """The typed error an httpx failure stands for; the precise reason comes from its causes."""
    if isinstance(exc, httpx.TimeoutException):
        return errors.FetchTimeout()
    if isinstance(exc, httpx.UnsupportedProtocol):
        return errors.InvalidUrl("not an http(s) url")
    causes = list(_causes(exc))
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return errors.ConnectionFailed("dns lookup failed")
    if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes):
        return errors.FetchError("tls certificate rejected")  # permanent: retrying will not fix a certificate
    if any(isinstance(cause, ssl.SSLError) for cause in causes):
        return errors.ConnectionFailed("tls error")
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return errors.ConnectionFailed("connection refused")
    if any(isinstance(cause, ConnectionResetError) for cause in causes):
        return errors.ConnectionFailed("connection reset")
    if isinstance(exc, httpx.ProtocolError):
        return errors.ConnectionFailed("protocol error")
    return errors.ConnectionFailed("connection error")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (httpx → httpcore → OSError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
