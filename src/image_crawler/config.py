"""Settings, read once from the environment into one frozen object."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, features

from .redaction import redact_url


class ConfigError(ValueError):
    """A setting in the environment has a value we cannot use."""


def _seconds(value: str) -> float:
    expected = "must be a number of seconds in (0, 3600]"
    try:
        number = float(value)
    except ValueError:
        raise ValueError(expected) from None
    if not 0 < number <= 3600:  # also refuses nan and inf
        raise ValueError(expected)
    return number


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"must be an integer in [{low}, {high if high is not None else '∞'}]"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(expected) from None
        if number < low or (high is not None and number > high):
            raise ValueError(expected)
        return number

    return parse


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 0 or 1")


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if urlsplit(value).scheme not in schemes:
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return value

    return parse


#: The raster formats of the web, IMAGE_FORMATS's default: whatever the Pillow build, these names
#: are valid (one this Pillow cannot decode, AVIF without libavif or its plugin, is left out).
WEB_IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "ICO", "TIFF", "MPO", "AVIF")
#: Refused even when named: Pillow hands EPS to Ghostscript, an interpreter with a history of exploits.
REFUSED_IMAGE_FORMATS = frozenset({"EPS"})
_ALL_FORMATS = "all"
#: Formats whose Pillow plugin decodes only with an optional library, and the feature naming it.
_CODEC_FEATURES = {"AVIF": "avif", "WEBP": "webp", "JPEG": "jpg", "MPO": "jpg", "JPEG2000": "jpg_2000"}


@cache
def _pillow_formats() -> frozenset[str]:
    """Every format ``Image.open`` can give, EPS included: its openers, and MPO (opened by JPEG's)."""
    Image.init()
    names = set(Image.OPEN)
    if "JPEG" in names:
        names.add("MPO")
    return frozenset(names)


def _decodable(name: str) -> bool:
    feature = _CODEC_FEATURES.get(name)
    return name in _pillow_formats() and (feature is None or bool(features.check(feature)))


def _image_formats(value: str) -> str:
    """IMAGE_FORMATS, upper-cased and without spaces or repeats (``all`` stays ``all``)."""
    listed = [name.strip() for name in value.split(",") if name.strip()]
    if any(name.lower() == _ALL_FORMATS for name in listed):
        if len(listed) > 1:
            raise ValueError("must be all, alone, or a comma list of Pillow format names")
        return _ALL_FORMATS
    if not listed:
        raise ValueError("must be a comma list of Pillow format names, or all; it names none")
    names = list(dict.fromkeys(name.upper() for name in listed))
    for name in names:
        if name in REFUSED_IMAGE_FORMATS:
            raise ValueError(f"{name} is always refused: Pillow would hand the bytes to Ghostscript")
        if name not in _pillow_formats() and name not in WEB_IMAGE_FORMATS:
            known = sorted((_pillow_formats() | set(WEB_IMAGE_FORMATS)) - REFUSED_IMAGE_FORMATS)
            raise ValueError(
                f"must be a comma list of Pillow format names, or all; {name!r} is none of {', '.join(known)}"
            )
    return ",".join(names)


@cache
def _allowed_image_formats(spec: str) -> frozenset[str]:
    spec = _image_formats(spec)  # as load_settings leaves it, also for a Settings made in code
    if spec == _ALL_FORMATS:
        names = _pillow_formats() - REFUSED_IMAGE_FORMATS
    else:
        names = frozenset(spec.split(",")) - REFUSED_IMAGE_FORMATS
    return frozenset(name for name in names if _decodable(name))


def _setting(default: Any, parse: Callable[[str], Any], doc: str, **options: Any) -> Any:
    """A field of :class:`Settings`: its default, how its variable is read and bounded, what it means."""
    return field(default=default, metadata={"parse": parse, "doc": doc}, **options)


@dataclass(frozen=True)
class Settings:
    """Every setting of image-crawler, read from the environment variable named like its field.

    Each field's metadata holds ``parse`` (reads the variable's text, refusing what is out of
    bounds with a ValueError that says what is expected) and ``doc`` (what it means, in a line).
    """

    redis_url: str = _setting(
        "redis://localhost:6379/0",
        _url("redis", "rediss", "unix"),
        "The Redis of the broker, results and claim checks.",
    )
    mongo_uri: str = _setting(
        "mongodb://localhost:27017/image_crawler",
        _url("mongodb", "mongodb+srv"),
        "The MongoDB to store into; the database is the URI's path.",
    )
    fetch_timeout: float = _setting(
        30.0, _seconds, "Seconds allowed for a whole download (connect, each read, in total)."
    )
    fetch_retries: int = _setting(
        3,
        _int_in(0, 100),
        "Retries of a transient failure (5xx, 429, timeout, reset) before the job ends in error.",
    )
    fetch_max_bytes: int = _setting(
        50 * 1024 * 1024, _int_in(1), "Largest body downloaded, counted after decompression."
    )
    fetch_max_redirects: int = _setting(5, _int_in(0, 100), "Most redirects followed for one URL.")
    fetch_allow_private: bool = _setting(
        False, _flag, "Whether URLs may reach loopback, private and other non-public addresses."
    )
    max_image_pixels: int = _setting(
        50_000_000, _int_in(1), "Most pixels an image may have; a larger one is refused before decoding."
    )
    # Measured on photos (make bench): level 1 encodes 3.8x faster than 6 for 16 % more bytes;
    # 9 is no smaller than 6.
    png_compress_level: int = _setting(
        1, _int_in(0, 9), "zlib level of the stored grayscale PNGs (0 = none, 9 = smallest)."
    )
    claim_ttl: int = _setting(
        3600, _int_in(60), "Seconds a downloaded body (and its PNG) may wait in Redis for the next task."
    )
    batch_size: int = _setting(
        32,
        _int_in(1, 1000),
        "Most URL lines in one fetch message (1: one image per message); fewer when a list is too"
        " short to give every worker thread a batch this size.",
    )
    fetch_concurrency: int = _setting(
        32,
        _int_in(1, 1000),
        "Downloads one worker process runs at once, over all the batches its threads fetch.",
    )
    max_deliveries: int = _setting(
        3,
        _int_in(1, 100),
        "Worker deaths while running a URL (a decoder crash, the OOM killer) before it ends in error.",
    )
    decode_memory_mb: int = _setting(
        1024,
        _int_in(16),
        'Megabytes of estimated decoding peak (docs/architecture.md, "Memory") one worker process may'
        " hold at once; a larger image waits until nothing else decodes, then runs alone.",
    )
    image_formats: str = _setting(
        ",".join(WEB_IMAGE_FORMATS),
        _image_formats,
        "Pillow formats a body may be decoded as, comma-separated, or all (every one but EPS); any"
        " other ends as `unsupported format <NAME>` without its decoder running.",
    )
    host_concurrency: int = _setting(
        8, _int_in(0, 10_000), "Requests in flight to one host name at once, over every worker (0: no limit)."
    )
    host_delay_ms: int = _setting(
        0, _int_in(0, 3_600_000), "Least milliseconds between the starts of two requests to one host name."
    )
    retry_after_max: int = _setting(
        600,
        _int_in(1, 86_400),
        "Longest Retry-After (seconds) a URL waits for; one asking for longer ends in error.",
    )
    user_agent: str = _setting(
        "", str, "The User-Agent of every request; empty: image-crawler/<version> (+<project URL>)."
    )
    obey_robots: bool = _setting(
        False, _flag, "Whether robots.txt (and X-Robots-Tag: noimageindex, noai…) is obeyed."
    )
    worker_metrics: bool = _setting(
        False, _flag, "Whether each worker command serves Dramatiq's Prometheus metrics (README: Metrics)."
    )
    web_user: str = _setting(
        "",
        str,
        "HTTP basic auth user of the web app; with WEB_PASSWORD, every route but /healthz asks for them.",
    )
    web_password: str = _setting(
        "", str, "HTTP basic auth password of the web app, taken as written.", repr=False
    )

    @property
    def allowed_image_formats(self) -> frozenset[str]:
        """The formats ``IMAGE_FORMATS`` names that this Pillow can decode (never EPS)."""
        return _allowed_image_formats(self.image_formats)

    @property
    def mongo_database(self) -> str:
        """The database named by the path of ``MONGO_URI``."""
        return database_name(self.mongo_uri)


def database_name(uri: str) -> str:
    """The database a MongoDB URI names by its path (``image_crawler`` when it names none)."""
    return urlsplit(uri).path.lstrip("/") or "image_crawler"


def describe(setting: str) -> str:
    """What the setting named ``setting`` (a field name) means, in a line."""
    doc: str = {item.name: item for item in fields(Settings)}[setting].metadata["doc"]
    return doc


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: ``os.environ``); bad values raise ConfigError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in fields(Settings):
        name = setting.name.upper()
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        # A password is taken as written: spaces around it are part of it.
        value = raw if setting.name == "web_password" else raw.strip()
        try:
            values[setting.name] = setting.metadata["parse"](value)
        except ValueError as exc:
            shown = "***" if setting.name == "web_password" else repr(redact_url(raw, checked=False))
            raise ConfigError(f"{name}={shown} is invalid: {exc}") from None
    check_web_credentials(values.get("web_user", ""), values.get("web_password", ""))
    return Settings(**values)


def check_web_credentials(user: str, password: str) -> None:
    """Raise ConfigError unless ``WEB_USER``/``WEB_PASSWORD`` are both set, or neither, and usable.

    An app meant to be closed must not start open; and basic auth ends a user name at its
    first colon, so a user name holding one could never sign in.
    """
    if bool(user) != bool(password):
        raise ConfigError("WEB_USER and WEB_PASSWORD must be set together (or neither)")
    if ":" in user:
        raise ConfigError("WEB_USER cannot hold a colon: basic auth ends the user name there")


@cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return load_settings()
