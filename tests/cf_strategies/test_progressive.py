"""Progressive columns: the documented formula in both stream modes, earlier columns frozen and
without gradient, each task answering exactly as it did when it ended, the state rebuilding every
task on the base model, and ContinualTrainer on a LoRA Llama."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from cf_strategies import ContinualTrainer, build_strategies, train_task
from cf_strategies.base import BASE, TaskContext, using_task
from cf_strategies.progressive import Progressive
from cf_strategies.registry import StrategyOptionError
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    ce_loss,
    class_batches,
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_llm,
    tiny_lora,
    tiny_mlp,
    token_batches,
)


def _task_data(t: int) -> list[dict[str, torch.Tensor]]:
    return class_batches(3, n=8, classes=(0, 1), task=t, seed=10 + t)


def _probe(t: int) -> dict[str, torch.Tensor]:
    return class_batches(1, n=16, classes=(0, 1), task=t, seed=99)[0]


@torch.no_grad()
def _answer(model, batch) -> torch.Tensor:
    return model(batch["x"], batch["task"])


def _learn(model, strategy, data, loss, epochs=2, lr=0.05):
    """One task in a plain loop: the column first, then the optimizer (with weight decay)."""
    strategy.add_column(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.5)
    return train_task(model, data, [strategy], opt, loss, epochs=epochs)


@pytest.mark.parametrize("streams", ["own", "shared"])
def test_earlier_tasks_answer_bit_identically_after_later_tasks(streams):
    model, progressive = TinyClassifier(), Progressive(rank=4, streams=streams)
    probes = [_probe(t) for t in range(3)]
    right_after, later = {}, {0: [], 1: []}
    for t in range(3):
        _learn(model, progressive, _task_data(t), ce_loss)
        right_after[t] = _answer(model, probes[t])
        for k in range(t):
            with using_task([progressive], model, k):
                later[k].append(_answer(model, probes[k]))
        assert torch.equal(_answer(model, probes[t]), right_after[t])  # the latest restored
    for k, outs in later.items():
        assert all(torch.equal(out, right_after[k]) for out in outs)
    # column 2 answers task 0's inputs otherwise: the selection matters
    assert not torch.equal(_answer(model, probes[0]), right_after[0])


def _reference(model, progressive, x, t: int) -> torch.Tensor:
    """Column t's answer on :func:`tiny_mlp` computed by hand from the module docstring."""
    layers, names = [model[0], model[2]], ["0", "2"]
    scale = progressive.alpha / progressive.rank
    cols = [progressive.columns[n] for n in names]

    def bottleneck(c, k, h, earlier):
        z = h @ c.A[k].T
        if k:
            z = z + torch.relu(torch.cat(earlier, -1)) @ c.U[str(k)].T
        return z

    if progressive.streams == "shared":
        h = x
        for i, (layer, c) in enumerate(zip(layers, cols, strict=True)):
            zs = []
            for k in range(t + 1):
                zs.append(bottleneck(c, k, h, zs[:k]))
            h = h @ layer.weight.T + layer.bias
            h = h + scale * zs[t] @ c.B[t].T
            h = torch.tanh(h) if i == 0 else h
        return h
    hs = [x] * (t + 1)  # own: one stream per column
    for i, (layer, c) in enumerate(zip(layers, cols, strict=True)):
        zs = []
        for k in range(t + 1):
            zs.append(bottleneck(c, k, hs[k], zs[:k]))
        hs = [hs[k] @ layer.weight.T + layer.bias + scale * zs[k] @ c.B[k].T for k in range(t + 1)]
        hs = [torch.tanh(h) for h in hs] if i == 0 else hs
    return hs[t]


@pytest.mark.parametrize("streams", ["own", "shared"])
def test_columns_compute_the_documented_formula(streams):
    model, progressive = tiny_mlp(), Progressive(rank=3, alpha=6.0, streams=streams)
    for t in range(3):
        _learn(model, progressive, mlp_batches(seed=t), mlp_loss)
    x = mlp_batches(1, seed=9)[0][0]
    with torch.no_grad():
        for t in range(3):
            assert float(progressive.columns["2"].B[t].abs().sum()) > 0
            if t:
                assert float(progressive.columns["2"].U[str(t)].abs().sum()) > 0
            progressive.use_task(model, t)
            torch.testing.assert_close(model(x), _reference(model, progressive, x, t))


