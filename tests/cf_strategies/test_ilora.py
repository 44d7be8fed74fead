"""I-LoRA: the slow learner's interpolation, the consistency term, replay from the buffer, saved
state, the kept (merged) model and composition inside the ContinualTrainer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments

from cf_strategies import ContinualTrainer, build_strategies, ilora, train_task
from cf_strategies.base import TaskContext, trainable_parameters
from cf_strategies.buffer import collate, unbatch
from cf_strategies.registry import StrategyOptionError
from cf_strategies.trainer import train_step
from tests.cf_strategies.tiny_models import lm_loss, tiny_llm, tiny_lora, token_batch


def _fast(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def _sgd(model, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr)


def _record_draws(strategy: ilora.ILoRA) -> list[list[dict]]:
    """Every draw the strategy makes from its buffer, in order."""
    draws, draw = [], strategy.draw

    def spy(batch):
        drawn = draw(batch)
        draws.append(drawn)
        return drawn

    strategy.draw = spy
    return draws


@torch.no_grad()
def _hidden_states_with(model, weights, batch):
    """The model's hidden states (eval mode) with ``weights`` as its trainable parameters."""
    params = trainable_parameters(model)
    kept = {n: p.detach().clone() for n, p in params.items()}
    for n, t in weights.items():
        params[n].copy_(t)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    model.train()
    for n, t in kept.items():
        params[n].copy_(t)
    return hidden


# ---- the slow learner: θ_s ← λ·θ_s + (1 − λ)·θ_f after every optimizer step ---------------------
def test_slow_learner_after_one_step_is_the_interpolation():
    model = tiny_lora()
    (strategy,) = build_strategies("ilora", {"ilora": {"lambda_": 0.3, "warmup": False}})
    strategy.before_task(model)
    before = _fast(model)
    assert all(torch.equal(strategy.slow[n], before[n]) for n in before)  # both start equal
    train_step(model, token_batch(4), [strategy], _sgd(model), lm_loss)
    after = _fast(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if ".lora_B." in n)
    for n in after:
        expected = 0.3 * before[n] + (1 - 0.3) * after[n]
        torch.testing.assert_close(strategy.slow[n], expected, rtol=1e-6, atol=1e-9)
        other_way = 0.3 * after[n] + (1 - 0.3) * before[n]  # λ on the fast side: not ours
        if ".lora_B." in n:
            assert not torch.allclose(strategy.slow[n], other_way, rtol=1e-4, atol=1e-7), n
    assert all(torch.equal(p, after[n]) for n, p in trainable_parameters(model).items())


def test_warmup_makes_the_slow_learner_the_running_mean_until_lambda():
    model = tiny_lora()
    (strategy,) = build_strategies("ilora", {"ilora": {"lambda_": 0.99}})  # warmup by default
    strategy.before_task(model)
    trajectory = [_fast(model)]
    opt = _sgd(model)
    for seed in range(3):
        train_step(model, token_batch(4, seed=seed), [strategy], opt, lm_loss)
        trajectory.append(_fast(model))
    for n in trajectory[0]:  # λ_t = t/(t+1): the mean of θ_0 … θ_3
        mean = torch.stack([theta[n] for theta in trajectory]).mean(0)
        torch.testing.assert_close(strategy.slow[n], mean, rtol=1e-5, atol=1e-7)
    capped = ilora.ILoRA(lambda_=0.6)
    assert [capped.interpolation_weight(t) for t in (1, 2, 3)] == [0.5, 0.6, 0.6]
    assert ilora.ILoRA(lambda_=0.6, warmup=False).interpolation_weight(1) == 0.6


def test_options_are_checked():
    with pytest.raises(StrategyOptionError, match="lambda_"):
        build_strategies("ilora", {"ilora": {"lambda_": 1.5}})
    with pytest.raises(StrategyOptionError, match="consistency_weight"):
        build_strategies("ilora", {"ilora": {"consistency_weight": -1}})


# ---- the consistency term ----------------------------------------------------------------------
def test_consistency_loss_is_zero_at_the_slow_learner_with_zero_gradient():
    g = torch.Generator().manual_seed(0)
    slow = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    fast = [h.clone().requires_grad_() for h in slow]
    loss = ilora.consistency_loss(fast, slow, torch.ones(2, 3))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(not h.grad.any() for h in fast)


