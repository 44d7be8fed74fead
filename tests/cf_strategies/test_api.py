"""The Strategy API with the regularisation family: registry errors, composition, state
round-trips, LoRA (no frozen weight touched), the vectorised penalty and ContinualTrainer."""

import json

import pytest
import torch
from transformers import TrainingArguments

from cf_strategies import (
    STRATEGIES,
    ContinualTrainer,
    build_strategies,
    load_strategies,
    save_strategies,
    train_task,
    validate_spec,
)
from cf_strategies.base import Strategy, quadratic_terms, trainable_parameters
from cf_strategies.der import DER
from cf_strategies.ewc import EWC
from cf_strategies.l2 import L2
from cf_strategies.registry import StrategyOptionError
from cf_strategies.trainer import total_loss
from tests.cf_strategies.tiny_models import (
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_llm,
    tiny_lora,
    tiny_mlp,
    token_batches,
)

REGULARISERS = ["l2", "ewc", "si", "hlr"]


# ---- registry ---------------------------------------------------------------------------------
def test_misspelt_strategy_or_option_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"unknown strategy 'ecw'; valid strategies: .*ewc.*hlr.*l2.*naive.*si"
    ):
        validate_spec("ecw")
    with pytest.raises(
        ValueError,
        match=r"strategy 'hlr': unknown option 'c'; valid options: lambda_, layer_balance, xi",
    ):
        validate_spec("hlr", {"hlr": {"c": 1.0}})
    with pytest.raises(ValueError, match="options given for unknown strategy 'sii'"):
        validate_spec("ewc", {"sii": {"c": 1.0}})
    assert validate_spec("ewc", {"si": {"c": 1.0}}) == ["ewc"]  # kept for when si is chosen
    with pytest.raises(ValueError, match="strategy 'si': unknown option 'lamda'"):
        validate_spec("ewc", {"si": {"lamda": 1.0}})
    with pytest.raises(ValueError, match="twice"):
        validate_spec("ewc+EWC")


def test_build_by_name_or_list_with_options():
    a = build_strategies("ewc + si", {"ewc": {"lambda_": "1e3", "gamma": 0.9}, "si": {"c": 30}})
    b = build_strategies(["ewc", "si"])
    assert [s.name for s in a] == [s.name for s in b] == ["ewc", "si"]
    assert a[0].lambda_ == 1000.0 and a[0].gamma == 0.9 and a[1].c == 30.0  # YAML's "1e3" is a str
    assert repr(a[0]).startswith("EWC(lambda_=1000.0, gamma=0.9")


