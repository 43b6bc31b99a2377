"""A small, fast HTTP/1.1 image server for the benchmark, run as its own process.

``tests/support/http_server.py`` (``http.server``, a thread per connection) is built for canned
test responses; this one only serves files from memory, on asyncio with keep-alive, so that it
costs the machine as little as possible per request (see ``--compare-servers`` in pipeline.py).
Both sides of the benchmark download from the same server, so they pay the same for it.

    python -m benchmarks.server DIRECTORY   # prints "port <n>" once listening, serves until killed
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import signal
import sys
from pathlib import Path

_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"


def load(directory: Path) -> dict[bytes, bytes]:
    """Every file of ``directory`` as a complete HTTP response, keyed by its URL path."""
    responses = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        responses[f"/{path.name}".encode()] = head.encode() + body
    return responses


class _Http(asyncio.Protocol):
    """GET requests on a keep-alive connection, answered in order; request bodies are not supported."""

    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self.responses = responses
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            request_line = head.split(b"\r\n", 1)[0].split(b" ")
            path = request_line[1].split(b"?", 1)[0] if len(request_line) > 1 else b""
            assert self.transport is not None
            self.transport.write(self.responses.get(path, _NOT_FOUND))
            if b"\r\nconnection: close" in head.lower():
                self.transport.close()
                return


async def serve(directory: Path, port: int) -> None:
    """Serve ``directory`` on 127.0.0.1:``port`` (0: a free one) until SIGTERM or SIGINT."""
    responses = load(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(responses), "127.0.0.1", port, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.directory, args.port))


if __name__ == "__main__":
    sys.exit(main())
