"""Host names that resolve to public-looking addresses, answered from local servers: no packet leaves.

The fetcher's network backend (``fetching._CheckedBackend``) resolves a name once, through
``socket.getaddrinfo`` (``fetching._resolve``), checks every address, and connects to the
checked address through httpcore's ``socket.create_connection``. :class:`FakeNetwork` patches
those two functions of the ``socket`` module only:

- ``getaddrinfo`` answers the names given to :meth:`FakeNetwork.name` (counting lookups) and
  leaves every other name and address (Redis at 127.0.0.1…) to the real resolver;
- ``create_connection`` forwards a connection to a stand-in public address and port given to
  :meth:`FakeNetwork.forward` to a local port, lets loopback through, and refuses every other
  address: a test that would connect to the real internet fails instead.

The address policy is not patched: what it is given to check is what the real resolver
would have returned for such a name. Thread-safe (a pipeline's download threads share it).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

__all__ = ["PUBLIC_STAND_IN", "FakeNetwork"]

#: A public address (example.com's, once) that stands in for "somewhere on the internet".
PUBLIC_STAND_IN = "93.184.216.34"


class FakeNetwork:
    """Answers for names, connections forwarded to local ports, and a record of both."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, list[str]] = {}
        self._forward: dict[tuple[str, int], int] = {}
        self._lookups: dict[str, int] = {}
        self._connected: list[tuple[str, int]] = []
        self._getaddrinfo = socket.getaddrinfo
        self._create_connection = socket.create_connection
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", self.create_connection)

    def name(self, host: str, addresses: list[str]) -> None:
        """Resolve ``host`` to ``addresses``."""
        with self._lock:
            self._answers[host] = list(addresses)

    def forward(self, address: str, port: int, to_port: int) -> None:
        """Send connections to ``address:port`` to ``127.0.0.1:to_port``."""
        with self._lock:
            self._forward[(address, port)] = to_port

    def lookups(self, host: str) -> int:
        """How many times ``host`` was resolved through the fake answers."""
        with self._lock:
            return self._lookups.get(host, 0)

    def connected(self) -> list[tuple[str, int]]:
        """Every ``(address, port)`` a connection was asked for, loopback included, in order."""
        with self._lock:
            return list(self._connected)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        with self._lock:
            addresses = self._answers.get(name)
            if addresses is not None:
                self._lookups[name] = self._lookups.get(name, 0) + 1
        if addresses is None:
            return self._getaddrinfo(host, port, *args, **kwargs)
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, int(port or 0)),
            )
            for address in addresses
        ]

    def create_connection(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address[0], int(address[1])
        for info in self.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            ip = str(info[4][0])
            with self._lock:
                self._connected.append((ip, port))
                to_port = self._forward.get((ip, port))
            if to_port is not None:
                return self._create_connection(("127.0.0.1", to_port), *args, **kwargs)
            if ip.startswith("127.") or ip == "::1":
                return self._create_connection((ip, port), *args, **kwargs)
        raise ConnectionRefusedError(111, "no packet leaves this test")
