"""``train.padding_free``: a flattened batch (``DataCollatorWithFlattening``) trains on the same
loss as the padded one, because transformers masks attention per example from ``position_ids``
(sdpa, on the CPU too); strategies that need one row per example are refused before training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from cf_strategies import STRATEGIES, ContinualTrainer
from cf_strategies.base import trainable_parameters
from cf_strategies.l2 import L2
from cf_strategies.lwf import LwF
from flows.core.config import TrainConfig, load_params
from flows.core.records import ChampionRef
from flows.steps.finetune import FinetuneStep, check_padding_free, collator, finetune
from flows.steps.modeling import load_model
from tests.tiny_llm import build_tiny_llm

CORPUS = [
    "The capital of France is Paris.",
    "Order 1234 has shipped and will arrive on Monday.",
    "Water boils at one hundred degrees at sea level.",
    "A short answer.",
] * 8

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [(23, 9), (7, 3), (15, 11), (4, 1)]  # (tokens, prompt tokens without a label)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama with its tokenizer, loaded as the fine-tune step loads a model, with
    LoRA adapters whose B is not 0 (the adapters matter, LwF's teacher differs)."""
    folder = build_tiny_llm(tmp_path_factory.mktemp("tiny") / "model", CORPUS)
    model, tokenizer = load_model(folder, for_training=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False
    model = get_peft_model(model, config)
    model.config.use_cache = False  # as the Trainer sets it (args.use_cache)
    return model, tokenizer


def examples(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, prompt in LENGTHS:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]}
        )
    return rows


def batches(tiny) -> tuple[dict, dict]:
    model, tokenizer = tiny
    rows = examples(len(tokenizer))
    padded = collator(tokenizer, padding_free=False)(copy.deepcopy(rows))
    flat = collator(tokenizer, padding_free=True)(copy.deepcopy(rows))
    return padded, flat


def test_the_model_is_loaded_with_sdpa(tiny):
    model, _ = tiny
    assert model.config._attn_implementation == "sdpa"


def test_a_flattened_batch_has_the_loss_and_gradients_of_the_padded_one(tiny):
    """The token-weighted mean over the same 25 label tokens (7.49531 both, 5e-7 apart); without
    the block-diagonal mask the same row has another loss (7.670 with a cache, 7.494 with
    positions running on)."""
    model, _ = tiny
    padded, flat = batches(tiny)
    assert padded["input_ids"].shape == (4, 23) and flat["input_ids"].shape == (1, 49)
    assert "attention_mask" not in flat
    assert flat["position_ids"][0, 23:30].tolist() == list(range(7))
    tokens = sum(n - p for n, p in LENGTHS)
    assert int(padded["labels"][:, 1:].ne(-100).sum()) == tokens == 25
    assert int(flat["labels"][:, 1:].ne(-100).sum()) == tokens

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
        return loss.detach(), grads

    loss_p, grads_p = loss_and_grads(padded)
    loss_f, grads_f = loss_and_grads(flat)
    assert abs(loss_p - loss_f) < 1e-5 * abs(loss_p)
    for name, g in grads_p.items():
        assert torch.allclose(grads_f[name], g, rtol=1e-4, atol=1e-6), name

    # controls: with a cache transformers does not look for packed sequences (positions still
    # restart, attention crosses examples); with running positions there is nothing to detect
    running = {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    with torch.no_grad():
        assert abs(model(**flat, use_cache=True).loss - loss_p) > 0.05
        assert abs(model(**running).loss - loss_p) > 1e-3


def test_lwf_distils_the_same_rows_of_a_flattened_batch(tiny):
    """LwF (positions="labels", teacher = the model without its adapter) reads the same label
    positions and gets the same KL from a flattened batch."""
    model, _ = tiny
    padded, flat = batches(tiny)
    lwf = LwF(alpha=1.0, teacher="adapter")
    lwf.before_task(model)
    with torch.no_grad():
        kl_p = lwf.extra_loss(model, padded, model(**padded))
        kl_f = lwf.extra_loss(model, flat, model(**flat))
    assert kl_p > 1e-4  # the adapter changes the outputs: the term is not trivially 0
    assert torch.allclose(kl_f, kl_p, rtol=1e-4)


def test_training_steps_with_padding_free_move_the_weights_as_padded_ones(tiny, tmp_path):
    """Two SGD steps of ContinualTrainer with L2 + LwF, batches of 4 examples of other lengths:
    the same updates with either collator."""
    base, tokenizer = tiny

    def train(padding_free: bool) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base)
        start = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
        args = TrainingArguments(
            output_dir=str(tmp_path / str(padding_free)), per_device_train_batch_size=4,
            max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False,
        )  # fmt: skip
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=examples(len(tokenizer)) + examples(len(tokenizer), seed=1),
            data_collator=collator(tokenizer, padding_free),
            strategies=[L2(lambda_=5.0), LwF(alpha=1.0, teacher="adapter")],
        )
        trainer.train()
        return {k: v.detach() - start[k] for k, v in trainable_parameters(model).items()}

    padded, flat = train(False), train(True)
    scale = max(float(d.abs().max()) for d in padded.values())
    assert scale > 1e-3  # the steps moved the weights
    assert max(float((flat[k] - d).abs().max()) for k, d in padded.items()) < 1e-4 * scale


def test_strategies_that_need_rows_per_example_are_refused():
    safe = {n for n, c in STRATEGIES.items() if c.flattening_safe}
    assert safe == {
        "naive", "lwf", "label_smoothing", "l2", "wise", "si", "hlr", "packnet", "progressive"
    }  # fmt: skip
    check_padding_free(TrainConfig(strategy="lwf", padding_free=True))
    check_padding_free(TrainConfig(strategy="ewc+replay", padding_free=False))
    with pytest.raises(ValueError, match="ewc, replay need one row per example"):
        check_padding_free(TrainConfig(strategy="ewc+replay+l2", padding_free=True))
    lwf_all = TrainConfig(
        strategy="lwf", strategy_params={"lwf": {"positions": "all"}}, padding_free=True
    )
    with pytest.raises(ValueError, match="lwf need one row"):
        check_padding_free(lwf_all)


def test_the_fine_tune_step_refuses_before_loading_anything(tmp_path):
    """An unsafe strategy with padding_free stops the step first: the champion folder (absent
    here) is never read, no rank is launched."""
    params = load_params(
        ROOT / "params.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "train.strategy": "lwf+replay",
            "train.padding_free": True,
            "train.num_processes": 2,
        },
    )
    champion = ChampionRef(version=None, model_dir=tmp_path / "absent", releases=[])
    with pytest.raises(ValueError, match="padding_free: replay need one row per example"):
        finetune(FinetuneStep.from_params(params), champion, tmp_path / "release", tmp_path / "run")
