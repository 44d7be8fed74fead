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
        deadline = time.time() + 120
        while not answers(self.url):
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not start in 120 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc = None
        deadline = time.time() + 30
        while answers(self.url) and time.time() < deadline:
            time.sleep(0.2)
        assert not answers(self.url), "the mlflow server still answers after being stopped"
