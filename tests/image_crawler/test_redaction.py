"""URL credentials are kept out of what is stored, shown and logged."""

from __future__ import annotations

import logging

import pytest

from image_crawler.redaction import install_log_redaction, redact, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@host/a.png", "http://***@host/a.png"),
        ("https://user@host:8443/a.png", "https://***@host:8443/a.png"),
        ("http://user:p@ss@host/a.png", "http://***@host/a.png"),  # an unescaped @ in the password
        ("http://:secret@host", "http://***@host"),
        ("redis://:secret@redis:6379/0", "redis://***@redis:6379/0"),
        (
            "mongodb://u:p@one:27017,two:27017/db?replicaSet=rs",
            "mongodb://***@one:27017,two:27017/db?replicaSet=rs",
        ),
        ("http://host/a@b.png", "http://host/a@b.png"),  # an @ in the path is not userinfo
        ("http://host?who=a@b", "http://host?who=a@b"),
        ("http://host#a@b", "http://host#a@b"),
        ("http://host/a.png", "http://host/a.png"),
        ("HTTP://U:P@H/a.png", "HTTP://***@H/a.png"),
        ("http://user:pa ss@host/a.png", "http://***@host/a.png"),  # as httpx splits it, whatever it holds
        ("http://user:pa'ss@host/a.png", "http://***@host/a.png"),
        ('http://u:p"<>@h/x', "http://***@h/x"),
        ("http://u:p\u3000q@h/x", "http://***@h/x"),
    ],
)
def test_redact_url_hides_userinfo_only(url: str, shown: str):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pa/ss@host/a.png", "http://***@host/a.png"),
        ("mongodb://u:p?w#x@one,two/db", "mongodb://***@one,two/db"),
        ("redis://:secret@redis:6379/0", "redis://***@redis:6379/0"),
        ("http://host/a.png", "http://host/a.png"),
    ],
)
def test_redact_url_of_unchecked_text_hides_up_to_the_last_at_sign(text: str, shown: str):
    assert redact_url(text, checked=False) == shown


def test_redact_hides_every_url_in_a_text():
    text = "fetch(http://a:1@x/1.png, https://b:2@y/2.png) failed; mail me at a@example.com"

    assert redact(text) == "fetch(http://***@x/1.png, https://***@y/2.png) failed; mail me at a@example.com"


def test_redact_finds_credentials_in_a_repr_of_a_message():
    text = repr({"lines": [[1, "http://host", 0], [2, "http://user:it's@host/a.png", 0]]})

    assert "it's" not in redact(text)
    assert "http://***@host/a.png" in redact(text)


def test_a_log_call_whose_arguments_do_not_fit_its_format_shows_no_credentials(
    capsys: pytest.CaptureFixture[str],
):
    install_log_redaction()
    logger = logging.getLogger("image_crawler.test_redaction.unfit")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logger.warning("fetching %s", "http://alice:hunter2@host/a.jpg", "three")
    finally:
        logger.removeHandler(handler)

    assert "hunter2" not in capsys.readouterr().err


def test_log_records_are_redacted_messages_and_tracebacks_alike(caplog: pytest.LogCaptureFixture):
    install_log_redaction()
    logger = logging.getLogger("image_crawler.test_redaction")

    with caplog.at_level(logging.INFO):
        logger.info("fetching %s with %d%% done", "http://alice:hunter2@host/a.png", 50)
        try:
            raise RuntimeError("cannot open http://alice:hunter2@host/a.png")
        except RuntimeError:
            logger.exception("failed")

    assert "hunter2" not in caplog.text
    assert "fetching http://***@host/a.png with 50% done" in caplog.text
    assert "RuntimeError: cannot open http://***@host/a.png" in caplog.text
