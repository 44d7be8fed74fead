"""The fine-tune step sharded with FSDP on two CPU ranks (gloo) against one process.

accelerate offers FSDP on accelerators only; torch's FSDP2 also shards over gloo, and
``FORGETLESS_FSDP_ON_CPU=1`` lets the ranks use it (``flows.production.launch.allow_fsdp_on_cpu``). What
runs is the path a GPU launch takes: every rank reads the champion on the CPU, accelerate moves
it to the meta device, shards it block by block and loads rank 0's weights into the shards
(``--fsdp_cpu_ram_efficient_loading``); at the end ``gathered_adapter`` all-gathers the LoRA
shards and rank 0 writes the candidate. On GPUs only the device of the shards differs.

The release is the second of a chain, from a champion with a full replay buffer, so every step
of ``lwf+replay`` distils on the rank's own rows and replays its share of one draw. 2 ranks × B
against 1 process × 2B, as in ``test_distributed``: what is left is float rounding (measured
below); one process at B, the control, is far off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flows.core.config import load_params
from flows.core.records import ChampionRef
from flows.production import launch
from flows.steps import ranks
from flows.steps.finetune import CHECKPOINT_DIR, FinetuneStep
from tests.conftest import write_params
from tests.flows.pretrained_tiny import write_new_release
from tests.flows.test_distributed import (
    ADAPTER_RTOL,
    N_TRAIN,
    B,
    _deltas,
    _params,
    _relative,
    kill_after_a_checkpoint,
)

SPEC = "lwf+replay"


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_model_dir, demo_dir) -> dict[str, Path]:
    """Candidates of the second release: ``fsdp`` (2 ranks × B, sharded), ``one`` (1 × 2B),
    ``control`` (1 × B), all from ``champion`` (1 × 2B on the first release)."""
    root = tmp_path_factory.mktemp("fsdp")
    first = write_new_release(root / "first", n_train=N_TRAIN, n_eval=4, seed=1)
    second = write_new_release(root / "second", n_train=N_TRAIN, n_eval=4, seed=2)

    def run(name: str, champion: ChampionRef, release: Path, batch: int, processes: int) -> Path:
        params = _params(root / name, tiny_model_dir, demo_dir, batch, processes)
        params = params.with_overrides(
            {
                "train.strategy": SPEC,
                "train.strategy_params": {"replay": {"buffer_size": 16}},
                "train.fsdp": processes > 1,
            }
        )
        return launch.train(
            FinetuneStep.from_params(params), champion, release, root / name / "run"
        ).model_dir

    out = {
        "champion": run(
            "champion", ChampionRef(version=None, model_dir=tiny_model_dir), first, 2 * B, 1
        )
    }
    champion = ChampionRef(version="1", model_dir=out["champion"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ranks.FSDP_ON_CPU, "1")
        out["fsdp"] = run("fsdp", champion, second, B, 2)
    out["one"] = run("one", champion, second, 2 * B, 1)
    out["control"] = run("control", champion, second, B, 1)
    return out


def test_two_sharded_ranks_train_the_adapter_one_process_trains_on_the_global_batch(sharded_runs):
    start = load_file(str(sharded_runs["champion"] / "model.safetensors"))
    fsdp, one, control = (_deltas(sharded_runs[k], start) for k in ("fsdp", "one", "control"))
    assert max(float(d.abs().max()) for d in one.values()) > 1e-3  # the adapter did learn
    measured = _relative(fsdp, one)
    assert measured < ADAPTER_RTOL, measured  # measured 9.3e-6
    assert _relative(control, one) > 1000 * ADAPTER_RTOL  # the control, measured 0.87


def test_each_rank_held_half_the_model_and_the_state_agreed(sharded_runs):
    folder = sharded_runs["fsdp"].parent / ranks.LAUNCH_DIR
    shares = json.loads((folder / ranks.SHARDS).read_text())
    assert len(shares) == 2 and shares[0]["total"] == shares[1]["total"]
    assert shares[0]["held"] + shares[1]["held"] == shares[0]["total"]  # disjoint shards
    for share in shares:  # half each, give or take a row of an odd-sized matrix
        assert abs(share["held"] / share["total"] - 0.5) < 0.01, share
    prints = json.loads((folder / ranks.FINGERPRINTS).read_text())
    assert prints[0] == prints[1] and set(prints[0]) == {"lwf", "replay"}
    replay = json.loads((sharded_runs["fsdp"] / "strategy_state" / "replay.json").read_text())
    alone = json.loads((sharded_runs["one"] / "strategy_state" / "replay.json").read_text())
    assert replay == alone  # the same buffer, saved once


def test_fsdp_needs_gpus_unless_cpu_ranks_are_asked_for(tmp_path, tiny_model_dir, demo_dir):
    params = _params(tmp_path, tiny_model_dir, demo_dir, B, 2).with_overrides(
        {"train.strategy": "naive", "train.strategy_params": {}, "train.fsdp": True}
    )
    with pytest.raises(RuntimeError, match="FORGETLESS_FSDP_ON_CPU=1 to try the sharded path"):
        ranks.check_ranks(params.train, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ranks.FSDP_ON_CPU, "1")
        ranks.check_ranks(params.train, 2)  # allowed
        ewc = params.with_overrides({"train.strategy": "ewc"})
        with pytest.raises(RuntimeError, match="strategy ewc reads or keeps the weights itself"):
            ranks.check_ranks(ewc.train, 2)


def test_two_sharded_ranks_killed_after_a_checkpoint_resume_as_an_uninterrupted_run(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch
):
    """Under FSDP a checkpoint holds each rank's shards of the adapter and of the optimizer's
    state (``SHARDED_STATE_DICT``, adapter only: torch's distributed checkpoint, every rank
    writes its own) beside the strategies' state; the step is SIGKILLed after the first one, and the retry
    resumes there and ends with the uninterrupted run's adapter and replay buffer."""
    monkeypatch.setenv(ranks.FSDP_ON_CPU, "1")  # inherited by the killed step's process
    steps = 12
    train = {
        "strategy": SPEC,
        "strategy_params": {"replay": {"buffer_size": 16}},
        "batch_size": B,
        "max_steps": steps,
        "warmup_steps": 0,
        "checkpoint_steps": 2,
        "num_processes": 2,
        "fsdp": True,
    }
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir, train=train)
    params = load_params(params_file)
    release = write_new_release(tmp_path / "releases", n_train=N_TRAIN, n_eval=4, seed=3)
    champion = ChampionRef(version=None, model_dir=tiny_model_dir)
    kill_after_a_checkpoint(params_file, champion, release, tmp_path / "crashed")

    resumed = launch.train(
        FinetuneStep.from_params(params), champion, release, tmp_path / "crashed"
    )
    reference = launch.train(
        FinetuneStep.from_params(params), champion, release, tmp_path / "uninterrupted"
    )
    assert resumed.steps == reference.steps == steps
    assert resumed.resumed_from_step is not None and 2 <= resumed.resumed_from_step < steps
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    trained, expected = (_deltas(r.model_dir, start) for r in (resumed, reference))
    assert max(float(d.abs().max()) for d in expected.values()) > 1e-3  # it trained
    measured = _relative(trained, expected)
    assert measured < ADAPTER_RTOL, measured  # measured 0.0
    replay, alone = (
        json.loads((r.model_dir / "strategy_state" / "replay.json").read_text())
        for r in (resumed, reference)
    )
    assert replay == alone
    assert not (tmp_path / "crashed" / CHECKPOINT_DIR).exists()