def test_consistency_loss_value_and_gradient_by_hand():
    # one layer, batch 1, two positions of which the second is padding, two features
    fast = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]], requires_grad=True)
    slow = torch.tensor([[[0.0, 4.0], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[1, 0]])
    loss = ilora.consistency_loss([fast], [slow], mask)
    assert float(loss.detach()) == pytest.approx((1.0**2 + 2.0**2) / 2)  # padding not counted
    loss.backward()
    # d/dh_f of mean((h_f − h_s)²) = 2·(h_f − h_s)/N: a descent step moves h_f toward h_s
    assert torch.equal(fast.grad, torch.tensor([[[1.0, -2.0], [0.0, 0.0]]]))
    assert slow.grad is None  # the slow learner is a target only
    # the authors' one-sided target max(h_f, h_s): only where the fast one is below counts
    fast.grad = None
    one_sided = ilora.consistency_loss([fast], [slow], mask, one_sided=True)
    assert float(one_sided.detach()) == pytest.approx(2.0**2 / 2)
    one_sided.backward()
    assert torch.equal(fast.grad, torch.tensor([[[0.0, -2.0], [0.0, 0.0]]]))
    # several hidden states: the mean of their means
    two = ilora.consistency_loss([fast, fast], [slow, fast.detach()], mask)
    assert float(two.detach()) == pytest.approx(2.5 / 2)


# ---- replay from the buffer --------------------------------------------------------------------
def test_buffer_is_filled_from_the_task_and_replayed():
    model = tiny_lora()
    (strategy,) = build_strategies("ilora", {"ilora": {"buffer_size": 6, "ratio": 0.5}})
    draws = _record_draws(strategy)
    first = [token_batch(4, seed=s) for s in range(3)]
    opt = _sgd(model)
    train_task(model, first, [strategy], opt, lm_loss)
    assert all(d == [] for d in draws)  # the first task: nothing to replay yet
    assert len(strategy.buffer) == 6 and strategy.buffer.tasks == [0] * 6 and strategy.task == 1
    rows = {tuple(ex["input_ids"].tolist()) for b in first for ex in unbatch(b)}
    assert {tuple(ex["input_ids"].tolist()) for ex in strategy.buffer.examples} <= rows

    draws.clear()
    terms = []
    extra_loss = strategy.extra_loss

    def recorded(*args):
        terms.append(extra_loss(*args))
        return terms[-1]

    strategy.extra_loss = recorded
    train_task(model, [token_batch(4, seed=10 + s) for s in range(2)], [strategy], opt, lm_loss)
    assert [len(d) for d in draws] == [2, 2]  # round(0.5 · 4) old rows per step
    for drawn in draws:
        for ex in drawn:
            assert tuple(ex["input_ids"].tolist()) in rows
    assert len(terms) == 2
    assert all(t is not None and torch.isfinite(t) and t.requires_grad for t in terms)
    assert len(strategy.buffer) == 6 and sorted(set(strategy.buffer.tasks)) == [0, 1]


@pytest.mark.parametrize("layers", [None, [-1], [1, 2]])
def test_extra_loss_is_replay_ce_plus_weighted_consistency(layers):
    model = tiny_lora()
    options = {"buffer_size": 4, "ratio": 1.0, "consistency_weight": 3.0, "layers": layers}
    (strategy,) = build_strategies("ilora", {"ilora": options})
    strategy.after_task(model, [token_batch(4, prompt=(3, 7), answer=(2, 5), seed=1)])
    strategy.before_task(model)
    draws = _record_draws(strategy)
    batch = token_batch(4, seed=2)

    # fast == slow: the consistency term is zero, the replay CE is left
    term = strategy.extra_loss(model, batch, None)
    replay = collate(draws[-1])
    torch.testing.assert_close(term, model(**replay).loss)

    # a moved fast learner: replay CE + γ · mean over the chosen hidden states of the MSE
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.2 * torch.randn_like(p))

    def expected(replay):
        mask = replay["attention_mask"].bool()
        assert not mask.all()  # replayed rows of different lengths: padding is left out
        fast_hidden = _hidden_states_with(model, _fast(model), replay)
        slow_hidden = _hidden_states_with(model, strategy.slow, replay)
        chosen = range(len(fast_hidden)) if layers is None else layers
        mse = sum(((fast_hidden[i] - slow_hidden[i]) ** 2)[mask].mean() for i in chosen)
        return model(**replay).loss, mse / len(chosen)

    term = strategy.extra_loss(model, batch, None)
    ce, mse = expected(collate(draws[-1]))
    assert float(mse) > 0
    torch.testing.assert_close(term, ce + 3.0 * mse, rtol=1e-5, atol=1e-6)

    strategy.replay_weight = 0.0  # consistency alone
    term = strategy.extra_loss(model, batch, None)
    torch.testing.assert_close(term, 3.0 * expected(collate(draws[-1]))[1], rtol=1e-5, atol=1e-6)


