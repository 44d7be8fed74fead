"""Landing releases on the tiny model with real Prefect, MLflow (SQLite), git + DVC and Great
Expectations: ``forgetless submit`` validates and lands a release once per content hash and
emits ``forgetless.release.landed``; a retrain with no release trains the oldest landed release
not processed yet (by hash), and completes with "no new release" when there is none; a local
folder and fsspec's ``memory://`` filesystem behave alike."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from fsspec.core import url_to_fs
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter

from flows.core.config import load_params
from flows.core.data import DataError
from flows.drivers.retrain import retrain
from flows.production.landing import (
    EVENT,
    LEDGER,
    MARKER,
    LandingError,
    NoNewRelease,
    landed_releases,
    read_ledger,
    submit,
)
from flows.steps.validate import release_content_hash
from tests.conftest import count, write_params
from tests.flows.conftest import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def versions(params_file: Path) -> list:
    uri = load_params(params_file).tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client.search_model_versions("name='forgetless-lm'")


def landed_events(content_hash: str, timeout: float = 60.0) -> list:
    """The ``forgetless.release.landed`` events about ``content_hash`` the Prefect API stored
    (its event persister writes them in batches, every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:  # the API refuses a limit above 50
            page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50)
        found = [
            e for e in page.events if e.resource.get("forgetless.release.hash") == content_hash
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_submit_validates_and_lands_once(tmp_path, tiny_model_dir, demo_dir):
    landing = tmp_path / "landing"
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir, data={"landing": str(landing)})
    source = demo_dir / "releases" / "wiki-topics-1"

    # A malformed release is refused with the message of `forgetless validate`; nothing lands.
    bad = tmp_path / "bad" / "my-release"
    shutil.copytree(source, bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"id": "broken", "prompt": "Which topic?"})  # no completion
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out = run_cli(params_file, "submit", str(bad))
    count("bad input", "malformed release through forgetless submit")
    assert code == 1
    assert f"{bad / 'train.jsonl'}:7 (record 'broken')" in out
    assert "a completion (or final assistant message) is required" in out
    assert not landing.exists() or not any(landing.iterdir()), "a refused release landed"

    # A name that cannot be part of a URL is refused before anything is read.
    spaced = tmp_path / "bad" / "my release"
    shutil.copytree(source, spaced)
    code, out = run_cli(params_file, "submit", str(spaced))
    count("bad input", "release name with a space through forgetless submit")
    assert code == 2 and "a release name must be" in out and "'my release'" in out
    assert not landing.exists() or not any(landing.iterdir())

    # A valid release lands whole under a name with its content hash, with the marker.
    content_hash = release_content_hash(source)
    code, out = run_cli(params_file, "submit", str(source))
    assert code == 0 and "landed wiki-topics-1" in out and content_hash in out, out
    event_id = re.search(r"event ([0-9a-f-]{36})", out).group(1)
    (folder,) = landing.iterdir()  # no temporary folder left behind
    assert folder.name == f"wiki-topics-1--{content_hash[:16]}"
    assert sorted(f.name for f in folder.iterdir()) == [MARKER, "eval.jsonl", "train.jsonl"]
    for name in ("train.jsonl", "eval.jsonl"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    marker = json.loads((folder / MARKER).read_text())
    assert marker["name"] == "wiki-topics-1" and marker["hash"] == content_hash

    # The same content again, under its name or another: landed once, and said so.
    again = tmp_path / "again" / "wiki-topics-1-again"
    shutil.copytree(source, again)
    for path in (source, again):
        code, out = run_cli(params_file, "submit", str(path))
        assert code == 0 and "already landed" in out and content_hash in out, out
        assert "event" not in out  # nothing landed: no event
    assert list(landing.iterdir()) == [folder]
    assert [r.name for r in landed_releases(str(landing))] == ["wiki-topics-1"]

    # One forgetless.release.landed event, read back from the Prefect API, with both labels.
    events = landed_events(content_hash)
    assert [str(e.id) for e in events] == [event_id]
    (event,) = events
    assert event.resource.id == f"forgetless.release.{content_hash}"
    assert event.resource["forgetless.release.name"] == "wiki-topics-1"
    assert event.resource["forgetless.release.hash"] == content_hash
    assert event.payload["uri"] == str(folder)


def test_scheduled_runs_take_landed_releases_oldest_first_once_per_content(
    tmp_path, tiny_model_dir, demo_dir
):
    landing = tmp_path / "landing"
    params_file = write_params(
        tmp_path,
        tiny_model_dir,
        demo_dir,
        data={"landing": str(landing)},
        train={"max_steps": 8},  # what is learned does not matter here, only what is trained
        gate={"min_retention": 0.0, "min_new_task_score": 0.0, "beat_champion": False},
    )
    params = load_params(params_file)
    ws = tmp_path / "workspace"
    one = submit(params, demo_dir / "releases" / "wiki-topics-1").release
    two = submit(params, demo_dir / "releases" / "wiki-topics-2").release

    first = retrain(params_file=str(params_file))
    assert first.release == "wiki-topics-1" and first.gate.passed, first.gate.reasons
    failed = retrain(
        params_file=str(params_file), overrides={"gate.min_new_task_score": 1.0}
    )  # out of reach
    assert failed.release == "wiki-topics-2" and not failed.gate.passed
    ledger = read_ledger(ws)
    assert [(e.release, e.hash, e.decision, e.version) for e in ledger] == [
        ("wiki-topics-1", one.hash, "passed", first.registration.version),
        ("wiki-topics-2", two.hash, "failed", failed.registration.version),
    ]
    assert ledger[0].run_dir == str(first.run_dir) and ledger[0].landed_as == one.uri
    log = subprocess.run(
        ["git", "-C", str(ws), "log", "--format=%s", "--", LEDGER], capture_output=True, text=True
    ).stdout.splitlines()
    assert log == [
        f"Landing ledger: wiki-topics-2 {two.hash[:12]} failed",
        f"Landing ledger: wiki-topics-1 {one.hash[:12]} passed",
    ]

    # Both processed, the failed one too: a completed flow run that trains nothing.
    state = retrain(params_file=str(params_file), return_state=True)
    assert state.is_completed()
    nothing = state.result()
    assert isinstance(nothing, NoNewRelease) and nothing.landed == 2
    assert nothing.message.startswith("no new release")
    code, out = run_cli(params_file, "run")
    assert code == 0 and "no new release" in out
    assert len(versions(params_file)) == 2
    assert len(read_ledger(ws)) == 2

    # The same content under another name (the first landing cleaned up): landed, not trained.
    shutil.rmtree(two.uri)
    resent = tmp_path / "resent" / "wiki-topics-2-resent"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-2", resent)
    assert submit(params, resent).new
    assert isinstance(retrain(params_file=str(params_file)), NoNewRelease)
    assert len(versions(params_file)) == 2

    # Other content under a learned name passes validation but the version step refuses it:
    # recorded as rejected, so the next tick moves on; on demand it is still tried.
    impostor = tmp_path / "other" / "wiki-topics-1"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-2", impostor)
    lines = (impostor / "train.jsonl").read_text().splitlines()
    (impostor / "train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert submit(params, impostor).new
    with pytest.raises(DataError, match="already learned a release named 'wiki-topics-1'"):
        retrain(params_file=str(params_file))
    count("bad input", "landed release under a learned name with other content")
    last = read_ledger(ws)[-1]
    assert last.decision == "rejected" and last.hash == release_content_hash(impostor)
    assert "already learned a release named 'wiki-topics-1'" in last.reason
    assert isinstance(retrain(params_file=str(params_file)), NoNewRelease)
    with pytest.raises(DataError, match="already learned"):
        retrain(params_file=str(params_file), release=str(impostor))
    assert len(versions(params_file)) == 2


def test_a_memory_landing_zone_works_like_a_folder(tmp_path, tiny_model_dir, demo_dir):
    url = f"memory://forgetless-{uuid.uuid4().hex[:8]}/landing"
    params_file = write_params(
        tmp_path,
        tiny_model_dir,
        demo_dir,
        data={"landing": url},
        train={"max_steps": 4},
        gate={"min_retention": 0.0, "min_new_task_score": 0.0, "beat_champion": False},
    )
    params = load_params(params_file)
    fs, root = url_to_fs(url)
    try:
        # Landed in the reverse of name order; an upload without its marker is not landed.
        two = submit(params, demo_dir / "releases" / "wiki-topics-2")
        one = submit(params, demo_dir / "releases" / "wiki-topics-1")
        assert two.new and one.new and two.release.uri.startswith(url)
        assert fs.exists(f"{root}/wiki-topics-2--{two.release.hash[:16]}/{MARKER}")
        fs.pipe_file(f"{root}/partial--0000/train.jsonl", b'{"id": 1}\n')
        assert [r.name for r in landed_releases(url)] == ["wiki-topics-2", "wiki-topics-1"]
        assert not submit(params, demo_dir / "releases" / "wiki-topics-2").new

        summary = retrain(params_file=str(params_file))
        assert summary.release == "wiki-topics-2"  # the oldest landing, not the first name
        (entry,) = read_ledger(tmp_path / "workspace")
        assert entry.hash == two.release.hash and entry.landed_as == two.release.uri

        # A landed release whose files changed after landing is refused and recorded.
        train = f"{one.release.uri}/train.jsonl"
        fs.pipe_file(train, b"".join(fs.cat_file(train).splitlines(keepends=True)[1:]))
        with pytest.raises(LandingError, match="content hash is"):
            retrain(params_file=str(params_file))
        count("bad input", "landed release changed after landing (memory://)")
        last = read_ledger(tmp_path / "workspace")[-1]
        assert last.hash == one.release.hash and last.decision == "rejected"
        assert isinstance(retrain(params_file=str(params_file)), NoNewRelease)
    finally:
        fs.rm(root, recursive=True)
