"""The tournament's grid: candidates alike but for ``wise.mix`` share one fine-tune, and a merge
made after training is exactly WiSE-FT's interpolation (merged weights) or B scaled (adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.core.config import TrainConfig
from flows.core.records import TrainResult
from flows.registry.serving import ADAPTER_PARENT
from flows.steps.tournament import (
    expand_candidates,
    interpolate,
    merge_coefficient,
    merge_groups,
)


def test_candidates_alike_but_for_the_merge_coefficient_share_one_training():
    train = TrainConfig(
        strategy_params={"lwf": {"alpha": 1.0}},
        candidates={
            "lwf+wise": {"wise.mix": [0.5, 1.0], "lwf.alpha": [0.5, 1.0]},
            "naive": {},
        },
    )
    groups = merge_groups(expand_candidates(train))
    served = [[c.label for c in members] for _, members in groups]
    assert served == [
        ["lwf+wise wise.mix=0.5 lwf.alpha=0.5", "lwf+wise wise.mix=1.0 lwf.alpha=0.5"],
        ["lwf+wise wise.mix=0.5 lwf.alpha=1.0", "lwf+wise wise.mix=1.0 lwf.alpha=1.0"],
        ["naive"],
    ]
    trained = [t.strategy_params for t, _ in groups[:2]]
    assert trained == [
        {"lwf": {"alpha": 0.5}, "wise": {"mix": 1.0}},
        {"lwf": {"alpha": 1.0}, "wise": {"mix": 1.0}},
    ]
    assert [merge_coefficient(c) for c in groups[0][1]] == [0.5, 1.0]
    assert merge_coefficient(groups[2][1][0]) is None
    alone = expand_candidates(TrainConfig(candidates={"lwf+wise": {}}))[0]
    assert merge_coefficient(alone) == 0.5  # wise's own default


def _result(folder) -> TrainResult:
    return TrainResult(model_dir=folder, strategy="naive+wise", steps=1, train_seconds=1.0)


def test_a_merged_candidate_is_interpolated_from_the_weights_it_started_from(tmp_path):
    start, tuned = tmp_path / "champion", tmp_path / "trained"
    for folder, value in ((start, 1.0), (tuned, 3.0)):
        folder.mkdir()
        save_file({"w": torch.full((2, 2), value)}, folder / "model.safetensors")
        (folder / "config.json").write_text("{}")
    out = interpolate(start, _result(tuned), 0.25, tmp_path / "merged")
    assert out.model_dir == tmp_path / "merged" and (out.model_dir / "config.json").is_file()
    assert load_file(out.model_dir / "model.safetensors")["w"].eq(1.5).all()  # 1 + 0.25 · 2
    assert load_file(tuned / "model.safetensors")["w"].eq(3.0).all()  # the trained one kept
    save_file({"other": torch.ones(1)}, start / "model.safetensors")
    with pytest.raises(ValueError, match="has no weight w of the candidate"):
        interpolate(start, _result(tuned), 0.25, tmp_path / "again")


def test_an_adapter_candidate_has_its_b_matrices_scaled(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    weights = {"x.lora_A.weight": torch.ones(2, 4), "x.lora_B.weight": torch.full((4, 2), 2.0)}
    save_file(weights, adapter / "adapter_model.safetensors")
    (adapter / ADAPTER_PARENT).write_text(json.dumps({"parent": {"kind": "base"}}))
    out = interpolate(tmp_path / "unused", _result(adapter), 0.5, tmp_path / "half")
    scaled = load_file(out.model_dir / "adapter_model.safetensors")
    assert scaled["x.lora_A.weight"].eq(1.0).all() and scaled["x.lora_B.weight"].eq(1.0).all()