# ---- state across releases ---------------------------------------------------------------------
def test_state_round_trips_and_the_buffer_carries_to_the_next_release(tmp_path):
    model = tiny_lora()
    options = {"ilora": {"buffer_size": 5, "ratio": 0.5, "seed": 3}}
    (strategy,) = build_strategies("ilora", options)
    strategy.prepare(TaskContext(release="v1", pad_token_id=0))
    train_task(model, [token_batch(4, seed=s) for s in range(2)], [strategy], _sgd(model), lm_loss)
    strategy.save(tmp_path / "release-1")
    assert sorted(p.name for p in (tmp_path / "release-1").iterdir()) == [
        "ilora.json",
        "ilora.safetensors",
    ]

    (loaded,) = build_strategies("ilora", options)
    loaded.load(tmp_path / "release-1")
    loaded.reanchor(model)
    assert loaded.task == 1 and loaded.buffer.versions == {0: "v1"}
    assert loaded.buffer.fingerprint() == strategy.buffer.fingerprint()
    saved, back = strategy.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(v, back[k]) for k, v in saved.items() if torch.is_tensor(v))
    # the next release continues from it: the same draws and the same term
    for s in (strategy, loaded):
        s.before_task(model)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05)
    batch = token_batch(4, seed=7)
    a, b = strategy.extra_loss(model, batch, None), loaded.extra_loss(model, batch, None)
    assert torch.equal(a, b) and float(a.detach()) > 0


# ---- what is kept: the slow learner, in the one adapter ----------------------------------------
def test_the_kept_and_merged_model_is_the_slow_learner_in_one_adapter():
    model = tiny_lora()
    n_params = sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    base = {k: v.clone() for k, v in tiny_llm().state_dict().items()}
    (strategy,) = build_strategies("ilora", {"ilora": {"lambda_": 0.5, "buffer_size": 4}})
    opt = _sgd(model)
    for task in range(2):
        data = [token_batch(4, seed=10 * task + s) for s in range(3)]
        strategy.before_task(model, data)
        for batch in data:
            train_step(model, batch, [strategy], opt, lm_loss)
        slow, fast = dict(strategy.slow), _fast(model)
        assert any(not torch.equal(slow[n], fast[n]) for n in fast)
        strategy.after_task(model, data)
        kept = _fast(model)
        assert all(torch.equal(kept[n], slow[n]) for n in kept)  # θ_s kept, θ_f discarded
    assert strategy.slow == {}  # nothing held between tasks

    # inference cost of one LoRA model: no second adapter, no extra parameter
    assert list(model.peft_config) == ["default"]
    assert [n for n, _ in model.named_parameters()] == names
    assert sum(p.numel() for p in model.parameters()) == n_params
    scale = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    merged = model.merge_and_unload()
    assert merged.state_dict().keys() == base.keys()
    prefix = "model.layers.0.self_attn.q_proj"
    a, b = (kept[f"base_model.model.{prefix}.lora_{x}.default.weight"] for x in "AB")
    torch.testing.assert_close(
        merged.state_dict()[f"{prefix}.weight"], base[f"{prefix}.weight"] + scale * b @ a
    )


# ---- composition inside the ContinualTrainer ---------------------------------------------------
def test_ilora_plus_label_smoothing_trains_in_the_continual_trainer(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llm(), config)  # as the fine-tune step builds it
    n_params = sum(p.numel() for p in model.parameters())
    strategies = build_strategies(
        "ilora+label_smoothing",
        {"ilora": {"buffer_size": 6, "ratio": 0.5}, "label_smoothing": {"epsilon": 0.1}},
    )
    strategy, smoothing = strategies
    draws = _record_draws(strategy)
    smoothed = []
    smoothing_loss = smoothing.extra_loss

    def record_smoothing(*args):
        smoothed.append(smoothing_loss(*args))
        return smoothed[-1]

    smoothing.extra_loss = record_smoothing
    kept_slow = []
    after_task = strategy.after_task

    def record_after_task(model, data=None):
        kept_slow.append({n: t.clone() for n, t in strategy.slow.items()})
        after_task(model, data)

    strategy.after_task = record_after_task
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    for task in range(2):
        rows = [
            {k: v.tolist() for k, v in ex.items()}
            for s in range(3)
            for ex in unbatch(token_batch(4, seed=10 * task + s))
        ]
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=lambda features: collate(
                [{k: torch.tensor(v) for k, v in f.items()} for f in features]
            ),
            strategies=strategies,
        )
        start = _fast(model)
        result = trainer.train()
        assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
        assert any(not torch.equal(start[n], p) for n, p in _fast(model).items())
        assert strategy.steps == 3  # the slow learner moved once per optimizer step
        kept = _fast(model)
        assert all(torch.equal(kept[n], kept_slow[-1][n]) for n in kept)
    assert strategy.task == 2 and len(strategy.buffer) == 6
    assert [len(d) for d in draws] == [0] * 3 + [2] * 3  # replay from the second task on
    assert len(smoothed) == 6 and all(t is not None and t.requires_grad for t in smoothed)
    assert list(model.peft_config) == ["default"]
    assert sum(p.numel() for p in model.parameters()) == n_params
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = tiny_llm().state_dict()  # the base model's tensors, nothing more
    assert saved.keys() == reference.keys()
    assert all(saved[k].shape == reference[k].shape for k in saved)
