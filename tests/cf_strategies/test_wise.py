"""WiSE: after the task the weights are θ⁰ + mix·(θ − θ⁰); with LoRA, ΔW = mix·B·A."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from cf_strategies import build_strategies, train_task
from cf_strategies.registry import StrategyOptionError
from tests.cf_strategies.tiny_models import (
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_llm,
    tiny_mlp,
    token_batches,
)


def _train(model, spec, data, loss):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_task(model, data, build_strategies(spec, {"wise": {"mix": 0.3}}), opt, loss)
    return model


def test_full_fine_tuning_ends_between_the_start_and_the_trained_weights():
    start = {n: p.detach().clone() for n, p in tiny_mlp().named_parameters()}
    naive = _train(tiny_mlp(), "naive", mlp_batches(), mlp_loss)
    wise = _train(tiny_mlp(), "wise", mlp_batches(), mlp_loss)
    for (name, p), q in zip(wise.named_parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(p, start[name] + 0.3 * (q - start[name]))
        assert not torch.equal(p, q)


def test_lora_update_is_scaled_by_mix():
    def merged_delta(spec):
        base = tiny_llm()
        before = {n: p.detach().clone() for n, p in base.named_parameters()}
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model = _train(model, spec, token_batches(), lm_loss).merge_and_unload()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    naive, wise = merged_delta("naive"), merged_delta("wise")
    changed = [n for n in naive if naive[n].abs().max() > 0]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
    for name in naive:
        torch.testing.assert_close(wise[name], 0.3 * naive[name], atol=1e-6, rtol=1e-4)


def test_mix_outside_zero_one_is_an_error():
    with pytest.raises(StrategyOptionError, match=r"strategy 'wise': option 'mix': .* less than"):
        build_strategies("wise", {"wise": {"mix": 1.5}})
    assert build_strategies("wise", {"wise": {"mix": "1"}})[0].mix == 1.0
