"""Step 1, version: copy a release into the workspace, track it with DVC, commit, push.

The release's content hash (DVC's md5 of the folder) and the workspace commit are recorded, so
every model version names exactly the data it was trained on.

Retry policy for the DVC remote: a push that fails is tried again after each of
``PUSH_RETRY_DELAYS`` (2, 4, 8 s: four attempts over about 14 s), then the step fails with
``RemoteUnavailable``, naming the remote and what to do. The data is not lost: it is already
tracked and committed in the workspace (and in its DVC cache); only the copy in the remote is
missing, and the next push (a rerun, or ``dvc push`` in the workspace) sends it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from flows.core.data import RELEASE_FILES, DataError, links_outside
from flows.core.files import check_regular
from flows.core.records import VersionedRelease
from flows.core.workspace import dvc_repo, git, init_workspace

PUSH_RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before each further push attempt


class RemoteUnavailable(ConnectionError):
    """The DVC remote cannot be reached or written; the data stays in the workspace."""


class _Errors(logging.Handler):
    """Collects the error lines DVC logs while pushing (its exception only counts files)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.lines.append(f"{type(exc).__name__}: {exc}" if exc else record.getMessage())


def push(repo, ws: Path, what: str) -> None:
    """``dvc push`` with the retry policy above; ``what`` names the data for the message."""
    try:
        remote = repo.config["remote"][repo.config["core"]["remote"]]["url"]
    except KeyError:
        remote = "(none configured)"
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("dvc", "dvc_data", "dvc_objects")]
    for log in loggers:
        log.addHandler(errors)
    start = time.monotonic()
    try:
        for delay in (*PUSH_RETRY_DELAYS, None):
            errors.lines.clear()
            try:
                repo.push()
                return
            except Exception as exc:  # DVC raises UploadError, OSError, fsspec errors, ...
                problem = "; ".join(dict.fromkeys(errors.lines)) or f"{type(exc).__name__}: {exc}"
                last = exc
            if delay is not None:
                time.sleep(delay)
    finally:
        for log in loggers:
            log.removeHandler(errors)
    raise RemoteUnavailable(
        f"DVC remote {remote} cannot be written ({problem}; {len(PUSH_RETRY_DELAYS) + 1} "
        f"attempts over {time.monotonic() - start:.0f} s); {what} is kept in the workspace "
        f"{ws}, tracked and committed, but not pushed — make the remote reachable and writable "
        "or fix versioning.remote in params.yaml, then run again (or `dvc push` in the "
        "workspace)"
    ) from last


def same_files(a: Path, b: Path) -> bool:
    """Whether two folders hold the same file names with the same bytes."""
    names = sorted(f.name for f in a.iterdir() if f.is_file())
    if names != sorted(f.name for f in b.iterdir() if f.is_file()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def version_release(
    release_dir: Path, ws: Path, remote: str, learned: Sequence[str] = ()
) -> VersionedRelease:
    """Copy the release into the workspace, ``dvc add``, commit and push. Refused before anything
    is written: a folder without its splits, a symbolic link leading out of it (the copy would
    follow it), and other content under the name of a release the champion has ``learned``
    (its workspace copy is what the probes read; a name is used once)."""
    release_dir = Path(release_dir).resolve()
    if not release_dir.is_dir():
        what = "does not exist" if not release_dir.exists() else "is not a folder"
        raise DataError(
            release_dir, None, f"{what} (a release is a folder with {' and '.join(RELEASE_FILES)})"
        )
    missing = [f for f in RELEASE_FILES if not os.path.lexists(release_dir / f)]
    if missing:
        raise DataError(
            release_dir,
            None,
            f"not a release folder, missing {', '.join(missing)} "
            f"(a release is a folder with {' and '.join(RELEASE_FILES)})",
        )
    for f in RELEASE_FILES:
        check_regular(release_dir / f)  # a pipe or device is named before anything is copied
    leaving = links_outside(release_dir)
    if leaving:
        raise DataError(leaving[0].file, None, f"{leaving[0].rule} ({leaving[0].detail})")
    name = release_dir.name
    target = ws / "releases" / name
    if (
        name in learned
        and target.is_dir()
        and target.resolve() != release_dir
        and not same_files(target, release_dir)
    ):
        raise DataError(
            release_dir,
            None,
            f"the champion has already learned a release named {name!r} with other content; "
            "a release name is used once: give the new release a new name",
        )
    init_workspace(ws, remote)
    if target.resolve() != release_dir:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for f in release_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, target / f.name)
    with dvc_repo(ws) as repo:
        repo.add(str(target))
        dvc_file = target.with_name(f"{name}.dvc")
        git(ws, "add", str(dvc_file.relative_to(ws)), "releases/.gitignore")
        if git(ws, "status", "--porcelain", "--", "releases"):
            git(ws, "commit", "-q", "-m", f"Release {name}")
        push(repo, ws, f"release {name} ({target.relative_to(ws)})")
    dvc_hash = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    return VersionedRelease(
        name=name,
        path=target,
        dvc_hash=dvc_hash,
        git_commit=git(ws, "log", "-1", "--format=%H", "--", str(dvc_file.relative_to(ws))),
        remote=remote,
    )


def track_file(path: Path, ws: Path, message: str) -> str:
    """Track one workspace file with DVC (e.g. the probe set), commit and push; its md5."""
    with dvc_repo(ws) as repo:
        repo.add(str(path))
        dvc_file = path.with_name(path.name + ".dvc")
        git(
            ws,
            "add",
            str(dvc_file.relative_to(ws)),
            str((path.parent / ".gitignore").relative_to(ws)),
        )
        if git(ws, "status", "--porcelain", "--", str(path.parent.relative_to(ws))):
            git(ws, "commit", "-q", "-m", message)
        push(repo, ws, str(path.relative_to(ws)))
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
