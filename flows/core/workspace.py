"""The workspace: a git + DVC repository that holds releases, probe sets and run outputs.

Layout::

    <workspace>/
      releases/<name>/            a data release (tracked by DVC: releases/<name>.dvc)
      probes/probe_set.jsonl      the frozen probe set of the latest retrain (tracked by DVC)
      runs/<release>-<stamp>/     step outputs of one retrain (reports, candidate model)
      accuracy_matrix.json        R[i][j] across retrains
      mlflow.db                   the embedded MLflow store (unless tracking.uri says otherwise)
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

GITIGNORE = "runs/\nmlflow.db\nmlartifacts/\ncache/\n*.lock\n"


def quiet_env() -> None:
    """Keep every library offline and silent about telemetry."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_TERMINAL_PROMPT": "0",
    }.items():
        os.environ.setdefault(key, value)


def git(ws: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ws), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {ws}: {done.stderr.strip()}")
    return done.stdout.strip()


def dvc_repo(ws: Path):
    """The workspace's DVC repo (use as a context manager)."""
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(ws / "cache" / "dvc-site"))
    return Repo(str(ws))


def init_workspace(ws: Path, remote: str) -> Path:
    """Create the git + DVC repo once; point its default remote at ``remote`` and commit that."""
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
        git(ws, "config", "user.name", "forgetless")
        git(ws, "config", "user.email", "forgetless@localhost")
        (ws / ".gitignore").write_text(GITIGNORE)
    if not (ws / ".dvc").exists():
        from dvc.repo import Repo

        logging.getLogger("dvc").setLevel(logging.WARNING)
        Repo.init(str(ws)).close()
    with dvc_repo(ws) as repo, repo.config.edit() as conf:
        conf["remote"]["default"] = {"url": remote}
        conf["core"]["remote"] = "default"
        conf["core"]["analytics"] = False
    git(ws, "add", ".gitignore", ".dvc/config", ".dvc/.gitignore")
    if git(ws, "status", "--porcelain", "--", ".gitignore", ".dvc"):
        git(ws, "commit", "-q", "-m", f"Workspace: DVC remote {remote}")
    return ws
