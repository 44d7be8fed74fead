import shutil

import pytest

from flows.core.data import DataError
from flows.core.workspace import git
from flows.steps.version import version_release


def test_versioning_records_hash_commit_and_pushes(tmp_path, demo_dir):
    release = tmp_path / "rel-a"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    ws, remote = tmp_path / "ws", str(tmp_path / "remote")

    first = version_release(release, ws, remote)
    assert first.dvc_hash.endswith(".dir") and first.git_commit == git(ws, "rev-parse", "HEAD")
    assert (ws / "releases" / "rel-a.dvc").exists()
    assert "releases/rel-a.dvc" in git(ws, "ls-files")
    assert "rel-a/" not in git(ws, "ls-files")  # the data itself is in DVC, not git
    pushed = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    assert len(pushed) >= 3  # the directory listing plus both files

    again = version_release(release, ws, remote)
    assert again.dvc_hash == first.dvc_hash and again.git_commit == first.git_commit

    with open(release / "train.jsonl", "a") as f:
        f.write('{"id": "new", "prompt": "p", "completion": "c"}\n')
    changed = version_release(release, ws, remote)
    assert changed.dvc_hash != first.dvc_hash and changed.git_commit != first.git_commit


def test_a_folder_without_release_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"missing train.jsonl, eval.jsonl"):
        version_release(tmp_path / "empty", tmp_path / "ws", str(tmp_path / "remote"))
