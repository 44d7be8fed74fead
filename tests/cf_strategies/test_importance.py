"""EWC, SI and HLR in the coordinates of the model's weights: with LoRA, the Fisher and the path
integral are those of each target matrix W = W0 + s·B·A, the penalty after a merge is the
paper's quadratic form on W, and SI's gradient is the loss's own, unclipped."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, TrainingArguments

from cf_strategies import (
    ContinualTrainer,
    build_strategies,
    load_strategies,
    save_strategies,
    train_task,
)
from cf_strategies.base import example_nll
from cf_strategies.ewc import lora_fisher
from cf_strategies.importance import lora_sites
from tests.cf_strategies.tiny_models import lm_loss, tiny_llm, tiny_lora, token_batches

TARGETS = ("q_proj", "v_proj")


def merged_copy(model):
    """A plain model whose weights are the LoRA model's effective W = W0 + s·B·A, all trainable."""
    plain = copy.deepcopy(model).merge_and_unload()
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def weight_grads(plain, batch, names, per_example=False):
    """∂(mean NLL)/∂W of the named weights (summed over examples' squared gradients if asked)."""
    params = dict(plain.named_parameters())
    weights = [params[n] for n in names]
    if not per_example:
        return dict(zip(names, torch.autograd.grad(plain(**batch).loss, weights), strict=True))
    sums = [torch.zeros_like(w) for w in weights]
    for i in range(len(batch["input_ids"])):
        row = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        nll = example_nll(plain(**row).logits, batch["labels"][i : i + 1], True)[0]
        for s, g in zip(sums, torch.autograd.grad(nll, weights), strict=True):
            s += g.square()
    return dict(zip(names, sums, strict=True))


def test_lora_fisher_is_the_per_example_fisher_of_the_target_matrices():
    model = tiny_lora()
    batch = token_batches(n_batches=1, batch=5, pad_last=4, seed=2)[0]
    sites = lora_sites(model)
    fisher = lora_fisher(model, sites, [batch], chunk=2)
    reference = weight_grads(merged_copy(model), batch, list(sites), per_example=True)
    assert len(sites) == 4
    for name in sites:
        torch.testing.assert_close(fisher[name], reference[name] / 5, rtol=1e-4, atol=1e-9)


