import json

import pytest
import torch
from safetensors.torch import load_file

from cf_strategies import NonFiniteLossError
from flows.core.config import load_params
from flows.core.records import ChampionRef
from flows.steps.finetune import FinetuneStep, finetune


def champion(tiny_model_dir) -> ChampionRef:
    return ChampionRef(version=None, model_dir=tiny_model_dir, releases=[])


def test_candidate_is_a_merged_plain_model_with_training_log(
    params_file, tiny_model_dir, demo_dir, tmp_path
):
    params = load_params(params_file, {"train.max_steps": 3})
    result = finetune(
        FinetuneStep.from_params(params),
        champion(tiny_model_dir),
        demo_dir / "releases" / "wiki-topics-1",
        tmp_path,
    )
    assert result.steps == 3 and [h["step"] for h in result.log_history] == [1, 2, 3]
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"  # merged: no adapter left, loads as a plain model
    assert not (result.model_dir / "adapter_config.json").exists()
    assert (result.model_dir / "strategy_state" / "naive.json").exists()
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.model_dir / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched only its target layers


def test_a_nan_loss_stops_training_and_writes_no_candidate(
    params_file, tiny_model_dir, demo_dir, tmp_path
):
    params = load_params(params_file, {"train.max_steps": 6})
    # params.yaml refuses a learning rate above 1; diverging on purpose stands in for what makes
    # a loss NaN in practice (fp16 overflow, a corrupt batch), so the bound is bypassed here
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"learning_rate": 1e30})}
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d"):
        finetune(
            FinetuneStep.from_params(params),
            champion(tiny_model_dir),
            demo_dir / "releases" / "wiki-topics-1",
            tmp_path,
        )
    assert not (tmp_path / "candidate_model").exists()


def test_ewc_protects_general_knowledge_from_the_first_release_and_reanchors_on_the_next(
    params_file, tiny_model_dir, demo_dir, tmp_path
):
    """Release 1: EWC's Fisher comes from the champion's answers to rehearsal prompts, anchored at
    the champion (penalty 0 at the first step, active from the second). Release 2 from that
    candidate: the old adapter is merged, so the fresh one is anchored where it starts (penalty 0
    at the first step again, not a pull toward the merged adapter's values)."""
    releases = demo_dir / "releases"
    naive = load_params(params_file, {"train.max_steps": 2})
    ewc = naive.with_overrides(
        {
            "train.strategy": "ewc",
            "train.strategy_params": {"ewc": {"lambda_": 1e8, "fisher_samples": 8}},
            "train.general_importance_prompts": 8,
        }
    )
    base = champion(tiny_model_dir)
    losses = lambda r: [h["loss"] for h in r.log_history]  # noqa: E731
    plain = finetune(
        FinetuneStep.from_params(naive), base, releases / "wiki-topics-1", tmp_path / "naive1"
    )
    first = finetune(
        FinetuneStep.from_params(ewc), base, releases / "wiki-topics-1", tmp_path / "ewc1"
    )
    assert losses(first)[0] == pytest.approx(losses(plain)[0], abs=1e-4)
    assert losses(first)[1] > losses(plain)[1] + 0.1  # the general-knowledge penalty acts
    state = json.loads((first.model_dir / "strategy_state" / "ewc.json").read_text())
    assert state["tasks"] == 2  # general knowledge, then release 1

    after = ChampionRef(version="1", model_dir=first.model_dir, releases=["wiki-topics-1"])
    plain2 = finetune(
        FinetuneStep.from_params(naive), after, releases / "wiki-topics-2", tmp_path / "naive2"
    )
    second = finetune(
        FinetuneStep.from_params(ewc), after, releases / "wiki-topics-2", tmp_path / "ewc2"
    )
    assert losses(second)[0] == pytest.approx(losses(plain2)[0], abs=1e-4)


def test_a_half_set_launch_environment_is_refused_before_anything_is_trained(
    params_file, tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    """WORLD_SIZE without RANK is no launcher's doing: the step refuses rather than wait for
    ranks that never come (multi-process training: tests/flows/test_distributed.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = load_params(params_file, {"train.max_steps": 1})
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="WORLD_SIZE is 2 but RANK is not set"):
        finetune(
            FinetuneStep.from_params(params),
            champion(tiny_model_dir),
            demo_dir / "releases" / "wiki-topics-1",
            run_dir,
        )
    assert not run_dir.exists()
