"""Keep the credentials a URL carries out of everything but the request that needs them.

A line like ``http://user:secret@host/cat.jpg`` (or ``REDIS_URL=redis://:secret@redis``) is
sent as written, but the ledger, ``images.source_url``, the web app, error messages and log
lines only ever see ``http://***@host/cat.jpg`` (docs/architecture.md, "Credentials").
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["install_log_redaction", "redact", "redact_url"]

#: ``scheme://userinfo@`` in free text. A match starts only where a run of scheme characters
#: starts, and the scheme is matched possessively: hostile text (``a.a.a.a…``) costs linear time,
#: not quadratic. The userinfo runs to the last ``@`` before the authority ends (``/ ? #``,
#: whitespace, or a double quote or angle bracket, which end a URL in a repr, JSON or HTML).
_USERINFO = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*+://)[^/?#\s\"<>]*@")
_HIDDEN = r"\1***@"


def redact_url(url: str, *, checked: bool = True) -> str:
    """``url`` with its userinfo (user name and password) replaced by ``***``.

    A ``checked`` URL (one ``fetching.check_url`` accepted) is split as httpx splits it: the
    authority runs from ``://`` to the first ``/``, ``?`` or ``#``, its userinfo to the last
    ``@`` in it. Any other text (a rejected line, ``REDIS_URL``, ``MONGO_URI``) may hold a
    password with an unescaped ``/``, ``?`` or ``#``: everything from ``://`` to the last ``@``
    before the first whitespace is hidden, which may hide too much but never too little.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    start = scheme_end + 3
    marks = "/?#" if checked else " \t\r\n\f\v"
    ends = [index for index in (url.find(mark, start) for mark in marks) if index >= 0]
    at = url.rfind("@", start, min(ends, default=len(url)))
    return url if at < 0 else f"{url[:start]}***{url[at:]}"


def redact_url_field(document: dict[str, Any], field: str) -> dict[str, Any]:
    """``document`` with the URL in ``field`` (if any) shown without credentials.

    The pipeline stores URLs redacted; readers apply this too, for documents an earlier
    version stored before it did (docs/architecture.md, "Credentials").
    """
    if isinstance(document.get(field), str):
        document[field] = redact_url(document[field])
    return document


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    if "@" not in text:
        return text
    return _USERINFO.sub(_HIDDEN, text)


_installed = False


def install_log_redaction() -> None:
    """Make every log record of this process redact URL credentials, tracebacks included.

    Installed as a record factory rather than a filter, so that records of every logger (Dramatiq
    logs whole messages, URLs and all, when one fails) are covered whichever handlers exist.
    """
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: the handler would print them raw
            try:
                message = f"{record.msg!s} % {record.args!r}"
            except Exception:
                message = "unprintable log record"
            record.msg, record.args = redact(message), None
        if "@" in message:
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if "@" in text:
                record.exc_text = redact(text)
        return record

    logging.setLogRecordFactory(redacting_record)
