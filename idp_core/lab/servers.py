"""Server processes for benchmarks and tests: `python -m server` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from idp_core.paths import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll `url`/health until it answers 200; RuntimeError if `proc` exits first,
    TimeoutError after `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy within {timeout_s} s")


class ServerProcess:
    """`python -m server ARGS` in a subprocess; waits for /health, stops with SIGTERM.

    Usable as a context manager. The server logs to a temporary file (a file, not a pipe: an
    unread pipe fills up and blocks the server's logging), kept afterwards if `keep_log`.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
                 timeout_s: float = 120.0, keep_log: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "server", "--port", str(self.port), *args]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="idp-server-", suffix=".log",
                                               delete=not keep_log)
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO)
        if wait_ready:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            wait_healthy(self.proc, self.url, timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (log {self.log.name}):\n{self.output()}") from None
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log_text(self) -> str:
        """What the server has logged so far (it keeps running)."""
        return Path(self.log.name).read_text()

    def output(self) -> str:
        """Everything the server logged (stops it first)."""
        self.stop()
        return Path(self.log.name).read_text()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(60.0)
