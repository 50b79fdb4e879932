"""Test helper: a real ``redis-server`` process on a free 127.0.0.1 port.

Tests get a throwaway server that they can stop and restart on the same port
(outage tests). ``scripts/install-redis.sh`` installs the binary; without it
the tests that need a server are skipped with a message saying so.

    with RedisServer(persist=True) as server:
        store = make_state_store(server.url)
        server.stop()      # outage
        server.start()     # same port; data survives only with persist=True
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

_START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of ``redis-server``; skips the calling test if it is not installed."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip(
            "redis-server is not installed; run scripts/install-redis.sh "
            "(or `apt-get install redis-server`) to run the Redis state-store tests"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    """Whether a server on ``port`` answers PING with PONG (not LOADING or an error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` child process bound to 127.0.0.1.

    ``persist=False`` (the default) runs with ``--save "" --appendonly no``:
    nothing touches the disk and a restart starts empty. ``persist=True``
    keeps an append-only file (fsync always) in ``workdir``, so data written
    before :meth:`stop` is there after :meth:`start`. Without ``workdir`` a
    temporary directory is used and removed by :meth:`close`.
    """

    def __init__(
        self, workdir: Path | None = None, *, persist: bool = False, port: int | None = None
    ) -> None:
        self._binary = redis_server_binary()  # skip before making anything to clean up
        self._own_dir = workdir is None
        self._auto_port = port is None
        self._started_once = False
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else workdir
        self.persist = persist
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def _argv(self) -> list[str]:
        argv = [
            self._binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",  # stdout, captured into redis.log below
        ]  # fmt: skip
        if self.persist:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self._proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        # An auto-picked port can be taken between free_port() and the bind: pick
        # another, but only on the first start (a restart must keep its port).
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._start_once()
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        self._started_once = True

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "redis.log"
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not come up on 127.0.0.1:{self.port}; "
                    f"log ({log_path}):\n{log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a frozen server cannot handle SIGTERM
            # SIGTERM makes redis flush the append-only file before exiting.
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def freeze(self) -> None:
        """SIGSTOP the server: connections open but nothing answers (a network partition)."""
        assert self._proc is not None, "freeze() needs a running server"
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a server stopped by :meth:`freeze`."""
        assert self._proc is not None, "thaw() needs a running server"
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and remove its directory if this helper created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self) -> None:
        # Last resort if a test forgot to stop it: never leak a server process.
        with contextlib.suppress(Exception):
            self.close()
