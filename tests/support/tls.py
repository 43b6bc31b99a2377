"""Self-signed certificates for local HTTPS servers (``LocalHttpServer(ssl_context=...)``).

Made with the ``openssl`` command (the ``cryptography`` package is not a dependency), in a
directory the caller owns, valid for a day for the names and addresses given.
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.skips import unavailable

__all__ = ["SelfSigned", "self_signed"]


@dataclass(frozen=True)
class SelfSigned:
    """A self-signed certificate and its key, as PEM files."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that trusts this certificate, and only it."""
        return ssl.create_default_context(cafile=str(self.cert))


def _subject_alt_name(names: tuple[str, ...]) -> str:
    entries = []
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            entries.append(f"DNS:{name}")
        else:
            entries.append(f"IP:{name}")
    return "subjectAltName=" + ",".join(entries)


def self_signed(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> SelfSigned:
    """A certificate for ``names`` (host names or IP addresses) signed by its own key, in ``directory``.

    Skips the test when ``openssl`` is not installed (fails it under ``CI=true``).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not on PATH (apt-get install openssl): no certificate for the TLS tests")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={names[0]}",
            "-addext",
            _subject_alt_name(names),
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return SelfSigned(cert, key)
