"""The fetcher's pure policy: URLs, addresses, Retry-After, content decoding, error reasons.

Nothing here opens a socket: these are the decisions ``fetching`` makes from a string, a
header or an exception, one by one (the mutation run of ``make mutate`` relies on them).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import socket
import ssl
import time
import zlib
from importlib import metadata

import httpx
import pytest

from image_crawler import fetching
from image_crawler.errors import ConnectionFailed, FetchError, FetchTimeout, InvalidUrl
from image_crawler.fetching import (
    _DECODE_STEP,
    PROJECT_URL,
    _BodyDecoder,
    _content_length,
    _fetch_error,
    _has_zlib_header,
    _time_left,
    check_url,
    default_user_agent,
    is_public_address,
    parse_retry_after,
)

# --- URL and address policy -------------------------------------------------------------


def test_an_unescaped_at_sign_in_a_password_needs_percent_encoding():
    # The userinfo runs to the last "@": "p@ss" would otherwise hide half of it from redaction.
    with pytest.raises(InvalidUrl) as caught:
        check_url("http://user:p@ss@host/a.png")
    assert caught.value.reason == "credentials in url need percent-encoding"
    assert check_url("http://user:p%40ss@host/a.png") == "http://user:p%40ss@host/a.png"


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # IPv6 site-local, which Python calls global
        "192.88.99.1",  # 6to4 relay anycast, which Python 3.11 calls global
        "192.0.0.1",  # IETF protocol assignments
        "4000::1",  # reserved by the IETF, which Python calls global
    ],
)
def test_addresses_python_calls_global_but_are_not_are_refused(address: str):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["192.0.0.9", "192.0.0.10"])
def test_the_global_exceptions_of_the_ietf_block_are_allowed(address: str):
    assert is_public_address(address)


# --- Retry-After ------------------------------------------------------------------------


def _http_date(moment: dt.datetime, *, zone: str = "GMT") -> str:
    text = email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True)
    return text if zone == "GMT" else text.replace("GMT", zone)


@pytest.mark.parametrize(
    ("header", "seconds"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("9999999999", 9999999999.0)]
)
def test_retry_after_in_seconds_is_read_as_written(header: str, seconds: float):
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize(
    "header", [None, "", "soon", "12345678901", "١٢٣", "-5", "1.5", "Someday, 99 Foo 2015"]
)
def test_an_unreadable_retry_after_is_none(header: str | None):
    assert parse_retry_after(header) is None


@pytest.mark.parametrize("zone", ["GMT", "-0000"])
def test_retry_after_as_an_http_date_is_the_time_until_then(zone: str):
    # "-0000" gives a naive datetime, to be read as UTC like every HTTP date.
    when = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=300)
    seconds = parse_retry_after(_http_date(when, zone=zone))
    assert seconds is not None and 290 <= seconds <= 300


def test_retry_after_as_a_date_in_the_past_is_no_wait():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# --- who we are, and the time left --------------------------------------------------------


def test_the_user_agent_names_the_version_and_the_project():
    version = metadata.version("image-crawler")
    assert default_user_agent() == f"image-crawler/{version} (+{PROJECT_URL})"


def test_the_user_agent_of_an_uninstalled_copy_says_version_0(monkeypatch: pytest.MonkeyPatch):
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(fetching.metadata, "version", not_installed)
    assert default_user_agent() == f"image-crawler/0 (+{PROJECT_URL})"


def test_a_hop_gets_the_time_left_as_its_timeouts():
    timeouts = _time_left(time.monotonic() + 0.5)
    assert set(timeouts) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 0.5 for value in timeouts.values())


def test_no_time_left_is_a_timeout():
    with pytest.raises(FetchTimeout):
        _time_left(time.monotonic() - 0.001)


@pytest.mark.parametrize(
    ("headers", "length"), [({"Content-Length": "12"}, 12), ({}, None), ({"Content-Length": "x"}, None)]
)
def test_the_declared_length_is_read_when_it_is_a_number(headers: dict, length: int | None):
    assert _content_length(httpx.Response(200, headers=headers)) == length


# --- content decoding ---------------------------------------------------------------------

BODY = bytes(range(256)) * 1000  # 256 kB: several decode steps


def decoded(decoder: _BodyDecoder, *chunks: bytes) -> bytes:
    out = b"".join(piece for chunk in chunks for piece in decoder.decode(chunk))
    decoder.finish()
    return out


@pytest.mark.parametrize("encoding", ["", "identity", " Identity "])
def test_no_content_encoding_is_passed_through(encoding: str):
    decoder = _BodyDecoder(encoding)
    assert decoder.is_identity is True
    assert decoded(decoder, b"as", b" sent") == b"as sent"


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", " GZIP "])
def test_gzip_is_decoded_under_either_name(encoding: str):
    decoder = _BodyDecoder(encoding)
    assert decoder.is_identity is False
    assert decoded(decoder, gzip.compress(BODY)) == BODY


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress"])
def test_an_encoding_we_did_not_ask_for_is_refused(encoding: str):
    with pytest.raises(FetchError) as caught:
        _BodyDecoder(encoding)
    assert caught.value.reason == "unsupported content encoding"
    assert not caught.value.transient


def test_decoding_is_done_in_bounded_steps():
    # The step bound is what lets the size limit stop a gzip bomb before it is inflated.
    pieces = list(_BodyDecoder("gzip").decode(gzip.compress(bytes(1_000_000))))
    assert max(len(piece) for piece in pieces) == _DECODE_STEP
    assert sum(len(piece) for piece in pieces) == 1_000_000


def test_a_gzip_body_of_several_members_is_decoded_whole():
    assert decoded(_BodyDecoder("gzip"), gzip.compress(BODY[:5000]) + gzip.compress(BODY[5000:])) == BODY


#: Found by `make mutate`: after the end of a stream, zlib (decompress with a max_length) can keep
#: the bytes that follow in unconsumed_tail as well as in unused_data; decode() then feeds that
#: tail back forever, and a server that pads its body this way stalls the worker thread.
def test_zero_padding_after_a_gzip_body_is_ignored():
    assert decoded(_BodyDecoder("gzip"), gzip.compress(b"small") + bytes(10)) == b"small"


# Bytes after the end of a stream longer than one decode step stayed in zlib's unconsumed_tail
# and were fed back for ever: a server could hold a worker thread until its time limit.
@pytest.mark.timeout(3)
@pytest.mark.parametrize(
    ("encoding", "body", "expected"),
    [("gzip", gzip.compress(BODY) + bytes(10), BODY), ("deflate", zlib.compress(BODY) + b"junk", BODY)],
    ids=["gzip, zero padding", "deflate, junk"],
)
def test_bytes_after_a_longer_encoded_body_do_not_stall_the_decoder(
    encoding: str, body: bytes, expected: bytes
):
    assert decoded(_BodyDecoder(encoding), body) == expected


def test_garbage_after_a_gzip_body_is_a_bad_encoding():
    with pytest.raises(FetchError) as caught:
        decoded(_BodyDecoder("gzip"), gzip.compress(BODY) + b"XXXX")
    assert caught.value.reason == "bad content encoding"


def test_bytes_after_the_end_of_a_deflate_stream_are_not_read():
    assert decoded(_BodyDecoder("deflate"), zlib.compress(b"small") + b"junk") == b"small"


def test_a_corrupt_stream_is_a_bad_content_encoding():
    with pytest.raises(FetchError) as caught:
        decoded(_BodyDecoder("gzip"), b"\x1f\x8b\x08\x00" + bytes(20))
    assert caught.value.reason == "bad content encoding"
    assert not caught.value.transient


def test_the_shortest_deflate_stream_is_decoded():
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    empty = compressor.compress(b"") + compressor.flush()
    assert len(empty) == 2
    assert decoded(_BodyDecoder("deflate"), empty) == b""


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(BODY)[:-200]),
        ("deflate", zlib.compress(BODY)[:-200]),
        ("deflate", b"\x78"),  # one byte: not even a header
    ],
    ids=["gzip", "deflate", "one byte"],
)
def test_an_encoded_body_cut_short_is_a_truncated_body(encoding: str, body: bytes):
    decoder = _BodyDecoder(encoding)
    list(decoder.decode(body))
    with pytest.raises(ConnectionFailed) as caught:
        decoder.finish()
    assert caught.value.reason == "truncated body"
    assert caught.value.transient


@pytest.mark.parametrize(
    ("head", "wrapped"),
    [
        (b"\x78\x9c", True),
        (b"\x78\xda", True),
        (b"\x08\x1d", True),
        (b"\x78\x00", False),
        (b"\x00\x1f", False),
        (b"\x78", False),
    ],
)
def test_a_zlib_header_is_told_from_raw_deflate(head: bytes, wrapped: bool):
    assert _has_zlib_header(head) is wrapped


# --- what an httpx failure is reported as ---------------------------------------------------


def _raised(
    exc: httpx.HTTPError, *, cause: BaseException | None = None, context: BaseException | None = None
):
    exc.__cause__ = cause
    exc.__context__ = context
    return exc


def _connect_error(cause: BaseException | None = None, *, via_context: bool = False) -> httpx.HTTPError:
    middle = httpx.ConnectError("failed")  # httpx wraps httpcore, which wraps the OSError
    if via_context:
        return _raised(middle, context=cause)
    return _raised(middle, cause=cause)


@pytest.mark.parametrize(
    ("exc", "kind", "reason", "transient"),
    [
        (httpx.ConnectTimeout("slow"), FetchTimeout, "timeout", True),
        (httpx.ReadTimeout("slow"), FetchTimeout, "timeout", True),
        (httpx.UnsupportedProtocol("ftp"), InvalidUrl, "not an http(s) url", False),
        (
            _connect_error(socket.gaierror(-2, "Name does not resolve")),
            ConnectionFailed,
            "dns lookup failed",
            True,
        ),
        (
            _connect_error(ssl.SSLCertVerificationError("certificate verify failed")),
            FetchError,
            "tls certificate rejected",
            False,
        ),
        (_connect_error(ssl.SSLError("wrong version number")), ConnectionFailed, "tls error", True),
        (
            _connect_error(ConnectionRefusedError(111, "refused")),
            ConnectionFailed,
            "connection refused",
            True,
        ),
        (_connect_error(ConnectionResetError(104, "reset")), ConnectionFailed, "connection reset", True),
        (
            _connect_error(ConnectionResetError(104, "reset"), via_context=True),
            ConnectionFailed,
            "connection reset",
            True,
        ),
        (httpx.RemoteProtocolError("bad status line"), ConnectionFailed, "protocol error", True),
        (httpx.ConnectError("failed"), ConnectionFailed, "connection error", True),
    ],
    ids=[
        "connect timeout",
        "read timeout",
        "scheme",
        "dns",
        "certificate",
        "tls",
        "refused",
        "reset",
        "reset while handling",
        "protocol",
        "other",
    ],
)
def test_an_httpx_failure_is_reported_by_its_deepest_cause(exc, kind, reason: str, transient: bool):
    error = _fetch_error(exc)
    assert type(error) is kind
    assert (error.reason, error.transient) == (reason, transient)


def test_the_causes_of_a_failure_are_followed_deep_and_only_once():
    refused = ConnectionRefusedError(111, "refused")
    inner = _raised(httpx.ConnectError("inner"), cause=refused)
    outer = _raised(httpx.ConnectError("outer"), cause=inner)
    assert _fetch_error(outer).reason == "connection refused"
    # A cycle of causes (an exception re-raised from its own handler) ends the walk.
    first, second = httpx.ConnectError("first"), httpx.ConnectError("second")
    first.__cause__, second.__cause__ = second, first
    assert list(fetching._causes(first)) == [first, second]
    assert _fetch_error(first).reason == "connection error"