def test_own_streams_differ_from_shared_ones_from_the_second_column_on():
    torch.manual_seed(0)
    model, own = tiny_mlp(), Progressive(rank=3, streams="own")
    for t in range(2):
        _learn(model, own, mlp_batches(seed=t), mlp_loss)
    x = mlp_batches(1, seed=9)[0][0]
    shared = Progressive(rank=3, streams="shared")
    shared.load_state_dict({**own.state_dict(), "streams": "shared"})
    with torch.no_grad():
        own.use_task(model, 0)
        first = model(x)
        with pytest.raises(ValueError, match="columns of another progressive strategy"):
            shared.use_task(model, 0)
        own.detach(model)
        shared.use_task(model, 0)
        assert torch.equal(model(x), first)  # one column: the same model
        shared.use_task(model, 1)
        approx = model(x)
        shared.detach(model)
        own.use_task(model, 1)
        exact = model(x)
    assert not torch.allclose(approx, exact)
    torch.testing.assert_close(exact, _reference(model, own, x, 1))


def test_earlier_columns_and_the_base_get_no_gradient_and_never_move():
    model, progressive = tiny_mlp(), Progressive(rank=3)
    for t in range(2):
        _learn(model, progressive, mlp_batches(seed=t), mlp_loss)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = progressive.add_column(model)
    new_ids = {id(p) for p in new}
    assert len(new) == 2 * 3 and all(p.requires_grad for p in new)  # A, B, U on two layers
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    progressive.before_task(model)
    for step, (x, y) in enumerate(mlp_batches(seed=2) * 2):
        loss, _ = mlp_loss(model, (x, y))
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if id(p) in new_ids:
                assert p.grad is not None
                if step or ".B." in name:  # at B = 0 only B has a gradient at first
                    assert float(p.grad.abs().sum()) > 0, name
            else:
                assert p.grad is None and not p.requires_grad, name
        progressive.after_backward(model)
        opt.step()
        progressive.after_step(model)
    progressive.after_task(model)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name
    assert not any(p.requires_grad for p in model.parameters())


def test_an_optimizer_built_before_the_new_column_is_a_clear_error():
    model, progressive = tiny_mlp(), Progressive(rank=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # before the column exists
    with pytest.raises(RuntimeError, match=r"3 optimizer steps.*not in the optimizer.*add_column"):
        train_task(model, mlp_batches(4), [progressive], opt, mlp_loss)


def test_a_warm_up_from_a_zero_learning_rate_is_not_mistaken_for_it():
    model, progressive = tiny_mlp(), Progressive(rank=3)
    progressive.before_task(model)  # the new column, then the optimizer over it
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 2))  # 0 first
    for batch in mlp_batches(4):
        loss, _ = mlp_loss(model, batch)
        loss.backward()
        opt.step()
        progressive.after_step(model)  # the first step moved nothing: lr was 0
        warmup.step()
        opt.zero_grad()
    progressive.after_task(model)
    assert progressive.tasks == ["task-0"]


def _lora_llama() -> torch.nn.Module:
    """A tiny Llama with a fresh peft adapter (B = 0), as the pipeline puts on the champion."""
    return get_peft_model(tiny_llm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("streams", ["own", "shared"])
def test_state_round_trip_rebuilds_every_task_on_the_plain_base(streams, tmp_path):
    model, progressive = _lora_llama(), Progressive(rank=4, streams=streams)
    probe = {"input_ids": token_batches(1, seed=7)[0]["input_ids"]}
    answers = []
    for t, release in enumerate(["r1", "r2", "r3"]):
        progressive.prepare(TaskContext(release=release))
        _learn(model, progressive, token_batches(2, seed=t), lm_loss, lr=0.02)
        with torch.no_grad():
            answers.append(model(**probe).logits)
    assert list(progressive.columns) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]  # the peft adapter's targets, named as in the base model
    progressive.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"progressive.json", "progressive.safetensors"}

    base = tiny_llm()  # the unmerged base, no adapter
    loaded = Progressive(rank=4, streams=streams)
    loaded.load(tmp_path)
    assert loaded.tasks == ["r1", "r2", "r3"]
    for t, release in enumerate(["r1", "r2", "r3"]):
        for task in (t, release):
            loaded.use_task(base, task)
            with torch.no_grad():
                assert torch.equal(base(**probe).logits, answers[t])
    assert not torch.equal(answers[0], answers[2])
    with using_task([loaded], base, BASE), torch.no_grad():  # no column: the base answers
        assert not any("progressive" in n for n, _ in base.named_parameters())
        assert torch.equal(base(**probe).logits, tiny_llm()(**probe).logits)
    assert torch.equal(base(**probe).logits, answers[2])  # and the latest again after it
    loaded.detach(base)
    assert not any("progressive" in n for n, _ in base.named_parameters())
    with torch.no_grad():
        assert torch.equal(base(**probe).logits, tiny_llm()(**probe).logits)  # base untouched
    with pytest.raises(ValueError, match="trained with rank=4, not 8"):
        Progressive(rank=8, streams=streams).load(tmp_path)


