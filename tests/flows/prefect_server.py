"""A real ``prefect server`` on loopback, its home and database in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.flows.mlflow_server import free_port, stop_group, wait_until_answering


class PrefectServer:
    """``prefect server start`` on a free loopback port; ``url`` is its API (``.../api``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.log = folder / "server.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        return env | {
            "PREFECT_HOME": str(self.folder),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                f"sqlite+aiosqlite:///{self.folder / 'prefect.db'}"
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-ui",
                ],
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # its own process group: stop() ends its children with it
            )
        wait_until_answering(  # GET {url}/health
            self.proc, self.url, "prefect server", 180, self.stop, hint=f": see {self.log}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None
