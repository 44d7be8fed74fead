"""Step 1, version: copy a release into the workspace, track it with DVC, commit, push.

The release's content hash (DVC's md5 of the folder) and the workspace commit are recorded, so
every model version names exactly the data it was trained on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.data import RELEASE_FILES, DataError
from flows.records import VersionedRelease
from flows.workspace import dvc_repo, git, init_workspace


def version_release(release_dir: Path, ws: Path, remote: str) -> VersionedRelease:
    release_dir = Path(release_dir).resolve()
    missing = [f for f in RELEASE_FILES if not (release_dir / f).is_file()]
    if missing:
        raise DataError(
            release_dir,
            None,
            f"not a release folder, missing {', '.join(missing)} "
            f"(a release is a folder with {' and '.join(RELEASE_FILES)})",
        )
    init_workspace(ws, remote)
    name = release_dir.name
    target = ws / "releases" / name
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
        repo.push()
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
        repo.push()
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