def test_a_fresh_adapter_has_no_gradient_on_a_but_the_weights_have_a_fisher():
    """At B = 0, ∂L/∂A = 0 exactly: a Fisher over the adapter's coordinates would be 0 for A.
    Measured on W it is the base model's Fisher of those matrices."""
    model = get_peft_model(tiny_llm(), LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    batch = token_batches(n_batches=1, batch=4, seed=1)[0]
    a_params = [p for n, p in model.named_parameters() if "lora_A" in n]
    grads = torch.autograd.grad(model(**batch).loss, a_params)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    fisher = lora_fisher(model, lora_sites(model), [batch])
    assert all(f.min() >= 0 and f.sum() > 1e-6 for f in fisher.values())


@pytest.mark.parametrize("spec", ["ewc", "si", "hlr"])
def test_penalty_after_a_merge_is_the_quadratic_form_on_the_changed_weights(spec, tmp_path):
    """Release 1 trains and saves; its adapter is merged; release 2 puts on a new adapter with
    another random A (and a non-zero B, as after a few steps). The penalty is
    coef · Σ_W Σ_ij Ω_ij (W_ij − W*_ij)², W* the merged weights, with its exact gradient."""
    model = tiny_lora()
    options = {"hlr": {"layer_balance": False, "lambda_": 3.0}, "si": {"c": 3.0}}
    strategies = build_strategies(spec, {spec: {"lambda_": 3.0}} if spec == "ewc" else options)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_task(model, token_batches(seed=0), strategies, optimizer, lm_loss)
    save_strategies(strategies, tmp_path)
    champion = model.merge_and_unload()
    w_star = {n: p.detach().clone() for n, p in champion.named_parameters()}

    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    fresh = get_peft_model(champion, config)
    (regulariser,) = build_strategies(spec, {spec: {"lambda_": 3.0}} if spec == "ewc" else options)
    load_strategies([regulariser], tmp_path)
    regulariser.reanchor(fresh)
    regulariser.before_task(fresh)
    penalty = regulariser.extra_loss(fresh, None, None)
    penalty.backward()

    importance = {k[11:]: v for k, v in regulariser.state_dict().items() if "importance." in k}
    coef = 1.5 if spec == "ewc" else 3.0  # λ/2 for EWC, c (λ·α with α = 1) for SI and HLR
    sites = lora_sites(fresh)
    expected = 0.0
    factors = [p for s in sites.values() for p in (s.A, s.B)]
    reference_grads = [torch.zeros_like(p) for p in factors]
    for name, site in sites.items():
        a, b = site.A.detach().requires_grad_(), site.B.detach().requires_grad_()
        w = w_star[name] + site.scaling * (b @ a)  # the model's weight now
        term = coef * (importance[name] * (w - w_star[name]).square()).sum()
        ga, gb = torch.autograd.grad(term, [a, b])
        i = [id(p) for p in factors].index(id(site.A))
        reference_grads[i] += ga
        reference_grads[i + 1] += gb
        expected += float(term.detach())
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    for p, g in zip(factors, reference_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-9)


class _Reference(TrainerCallback):
    """At every optimizer step of a ContinualTrainer: the task loss's own gradient with respect
    to the weights SI measures (computed on an independent copy), θ before and after the step,
    and SI's recorded gradient, so the path integral can be recomputed by hand."""

    def __init__(self, si, model, batch, lora: bool):
        self.si, self.model, self.batch, self.lora = si, model, batch, lora
        self.reference, self.recorded, self.paths = [], [], None

    def values(self):
        return {n: v.detach().clone() for n, v in zip(self.names(), self.si.values(), strict=True)}

    def names(self):
        return list(lora_sites(self.model)) if self.lora else list(self.si._params)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        names = self.names()
        if self.lora:
            ref = weight_grads(merged_copy(self.model), self.batch, names)
        else:
            plain = copy.deepcopy(self.model)
            params = dict(plain.named_parameters())
            grads = torch.autograd.grad(plain(**self.batch).loss, [params[n] for n in names])
            ref = dict(zip(names, grads, strict=True))
        self.reference.append(ref)
        recorded = self.si.task_gradient()
        self.recorded.append({n: g.clone() for n, g in zip(names, recorded, strict=True)})
        self.before = self.values()

    def on_optimizer_step(self, args, state, control, **kwargs):
        after, ref = self.values(), self.reference[-1]
        step = {n: -ref[n] * (after[n] - self.before[n]) for n in after}
        self.paths = step if self.paths is None else {n: self.paths[n] + step[n] for n in step}


@pytest.mark.parametrize("spec", ["si", "hlr"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_importance_under_gradient_clipping_is_the_unclipped_reference(spec, lora, tmp_path):
    """The Trainer clips the gradient (here to norm 1e-3, far below its size) before the
    optimizer step; SI's g must still be the task loss's own gradient, without its penalty."""
    model = tiny_lora() if lora else tiny_llm()
    (si,) = build_strategies(spec, {spec: {"c" if spec == "si" else "lambda_": 50.0}})
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_task(model, token_batches(seed=0), [si], optimizer, lm_loss)  # importance, then a penalty
    omega_before = {k: v.clone() for k, v in si.importance.items()}

    batch = token_batches(n_batches=1, batch=4, length=10, seed=3)[0]
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    reference = _Reference(si, model, batch, lora)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e-3, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = ContinualTrainer(
        model=model, args=args, train_dataset=rows, strategies=[si], callbacks=[reference]
    )
    si_start = reference.values()
    trainer.train()
    assert len(reference.reference) == 3
    for ref, got in zip(reference.reference, reference.recorded, strict=True):
        norm = sum(float(g.square().sum()) for g in ref.values()) ** 0.5
        assert norm > 1e-2  # so the 1e-3 clip really changed the step
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)

    end = reference.values()
    for n, path in reference.paths.items():
        gain = path.clamp_min(0) / ((end[n] - si_start[n]).square() + si.xi)
        torch.testing.assert_close(si.importance[n] - omega_before[n], gain, rtol=1e-3, atol=1e-6)


def test_state_saved_in_adapter_coordinates_is_not_loaded(tmp_path):
    """A champion saved by the earlier adapter-coordinate EWC: its Fisher of A and B means
    nothing on the next release's fresh adapter, so it is dropped (with a warning), not applied."""
    model = tiny_lora()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    old = {"tasks": 1, **{f"fisher.{n}": torch.ones_like(p) for n, p in params.items()}}
    (ewc,) = build_strategies("ewc")
    with pytest.warns(UserWarning, match="earlier version's adapter"):
        ewc.load_state_dict(old)
    ewc.before_task(model)
    assert ewc.tasks == 0 and ewc.importance == {}
    assert ewc.extra_loss(model, None, None) is None
