"""Online EWC: the penalty's gradient, the per-example Fisher (vmap, loop, true and empirical),
online accumulation and constant state size."""

import warnings

import pytest
import torch
from torch import nn

from cf_strategies import build_strategies, train_task
from cf_strategies.base import trainable_parameters
from cf_strategies.ewc import EWC, diagonal_fisher
from cf_strategies.importance import lora_sites
from tests.cf_strategies.tiny_models import (
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_llm,
    tiny_lora,
    tiny_mlp,
    token_batches,
)


def _set_state(ewc: EWC, model: nn.Module, seed: int = 1) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    anchor = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    state = {
        "tasks": 1,
        "coordinates": "weights",
        **{f"importance.{n}": f for n, f in fisher.items()},
    }
    state.update({f"anchor.{n}": a for n, a in anchor.items()})
    ewc.load_state_dict(state)
    return fisher, anchor


def test_penalty_gradient_is_lambda_fisher_times_distance():
    model, ewc = tiny_mlp(), EWC(lambda_=3.0)
    fisher, anchor = _set_state(ewc, model)
    ewc.before_task(model)
    penalty = ewc.extra_loss(model, None, None)
    penalty.backward()
    expected_value = 0.0
    for name, p in model.named_parameters():
        diff = p.detach() - anchor[name]
        torch.testing.assert_close(p.grad, 3.0 * fisher[name] * diff)
        expected_value += 1.5 * (fisher[name] * diff**2).sum()
    torch.testing.assert_close(penalty.detach(), expected_value)


def test_no_penalty_before_the_first_fisher():
    model, ewc = tiny_mlp(), EWC()
    ewc.before_task(model)
    assert ewc.extra_loss(model, None, None) is None


def _reference_fisher_mlp(model, batches, limit):
    params = list(model.parameters())
    sums, seen = [torch.zeros_like(p) for p in params], 0
    for x, y in batches:
        for i in range(len(y)):
            if seen == limit:
                break
            nll = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            for s, g in zip(sums, torch.autograd.grad(nll, params), strict=True):
                s += g**2
            seen += 1
    return [s / seen for s in sums]


def test_fisher_is_the_mean_of_per_example_squared_gradients():
    model, batches = tiny_mlp(), mlp_batches(n_batches=3, batch=8)
    # 21 of 24 examples, in chunks of 5 that straddle the batches
    fisher = diagonal_fisher(
        model, dict(model.named_parameters()), batches, max_samples=21, chunk=5
    )
    for f, ref in zip(fisher.values(), _reference_fisher_mlp(model, batches, 21), strict=True):
        torch.testing.assert_close(f, ref)
    # ... which is not the square of the minibatch-mean gradient (Avalanche's estimate)
    x, y = batches[0]
    mean_grad = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model[0].weight)[0]
    assert fisher["0.weight"].sum() > 2 * (mean_grad**2).sum()


def _reference_fisher_lm(model, batch):
    """Per-example gradients of transformers' own loss (mean over labelled tokens), masks kept."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    n = batch["input_ids"].shape[0]
    for i in range(n):
        loss = model(**{k: v[i : i + 1] for k, v in batch.items()}).loss
        for s, g in zip(sums, torch.autograd.grad(loss, params), strict=True):
            s += g**2
    return [s / n for s in sums]


@pytest.mark.parametrize("make", [tiny_llm, tiny_lora], ids=["full", "lora"])
def test_fisher_on_a_causal_lm_with_right_padding_matches_per_example_backward(make):
    model = make().eval()
    batch = token_batches(n_batches=1, batch=4, pad_last=4)[0]
    params = trainable_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vmap path must be taken (no fallback warning)
        fisher = diagonal_fisher(model, params, [batch], chunk=3)
    for f, ref in zip(fisher.values(), _reference_fisher_lm(model, batch), strict=True):
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-9)


def test_left_padding_falls_back_to_the_exact_loop():
    model = tiny_llm().eval()
    batch = token_batches(n_batches=1, batch=3)[0]
    batch["attention_mask"][1, :3] = 0  # left padding: cannot be dropped
    batch["labels"][1, :3] = -100
    with pytest.warns(UserWarning, match="per-example loop"):
        fisher = diagonal_fisher(model, dict(model.named_parameters()), [batch])
    for f, ref in zip(fisher.values(), _reference_fisher_lm(model, batch), strict=True):
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-9)


def test_true_fisher_samples_labels_from_the_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.randn(1, 3)
    batches = [(x.expand(500, 3), torch.zeros(500, dtype=torch.long))] * 8  # one input, label 0
    true = diagonal_fisher(model, dict(model.named_parameters()), batches, "true", 4000, 500)
    empirical = diagonal_fisher(
        model, dict(model.named_parameters()), batches, "empirical", 4000, 500
    )
    probs = torch.softmax(model(x), -1)[0].detach()
    expected = torch.zeros_like(model.weight)
    for y in range(4):  # E_{y ~ p(·|x)} [g_y²], exactly
        g = torch.autograd.grad(
            nn.functional.cross_entropy(model(x), torch.tensor([y])), model.weight
        )[0]
        expected += probs[y] * g**2
        if y == 0:
            label0 = g**2
    torch.testing.assert_close(true["weight"], expected, rtol=0.1, atol=1e-4)
    torch.testing.assert_close(empirical["weight"], label0)


def test_online_fisher_decays_by_gamma_and_anchors_at_the_end_of_each_task():
    model, ewc = tiny_mlp(), EWC(lambda_=1.0, gamma=0.5, fisher_samples=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_task(model, mlp_batches(seed=0), [ewc], optimizer, mlp_loss)
    f1 = diagonal_fisher(model, dict(model.named_parameters()), mlp_batches(seed=0), max_samples=16)
    size_after_one = len(ewc.state_dict())
    train_task(model, mlp_batches(seed=1), [ewc], optimizer, mlp_loss)
    f2 = diagonal_fisher(model, dict(model.named_parameters()), mlp_batches(seed=1), max_samples=16)
    state = ewc.state_dict()
    for name, p in model.named_parameters():
        torch.testing.assert_close(state[f"importance.{name}"], 0.5 * f1[name] + f2[name])
        assert torch.equal(state[f"anchor.{name}"], p.detach())
    assert state["tasks"] == 2
    assert len(state) == size_after_one  # one Fisher, one anchor: constant in the number of tasks


def test_options_are_checked():
    with pytest.raises(ValueError, match="option 'fisher': Input should be 'empirical' or 'true'"):
        EWC(fisher="sampled")
    with pytest.raises(ValueError, match="option 'gamma': Input should be less than or equal to 1"):
        EWC(gamma=1.5)
    with pytest.raises(ValueError, match="'ewc': option 'lambda_': Input should be a valid number"):
        build_strategies("ewc", {"ewc": {"lambda_": "abc"}})
    with pytest.raises(ValueError, match="unknown option 'lambda'.*valid options: fisher"):
        build_strategies("ewc", {"ewc": {"lambda": 1.0}})
    assert EWC(lambda_="1e4").lambda_ == 1e4  # YAML reads 1e4 as a string


def test_ewc_trains_a_lora_model_through_two_tasks():
    model = tiny_lora()
    ewc = EWC(lambda_=10.0, fisher_samples=4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(2):
        train_task(model, token_batches(seed=seed), [ewc], optimizer, lm_loss)
    sites = lora_sites(model)
    fisher = {k[11:]: v for k, v in ewc.state_dict().items() if k.startswith("importance.")}
    assert set(fisher) == set(sites) and ewc.tasks == 2
    assert all(f.shape == sites[n].shape() and f.sum() > 0 for n, f in fisher.items())
