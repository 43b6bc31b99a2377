"""Services the tests and the benchmarks start for themselves: redis-server and the mongo shim, on free ports.

One module for both, standard library only. The suite imports it as ``support.services``
(pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``); the benchmarks as
``tests.support.services`` (``python -m benchmarks.<name>`` from the repository root puts the
root on ``sys.path``, and ``tests/`` is a namespace package).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

#: The repository this checkout is.
REPO = Path(__file__).resolve().parents[2]
#: A MongoDB wire endpoint for machines without a MongoDB server (``--port P`` serves, ``--wait
#: P`` waits for it), named by ``$MONGO_SHIM`` (``.ci/run`` sets it); None when it is unset.
MONGO_SHIM = Path(os.environ["MONGO_SHIM"]) if os.environ.get("MONGO_SHIM") else None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers (a hung server), while in the block."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def _answers_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def _listening_sockets(port: int) -> set[str] | None:
    """``socket:[INODE]`` of each TCP socket listening on ``port`` (None: no /proc/net to read)."""
    found: set[str] = set()
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(table.exists() for table in tables):
        return None
    for table in tables:
        if table.exists():
            for row in table.read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.add(f"socket:[{fields[9]}]")
    return found


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a socket listening on ``port`` and the port accepts.

    Where there is no /proc (not Linux), whether the port accepts a connection at all.
    """
    sockets = _listening_sockets(port)
    if sockets is not None:
        try:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            return False
        if not sockets & held:
            return False
    return _accepts(port)


def _redis_pid(port: int) -> int | None:
    """The process id of the redis-server answering on ``port`` (None: no answer yet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"INFO server\r\n")
        reply = b""
        while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            reply += chunk
    for line in reply.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


#: Free ports are picked, then bound by the server started on them: another process may take
#: one in between. A server that cannot bind exits, and is started again on another port.
START_TRIES = 5


def _wait_until_serving(
    process: subprocess.Popen,
    port: int,
    what: str,
    *,
    timeout: float,
    ready: Callable[[int], bool] = _accepts,
) -> None:
    """Wait until ``ready(port)`` (by default: the port accepts a connection).

    Raises RuntimeError if ``process`` exits first, or kills it and raises after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            if ready(port):
                return
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{what} did not start on port {port} within {timeout:g} s")


def start_redis(
    directory: Path, *, appendonly: bool = False, port: int | None = None, new_session: bool = False
) -> tuple[subprocess.Popen, str]:
    """Start a redis-server on a free port (or ``port``) in ``directory``; returns the process and its URL.

    Nothing is saved unless ``appendonly``; its log is ``directory/redis.log``. ``new_session``
    gives it a process group of its own (to be stopped by that group, as the benchmarks do).
    A free port taken by another process before the server binds it is not raced: the server
    started is the one that answers (its process id says so), or it is started again elsewhere.
    """
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    for attempt in range(1 if port else START_TRIES):
        chosen = port or free_port()
        args = [
            "redis-server",
            "--port",
            str(chosen),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
        ]
        args += ["--appendonly", "yes" if appendonly else "no", "--logfile", str(directory / "redis.log")]
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=new_session
        )
        try:
            _wait_until_serving(
                process,
                chosen,
                "redis-server",
                timeout=10,
                ready=lambda p, pid=process.pid: _redis_pid(p) == pid,
            )
        except RuntimeError:
            if process.poll() is None or port or attempt == START_TRIES - 1:
                raise
            continue  # it could not bind the port: someone took it first
        return process, f"redis://127.0.0.1:{chosen}/0"
    raise AssertionError("unreachable")


def start_mongo_shim(directory: Path) -> tuple[subprocess.Popen, str]:
    """The mongo shim (``$MONGO_SHIM``) on a free port, in a process group of its own: it and its URI.

    It logs to ``directory/mongo-shim.log``. A free port taken by another process before the shim
    binds it is not raced: the shim is ready once it holds the listening socket itself (the
    script ``exec``s its Python, which keeps the process id), or it exits and is started again.
    """
    if MONGO_SHIM is None or not MONGO_SHIM.exists():
        named = os.environ.get("MONGO_SHIM", "unset")
        raise RuntimeError(f"no MONGO_URI set, and MONGO_SHIM ({named!r}) names no mongo shim")
    for attempt in range(START_TRIES):
        port = free_port()
        with open(directory / "mongo-shim.log", "ab") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                [str(MONGO_SHIM), "--port", str(port)], start_new_session=True, stdout=log, stderr=log
            )
        try:
            # The first start makes the shim's virtualenv: minutes, on a fresh machine.
            _wait_until_serving(
                process, port, "mongo-shim", timeout=300, ready=lambda p, pid=process.pid: _listens(pid, p)
            )
        except RuntimeError:
            if process.poll() is None or attempt == START_TRIES - 1:
                raise
            continue  # it could not bind the port: someone took it first
        return process, f"mongodb://127.0.0.1:{port}"
    raise AssertionError("unreachable")


def mongo_endpoint(directory: Path) -> tuple[subprocess.Popen | None, str]:
    """``MONGO_URI`` when it is set (and no process), else a mongo shim started in ``directory``."""
    uri = os.environ.get("MONGO_URI")
    if uri:
        return None, uri
    return start_mongo_shim(directory)


def database_uri(uri: str, database: str) -> str:
    """``uri`` (``mongodb://…``) naming ``database`` instead of the database it names, if any."""
    return urlunsplit(urlsplit(uri)._replace(path=f"/{database}"))


def stop_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop ``process`` (started with ``start_new_session``) with SIGTERM, then SIGKILL its whole group.

    Only the leader gets SIGTERM: the dramatiq CLI forwards it to its workers itself, and a worker
    that receives a second one exits at once, skipping its shutdown hooks.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Children that outlived their leader (none expected) go with the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
