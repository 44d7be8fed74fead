"""A real ``mlflow server`` on loopback for the tests that need tracking over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


def wait_until_answering(
    proc: subprocess.Popen, url: str, what: str, seconds: int, stop, hint: str = ""
) -> None:
    """Poll ``url``/health until it answers; fail clearly when ``proc`` exits first, or, after
    ``stop()``, when ``seconds`` pass."""
    deadline = time.time() + seconds
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited{hint}")
        if time.time() > deadline:
            stop()
            raise RuntimeError(f"{what} did not start in {seconds} s")
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen) -> None:
    """End a server started with ``start_new_session=True`` and its workers: SIGTERM to its
    process group, SIGKILL if it has not exited in 60 s."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


class MlflowServer:
    """A real ``mlflow server`` on loopback whose store outlives it: stopped and started again on
    the same port, it serves the same runs and registry."""

    def __init__(self, folder: Path, backend_store_uri: str | None = None) -> None:
        self.folder = folder
        self.backend_store_uri = backend_store_uri
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def store_args(self) -> list[str]:
        """An existing store (its runs keep their own artifact locations), or a new one in
        ``folder`` with artifacts served from beside it."""
        if self.backend_store_uri:
            return ["--backend-store-uri", self.backend_store_uri]
        return [
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *self.store_args(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends the workers with it
        )
        wait_until_answering(self.proc, self.url, "mlflow server", 120, self.stop)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None
        deadline = time.time() + 30
        while answers(self.url) and time.time() < deadline:
            time.sleep(0.2)
        assert not answers(self.url), "the mlflow server still answers after being stopped"