def test_runs_inside_continual_trainer_on_a_lora_llama(tmp_path):
    model = tiny_lora()  # its adapter (B ≠ 0) is frozen with the base
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    (progressive,) = build_strategies("progressive", {"progressive": {"rank": "4"}})
    probe = {"input_ids": token_batches(1, seed=7)[0]["input_ids"]}
    answers = []
    for t in range(2):
        rows = token_batches(n_batches=1, batch=8, length=10, seed=3 + t)[0]
        data = [{k: v[i] for k, v in rows.items()} for i in range(8)]
        args = TrainingArguments(
            output_dir=str(tmp_path / str(t)), per_device_train_batch_size=2, max_steps=4,
            learning_rate=0.05, weight_decay=0.1, max_grad_norm=1.0, report_to=[],
            save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        )  # fmt: skip
        ContinualTrainer(
            model=model, args=args, train_dataset=data, strategies=[progressive]
        ).train()
        model.eval()
        with torch.no_grad():
            answers.append(model(**probe).logits)
    assert len(progressive.parameter_counts()) == 2
    for name, p in model.named_parameters():
        if name in adapter:  # the peft adapter was frozen: it never trained
            assert torch.equal(p.detach(), adapter[name])
    with using_task([progressive], model, 0), torch.no_grad():
        assert torch.equal(model(**probe).logits, answers[0])
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, answers[1])
    assert not torch.equal(answers[0], answers[1])
    # generation: the own-stream passes cannot share a KV cache; attached columns turn it off
    prompt = probe["input_ids"][:1, :5]
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, use_cache=True)
    out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    assert torch.equal(
        out, model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    )
    config = model.get_base_model().generation_config
    assert config.use_cache is False
    progressive.detach(model)  # the model's own setting is back
    assert config.use_cache is True


def test_shared_streams_generate_with_a_kv_cache():
    model, progressive = _lora_llama(), Progressive(rank=4, streams="shared")
    for t in range(2):
        _learn(model, progressive, token_batches(2, seed=t), lm_loss, lr=0.02)
    model.eval()
    prompt = token_batches(1, seed=7)[0]["input_ids"][:1, :5]
    cached = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    plain = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_parameter_counts_per_column():
    model, progressive = tiny_mlp(d_in=8, hidden=16, classes=4), Progressive(rank=3)
    for t in range(3):
        _learn(model, progressive, mlp_batches(seed=t), mlp_loss, epochs=1)
    low_rank = 3 * (8 + 16) + 3 * (16 + 4)  # r·(d_in + d_out) per layer
    assert progressive.parameter_counts() == [low_rank + 2 * t * 3 * 3 for t in range(3)]


def test_options_are_typed_and_use_task_is_refused_during_a_task():
    with pytest.raises(StrategyOptionError, match="strategy 'progressive': option 'streams'"):
        build_strategies("progressive", {"progressive": {"streams": "both"}})
    with pytest.raises(StrategyOptionError, match="strategy 'progressive': option 'rank'"):
        Progressive(rank=0)
    with pytest.raises(ValueError, match="no target layer found"):
        Progressive(target_modules=["q_proj"]).add_column(tiny_mlp())
    model, progressive = tiny_mlp(), Progressive()
    with pytest.raises(ValueError, match="no task learned yet"):
        progressive.use_task(model, 0)
    progressive.before_task(model)
    with pytest.raises(RuntimeError, match="between tasks"):
        progressive.use_task(model, None)