# ---- the vectorised penalty -------------------------------------------------------------------
def test_quadratic_terms_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, 4, generator=g, requires_grad=True),
        torch.randn(5, generator=g, requires_grad=True),
    ]
    anchors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    weights = [torch.rand(3, 4, generator=g), torch.rand(5, generator=g)]
    coef = torch.tensor([0.3, 2.0])
    (coef * quadratic_terms(params, anchors, [w.sqrt() for w in weights])).sum().backward()
    ref = [p.detach().clone().requires_grad_() for p in params]
    (
        sum(
            c * (w * (p - a) ** 2).sum()
            for c, p, a, w in zip(coef, ref, anchors, weights, strict=True)
        )
    ).backward()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)
    diffs = [(p - a).detach() for p, a in zip(params, anchors, strict=True)]
    kept = [d.clone() for d in diffs]
    for p in params:
        p.grad = None
    (
        coef * quadratic_terms(params, None, [w.sqrt() for w in weights], diffs=diffs)
    ).sum().backward()
    for p, r, d, k in zip(params, ref, diffs, kept, strict=True):  # θ − a given: same, unchanged
        torch.testing.assert_close(p.grad, r.grad)
        assert torch.equal(d, k)
        p.grad = None
    quadratic_terms(params, None, diffs=diffs).sum().backward()
    for p, d, k in zip(params, diffs, kept, strict=True):
        torch.testing.assert_close(p.grad, 2 * k)
        assert torch.equal(d, k)
    terms = quadratic_terms(params, anchors)  # no weights: plain squared distance
    torch.testing.assert_close(
        terms, torch.stack([((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)])
    )


# ---- composition ------------------------------------------------------------------------------
def test_composition_applies_both_penalties():
    model = tiny_mlp()
    ewc, l2 = build_strategies("ewc+l2", {"ewc": {"lambda_": 5.0}, "l2": {"lambda_": 3.0}})
    train_task(
        model, mlp_batches(seed=0), [ewc, l2], torch.optim.SGD(model.parameters(), lr=0.1), mlp_loss
    )
    ewc.before_task(model)
    l2.before_task(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = mlp_batches(seed=1)[0]
    both, _, _ = total_loss(model, batch, [ewc, l2], mlp_loss, 0)
    task, _ = mlp_loss(model, batch)
    pe, pl = ewc.extra_loss(model, batch, None), l2.extra_loss(model, batch, None)
    assert float(pe.detach()) > 0 and float(pl.detach()) > 0
    torch.testing.assert_close(both, task + pe + pl)


# ---- state across releases --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ewc", "si", "hlr"])
def test_state_round_trips_bit_exactly(name, tmp_path):
    model = tiny_mlp().double()  # the dtype survives too
    strategies = build_strategies(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(2):
        batches = [(x.double(), y) for x, y in mlp_batches(seed=seed)]
        train_task(model, batches, strategies, optimizer, mlp_loss)
    save_strategies(strategies, tmp_path)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    fresh = build_strategies(name)
    load_strategies(fresh, tmp_path)
    saved, loaded = strategies[0].state_dict(), fresh[0].state_dict()
    assert saved.keys() == loaded.keys() and loaded["tasks"] == 2
    for k, v in saved.items():
        if torch.is_tensor(v):
            assert v.dtype == loaded[k].dtype and torch.equal(v, loaded[k]), k
    # and the next release continues from it with the same penalty
    for s in (strategies[0], fresh[0]):
        s.before_task(model)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    assert torch.equal(
        strategies[0].extra_loss(model, None, None), fresh[0].extra_loss(model, None, None)
    )


def test_state_of_another_model_is_refused(tmp_path):
    ewc = EWC()
    train_task(
        tiny_mlp(), mlp_batches(), [ewc], torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), mlp_loss
    )
    ewc.save(tmp_path)
    other = EWC()
    other.load(tmp_path)
    with pytest.raises(ValueError, match="does not train"):
        other.before_task(tiny_llm())


def test_save_without_tensors_removes_a_stale_tensor_file(tmp_path):
    class Counter(Strategy):
        name = "counter_test"

        def __init__(self, tensors: bool = True):
            self.tensors = tensors

        def state_dict(self):
            return {"x": torch.ones(2)} if self.tensors else {"n": 1}

        def load_state_dict(self, state):
            self.loaded = dict(state)

    Counter().save(tmp_path)
    Counter(tensors=False).save(tmp_path)
    fresh = Counter()
    fresh.load(tmp_path)
    assert fresh.loaded == {"n": 1}
    assert json.loads((tmp_path / "counter_test.json").read_text()) == {"n": 1}


# ---- LoRA: only the adapters ------------------------------------------------------------------
@pytest.mark.parametrize("spec", REGULARISERS + ["ewc+si+l2"])
def test_lora_mode_touches_no_frozen_parameter(spec):
    model = tiny_lora()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = set(trainable_parameters(model))
    assert adapters and all(".lora_" in n for n in adapters)
    strategies = build_strategies(spec)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if spec == "hlr":
        strategies[0].estimate_importance(model, token_batches(seed=9))
    for seed in range(2):
        train_task(model, token_batches(seed=seed), strategies, optimizer, lm_loss)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    # EWC, SI and HLR keep state for the target matrices W = W0 + s·B·A (named like the frozen
    # base weights), never for the adapter's own coordinates
    targets = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n in frozen}
    targets = {n for n in targets if n.endswith(("q_proj.weight", "v_proj.weight"))}
    for s in strategies:
        state_names = {k.split(".", 1)[1] for k, v in s.state_dict().items() if torch.is_tensor(v)}
        if s.name != "l2":
            assert {n for n in state_names if ".lora_" not in n} == targets


# ---- ContinualTrainer -------------------------------------------------------------------------
def _trainer(tmp_path, model, strategies, **args):
    rows = token_batches(n_batches=1, batch=8, length=10, seed=3)[0]
    data = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        dataloader_drop_last=True,
    )  # fmt: skip
    return ContinualTrainer(
        model=model,
        args=TrainingArguments(**{**defaults, **args}),
        train_dataset=data,
        strategies=strategies,
    ), rows


