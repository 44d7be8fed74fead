import json

import pytest
import torch
from safetensors.torch import load_file

from cf_strategies import NonFiniteLossError
from flows.config import load_params
from flows.finetune import finetune
from flows.records import ChampionRef


def champion(tiny_model_dir) -> ChampionRef:
    return ChampionRef(version=None, model_dir=tiny_model_dir, releases=[])


def test_candidate_is_a_merged_plain_model_with_training_log(
    params_file, tiny_model_dir, demo_dir, tmp_path
):
    params = load_params(params_file, {"train.max_steps": 3})
    result = finetune(
        params, champion(tiny_model_dir), demo_dir / "releases" / "wiki-topics-1", tmp_path
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
    params = load_params(params_file, {"train.learning_rate": 1e30, "train.max_steps": 6})
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d"):
        finetune(
            params, champion(tiny_model_dir), demo_dir / "releases" / "wiki-topics-1", tmp_path
        )
    assert not (tmp_path / "candidate_model").exists()
