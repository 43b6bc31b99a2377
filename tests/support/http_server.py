"""A threaded HTTP/1.1 server on 127.0.0.1 serving canned responses, for tests.

Routes are filled at runtime; each path answers with its responses in turn (the last one
repeats), and counts its requests::

    with LocalHttpServer() as server:
        server.add("/cat.png", body=png_bytes, content_type="image/png")
        server.add_sequence("/flaky.png", [Response(status=503), Response(body=png_bytes)])
        server.add_redirect("/old.png", "/cat.png")
        download(server.url("/cat.png"))
        assert server.hits("/cat.png") == 1

Routes match the path only: ``/cat.png?1`` and ``/cat.png?2`` are the same route (two URLs,
one image). Unknown paths answer 404.

With ``ssl_context`` (a server-side :class:`ssl.SSLContext`, e.g. from ``support.tls``) it
serves HTTPS: each connection's TLS handshake runs in its own handler thread, and one that
fails (the client refused the certificate) is counted by :meth:`LocalHttpServer.tls_failures`.
"""

from __future__ import annotations

import gzip as gzip_module
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LocalHttpServer", "Response"]

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Response:
    """One canned answer.

    :param delay: seconds to hang before answering (ends early when the server stops).
    :param drip: seconds to wait between body bytes, sent one at a time.
    :param gzip: serve ``body`` gzip-compressed, with ``Content-Encoding: gzip``.
    :param chunked: ``Transfer-Encoding: chunked`` instead of ``Content-Length``.
    :param abort: close the connection without answering.
    """

    body: bytes = b""
    status: int = 200
    content_type: str | None = "application/octet-stream"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drip: float = 0.0
    gzip: bool = False
    chunked: bool = False
    abort: bool = False


_NOT_FOUND = Response(body=b"not found", status=404, content_type="text/plain")


@dataclass
class _Route:
    responses: Sequence[Response]
    served: int = 0

    def next_response(self) -> Response:
        response = self.responses[min(self.served, len(self.responses) - 1)]
        self.served += 1
        return response


class LocalHttpServer:
    """Serves routes on ``127.0.0.1`` and a free port, from daemon threads; a context manager."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._hits: Counter[str] = Counter()
        self._authorizations: dict[str, list[str | None]] = {}
        self._headers: dict[str, list[list[tuple[str, str]]]] = {}
        self._tls_failures = 0
        self._connections = 0
        self.scheme = "http" if ssl_context is None else "https"
        self._requests: list[tuple[float, str, str, str | None]] = []  # (time, Host, path, User-Agent)
        self._in_flight: Counter[str] = Counter()
        self._most_in_flight: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._httpd.ssl_context = ssl_context
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._httpd.server_address[1])

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` on this server."""
        return f"{self.scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(
        self,
        path: str,
        body: bytes = b"",
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = "application/octet-stream",
        **options: Any,
    ) -> None:
        """Answer ``path`` with one response; ``options`` are the other :class:`Response` fields."""
        response = Response(body, status, content_type, dict(headers or {}), **options)
        self.add_sequence(path, [response])

    def add_redirect(self, path: str, to: str, status: int = 302) -> None:
        """Redirect ``path`` to ``to`` (absolute URL or path, sent as is in ``Location``)."""
        self.add(path, status=status, headers={"Location": to}, content_type=None)

    def add_sequence(self, path: str, responses: Sequence[Response]) -> None:
        """Answer the n-th request to ``path`` with ``responses[n]``; the last one repeats."""
        if not responses:
            raise ValueError("a route needs at least one response")
        with self._lock:
            self._routes[path] = _Route([_prepared(response) for response in responses])

    def hits(self, path: str) -> int:
        """How many requests ``path`` received (query strings ignored)."""
        with self._lock:
            return self._hits[path]

    def authorizations(self, path: str) -> list[str | None]:
        """The ``Authorization`` header of each request ``path`` received (None: none sent)."""
        with self._lock:
            return list(self._authorizations.get(path, []))

    def header_values(self, path: str, name: str) -> list[str | None]:
        """The ``name`` header of each request ``path`` received (None: not sent; repeats joined by ", ")."""
        with self._lock:
            received = list(self._headers.get(path, []))
        wanted = name.lower()
        values = []
        for headers in received:
            found = [value for key, value in headers if key.lower() == wanted]
            values.append(", ".join(found) if found else None)
        return values

    def connections(self) -> int:
        """How many TCP connections the server accepted (a request needs one; keep-alive reuses it)."""
        with self._lock:
            return self._connections

    def tls_failures(self) -> int:
        """How many connections failed their TLS handshake (with ``ssl_context``)."""
        with self._lock:
            return self._tls_failures

    def requests(self) -> list[tuple[float, str, str, str | None]]:
        """Every request so far: ``(time.monotonic() it arrived, Host header, path, User-Agent)``."""
        with self._lock:
            return list(self._requests)

    def most_in_flight(self, host: str) -> int:
        """The most requests with this ``Host`` header that were being answered at once."""
        with self._lock:
            return self._most_in_flight[host]

    def start(self) -> LocalHttpServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hanging and dripping handlers, and close the socket."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> LocalHttpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _next_response(self, path: str) -> Response:
        with self._lock:
            self._hits[path] += 1
            route = self._routes.get(path)
            return route.next_response() if route else _NOT_FOUND

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if the server is stopping meanwhile."""
        return self._stopping.wait(seconds)


def _prepared(response: Response) -> Response:
    """Compress a ``gzip`` response once, when its route is added."""
    if not response.gzip:
        return response
    headers = {**response.headers, "Content-Encoding": "gzip"}
    return replace(response, body=gzip_module.compress(response.body, mtime=0), headers=headers, gzip=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many workers connecting at once
    owner: LocalHttpServer
    ssl_context: ssl.SSLContext | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.owner._lock:
            self.owner._connections += 1
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        # In the handler's thread, not in accept(): a client that never finishes its handshake
        # must not hold up the others.
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: the client refused the certificate, or hung up
            with self.owner._lock:
                self.owner._tls_failures += 1
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            self.shutdown_request(tls)  # ``request`` is detached into ``tls``: close this one

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (timeouts, aborted downloads) is expected here, not worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, *, send_body: bool) -> None:
        owner = self.server.owner
        host = self.headers.get("Host", "")
        with owner._lock:
            owner._in_flight[host] += 1
            owner._most_in_flight[host] = max(owner._most_in_flight[host], owner._in_flight[host])
        try:
            self._answer_in_flight(send_body=send_body, host=host)
        finally:
            with owner._lock:
                owner._in_flight[host] -= 1

    def _answer_in_flight(self, *, send_body: bool, host: str) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        with owner._lock:
            owner._authorizations.setdefault(path, []).append(self.headers.get("Authorization"))
            owner._headers.setdefault(path, []).append(list(self.headers.items()))
            owner._requests.append((time.monotonic(), host, path, self.headers.get("User-Agent")))
        response = owner._next_response(path)
        if (response.delay and owner._wait(response.delay)) or response.abort:
            self.close_connection = True
            return
        self.send_response(response.status)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if send_body:
            try:
                self._send_body(response)
            except OSError:  # the client went away
                self.close_connection = True

    def _send_body(self, response: Response) -> None:
        body = response.body
        if response.chunked:
            for start in range(0, len(body), _CHUNK):
                chunk = body[start : start + _CHUNK]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif response.drip:
            for index in range(len(body)):
                if index and self.server.owner._wait(response.drip):
                    self.close_connection = True
                    return
                self.wfile.write(body[index : index + 1])
        else:
            self.wfile.write(body)