def test_gradient_accumulation_gives_the_mean_gradient(tmp_path):
    """The same step with 2 micro-batches of 2 as with 1 batch of 4 (equal lengths, all labelled)."""
    model = tiny_llm()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, rows = _trainer(tmp_path, model, [L2(lambda_=1.0)], gradient_accumulation_steps=2)
    seen = []  # the micro-batches the Trainer drew
    original = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append({key: v.clone() for key, v in inputs.items()})
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    reference = tiny_llm()
    merged = {k: torch.cat([s[k] for s in seen]) for k in seen[0]}
    reference(**merged).loss.backward()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(
            model.state_dict()[n], start[n] - 0.1 * p.grad, rtol=1e-4, atol=1e-6
        )


def test_trainer_runs_the_hooks_and_evaluation_has_no_penalty(tmp_path):
    model = tiny_lora()
    strategies = build_strategies("ewc+si", {"ewc": {"fisher_samples": 4}})
    trainer, rows = _trainer(
        tmp_path, model, strategies, max_steps=3, learning_rate=1e-2, optim="adamw_torch"
    )
    trainer.train()
    ewc, si = strategies
    assert ewc.tasks == 1 and si.tasks == 1
    assert any(
        float(v.sum()) > 0 for k, v in si.state_dict().items() if k.startswith("importance.")
    )
    trainer.train()  # a second task: now both penalties are active while training
    for s in strategies:
        s.before_task(model)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05)
    batch = {k: v[:2] for k, v in rows.items()}
    model.eval()
    plain = model(**batch).loss
    torch.testing.assert_close(trainer.compute_loss(model, batch), plain)
    model.train()
    assert float(trainer.compute_loss(model, batch).detach()) > float(plain.detach())


# ---- a release later: the old adapter merged, a fresh one on --------------------------------
@pytest.mark.parametrize("spec", ["ewc", "si", "hlr"])
def test_reanchor_after_a_merge_anchors_to_the_fresh_adapter(spec, tmp_path):
    """After the champion's adapter is merged and a fresh one (ΔW = 0) is put on, the old end of
    task is the new adapter's start: reanchored, the penalty is 0 there; loaded as saved, it would
    pull the fresh adapter toward the old adapter's values (re-adding the merged update)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_lora()
    strategies = build_strategies(spec)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_task(model, token_batches(seed=0), strategies, optimizer, lm_loss)
    save_strategies(strategies, tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    merged = model.merge_and_unload()

    def penalty_at_start(reanchor: bool) -> float:
        fresh = get_peft_model(merged, config)
        loaded = build_strategies(spec)
        load_strategies(loaded, tmp_path)
        if reanchor:
            loaded[0].reanchor(fresh)
        loaded[0].before_task(fresh)
        batch = token_batches(seed=1)[0]
        term = loaded[0].extra_loss(fresh, batch, fresh(**batch))
        fresh.unload()  # take the fresh adapter off again for the next call
        return float(term.detach())

    assert penalty_at_start(reanchor=False) > 0
    assert penalty_at_start(reanchor=True) == 0.0


# ---- typed options: the replay and distillation family ----------------------------------------
@pytest.mark.parametrize(
    "name, option, bad",
    [
        ("replay", "buffer_size", -1),
        ("replay", "ratio", "abc"),
        ("der", "alpha", "abc"),
        ("der", "top_k", 0),
        ("der", "logit_dtype", "float64"),
        ("der", "logit_loss", "l1"),
        ("der", "temperature", 0),
        ("lwf", "alpha", -0.5),
        ("self_rehearsal", "max_new_tokens", 0),
        ("self_rehearsal", "distill_alpha", -1),
        ("label_smoothing", "epsilon", -0.1),
        ("wise", "mix", 2),
    ],
)
def test_replay_family_options_are_checked_by_name_and_directly(name, option, bad):
    pattern = rf"strategy '{name}': option '{option}'"
    with pytest.raises(StrategyOptionError, match=pattern):
        build_strategies(name, {name: {option: bad}})
    with pytest.raises(StrategyOptionError, match=pattern):
        STRATEGIES[name](**{option: bad})


def test_der_options_convert_numeric_strings_and_refuse_the_rest():
    with pytest.raises(StrategyOptionError, match=r"strategy 'der': option 'alpha': .*number"):
        build_strategies("der", {"der": {"alpha": "abc"}})
    with pytest.raises(
        StrategyOptionError, match=r"strategy 'der': option 'alpha': .*greater than or equal to 0"
    ):
        DER(alpha=-1)
    (der,) = build_strategies("der", {"der": {"alpha": "1e-3", "top_k": "8", "temperature": "2"}})
    assert (der.alpha, der.top_k, der.temperature) == (0.001, 8, 2.0)
    assert isinstance(der.alpha, float) and der.logit_dtype == torch.float16
