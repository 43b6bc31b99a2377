"""A tiny, slow image host for tests/test_compose_up.py, run by the `images` service of override.yml.

Serves the files of ``--root`` (read-only) over HTTP on ``--port``, waiting ``--delay`` seconds
before answering each request, so that a crawl of a few hundred URLs lasts long enough to scale
the workers while it runs. Each request is logged on stdout as ``ADDRESS METHOD PATH STATUS``:
the test reads the workers' addresses from it. ``/healthz`` answers at once (the healthcheck).
Standard library only: it runs on the plain ``python`` image.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import signal
import sys
import time


class Handler(http.server.SimpleHTTPRequestHandler):
    delay = 0.0

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        time.sleep(self.delay)
        super().do_GET()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.path != "/healthz":
            sys.stdout.write(f"{self.client_address[0]} {self.command} {self.path} {code}\n")
            sys.stdout.flush()

    def log_message(self, format: str, *args: object) -> None:  # errors only; requests above
        sys.stderr.write(f"{self.client_address[0]} {format % args}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay", type=float, default=0.0)
    options = parser.parse_args()
    Handler.delay = options.delay
    handler = functools.partial(Handler, directory=options.root)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", options.port), handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `docker compose stop`: exit 0 at once
    print(f"serving {options.root} on port {options.port}, {options.delay} s a request", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
