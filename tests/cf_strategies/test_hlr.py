"""HLR: layer grouping, the layer-balanced penalty and its gradient, importance from general
data that leaves the model unchanged, and the first task playing the general task."""

import torch

from cf_strategies import train_task
from cf_strategies.base import trainable_parameters
from cf_strategies.hlr import HLR, layer_of
from cf_strategies.importance import lora_sites
from cf_strategies.si import SynapticIntelligence
from tests.cf_strategies.tiny_models import (
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_lora,
    tiny_mlp,
    token_batches,
)


def test_layer_of_groups_by_block_or_module():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    lora = "base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight"
    assert layer_of(lora) == "base_model.model.model.layers.12"
    assert layer_of("0.weight") == layer_of("0.bias") == "0"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_of("lm_head.weight") == "lm_head"
    assert layer_of("theta") == "theta"


def _load_state(strategy, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    omega = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    anchor = {n: p.detach() + torch.randn(p.shape, generator=g) for n, p in params.items()}
    strategy.load_state_dict(
        {
            "coordinates": "weights",
            **{f"importance.{n}": o for n, o in omega.items()},
            **{f"anchor.{n}": a for n, a in anchor.items()},
        }
    )
    return omega, anchor


def test_penalty_weights_each_layer_by_its_share_and_the_gradient_keeps_the_weights_fixed():
    model, hlr = tiny_mlp(), HLR(lambda_=0.5)
    omega, anchor = _load_state(hlr, model)
    hlr.before_task(model)
    penalty = hlr.extra_loss(model, None, None)
    penalty.backward()

    per_layer = {"0": 0.0, "2": 0.0}
    for name, p in model.named_parameters():
        per_layer[layer_of(name)] += float((omega[name] * (p.detach() - anchor[name]) ** 2).sum())
    total = sum(per_layer.values())
    alpha = {k: 2 * r / total for k, r in per_layer.items()}  # L = 2 layers
    expected = 0.5 * sum(alpha[k] * r for k, r in per_layer.items())
    assert abs(float(penalty.detach()) - expected) < 1e-4 * expected
    assert alpha["0"] != alpha["2"]
    for name, p in model.named_parameters():  # α is a constant in backward
        want = 2 * 0.5 * alpha[layer_of(name)] * omega[name] * (p.detach() - anchor[name])
        torch.testing.assert_close(p.grad, want)


def test_without_layer_balance_it_is_si():
    model = tiny_mlp()
    hlr, si = HLR(lambda_=0.5, layer_balance=False), SynapticIntelligence(c=0.5)
    _load_state(hlr, model)
    _load_state(si, model)
    hlr.before_task(model)
    si.before_task(model)
    torch.testing.assert_close(hlr.extra_loss(model, None, None), si.extra_loss(model, None, None))


def test_estimate_importance_leaves_the_model_unchanged_and_anchors_to_it():
    model = tiny_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hlr = HLR(lambda_=1.0)
    hlr.estimate_importance(model, token_batches(n_batches=3, seed=5), lr=1e-2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    state = hlr.state_dict()
    omega = {k[11:]: v for k, v in state.items() if k.startswith("importance.")}
    sites = lora_sites(model)  # the target matrices W = W0 + s·B·A, not the adapters
    assert set(omega) == set(sites) and len(sites) == 4
    assert all(o.shape == sites[n].shape() for n, o in omega.items())
    assert all((o >= 0).all() for o in omega.values()) and sum(o.sum() for o in omega.values()) > 0
    for n, site in sites.items():  # anchored at the pre-trained ΔW = s·B·A
        torch.testing.assert_close(
            state[f"anchor_lora_B.{n}"] @ state[f"anchor_lora_A.{n}"], site.value()
        )

    # The next task is penalised toward the pre-trained weights from its first step on.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hlr.before_task(model)
    assert float(hlr.extra_loss(model, None, None).detach()) == 0.0
    train_task(model, token_batches(seed=6), [hlr], optimizer, lm_loss)
    assert hlr.tasks == 2


def test_first_task_without_general_data_records_importance_unpenalised():
    model, hlr = tiny_mlp(), HLR()
    hlr.before_task(model)
    assert hlr.extra_loss(model, None, None) is None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_task(model, mlp_batches(), [hlr], optimizer, mlp_loss, epochs=2)
    omega = [v for k, v in hlr.state_dict().items() if k.startswith("importance.")]
    assert sum(float(o.sum()) for o in omega) > 0
