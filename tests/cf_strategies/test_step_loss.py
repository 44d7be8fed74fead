"""The loss of an optimizer step in ``ContinualTrainer`` (``cf_strategies.trainer``, module doc):
the mean over the step's label tokens, whichever gradient-accumulation micro-batch holds them,
with the strategies' terms weighted by the same shares. Answers of different lengths throughout
(1 to 7 label tokens a row), where a per-micro-batch mean is not the step's mean.

Measured (2 cores): batch 4 × 2 micro-batches against batch 8, ΔW after 2 SGD steps with an L2
penalty and LwF: 2.1e-6 of its largest value; the loss before (each micro-batch's mean, halved):
0.29. One process without accumulation: the loss and gradients of ``total_loss`` bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

from cf_strategies import ContinualTrainer
from cf_strategies.base import trainable_parameters
from cf_strategies.l2 import L2
from cf_strategies.lwf import LwF
from cf_strategies.replay import Replay
from cf_strategies.trainer import causal_lm_loss, label_tokens, total_loss
from tests.cf_strategies.tiny_models import tiny_lora, token_batch

GA_RTOL = 2e-5  # max |ΔW_ga − ΔW_batch| / max |ΔW_batch|: float rounding only (measured 2.1e-6)


def _rows(n: int = 16, seed: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` prompt + answer rows, answers of 1 to 7 tokens, padded to one width."""
    batch = token_batch(n=n, prompt=(3, 6), answer=(1, 7), seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


class PerMicroBatchMean(ContinualTrainer):
    """The loss before ``num_items_in_batch``: each micro-batch's own mean, which the Trainer
    divides by the accumulation steps."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs)


def _train(trainer_class: type[ContinualTrainer], tmp_path, batch: int, accumulation: int):
    """ΔW of the adapter after 2 SGD steps of 8 rows (``batch`` × ``accumulation``)."""
    model = tiny_lora(seed=2)
    start = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=2,
        gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    strategies = [L2(lambda_=20.0), LwF(alpha=1.0)]
    trainer = trainer_class(model=model, args=args, train_dataset=_rows(), strategies=strategies)
    trainer.train()
    return {k: v.detach() - start[k] for k, v in trainable_parameters(model).items()}


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a − b| / max |b| over every tensor."""
    diff = max(float((a[k] - b[k]).abs().max()) for k in b)
    return diff / max(float(b[k].abs().max()) for k in b)


def test_gradient_accumulation_over_answers_of_different_lengths_equals_the_whole_batch(tmp_path):
    """Batch 4 with 2 micro-batches trains as batch 8: the task loss is the sum over the 8 rows'
    label tokens over their number, LwF's term (on the label tokens) likewise, and the L2
    penalty counts once per step (the shares of the micro-batches add up to 1)."""
    rows = torch.stack([r["labels"] for r in _rows()])
    assert len({int(label_tokens({"labels": r[None]})) for r in rows}) > 3  # lengths differ
    whole = _train(ContinualTrainer, tmp_path / "whole", batch=8, accumulation=1)
    assert max(float(d.abs().max()) for d in whole.values()) > 1e-3  # it did train
    accumulated = _train(ContinualTrainer, tmp_path / "ga", batch=4, accumulation=2)
    measured = _relative(accumulated, whole)
    assert measured < GA_RTOL, measured
    # the control: the mean of the micro-batches' means is far off
    old = _train(PerMicroBatchMean, tmp_path / "old", batch=4, accumulation=2)
    assert _relative(old, whole) > 1000 * GA_RTOL


def _trainer(tmp_path, model, strategies) -> ContinualTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return ContinualTrainer(model=model, args=args, strategies=strategies)


def test_one_process_without_accumulation_keeps_the_loss_and_gradients_bit_for_bit(tmp_path):
    """Share 1: with the step's label tokens the loss is ``total_loss``'s as before, replayed
    rows (of other lengths) and the L2 penalty included, and so is every gradient."""
    model = tiny_lora(seed=3)
    replay = Replay(buffer_size=8, ratio=0.5, seed=1)
    replay.buffer.extend(_rows(8, seed=9))
    l2 = L2(lambda_=5.0)
    l2.before_task(model)
    with torch.no_grad():  # away from the anchor: the penalty is not 0
        for p in trainable_parameters(model).values():
            p.add_(0.01)
    batch = token_batch(n=6, prompt=(3, 6), answer=(1, 7), seed=5)
    trainer = _trainer(tmp_path, model, [])
    model.train()

    def loss_and_grads(compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = compute([copy.deepcopy(replay), l2])  # the same draw each time
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable_parameters(model).values()]

    before, grads_before = loss_and_grads(
        lambda strategies: total_loss(model, batch, strategies, causal_lm_loss, 0)[0]
    )

    def with_share(strategies):
        trainer.strategies = strategies
        return trainer.compute_loss(model, batch, num_items_in_batch=label_tokens(batch))

    after, grads_after = loss_and_grads(with_share)
    assert trainer.loss_is_scaled_for_ga  # the Trainer does not divide it again
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_after, strict=True))
    _, _, augmented = total_loss(model, batch, [copy.deepcopy(replay)], causal_lm_loss, 0)
    assert label_tokens(augmented) > label_tokens(batch)  # replayed label tokens in the mean


@pytest.mark.parametrize("augment", [False, True])
def test_the_shares_of_a_step_add_up_to_one(tmp_path, augment):
    """Two micro-batches of 5 and 7 new label tokens (T = 12): shares 5/12 and 7/12; with replay
    each micro-batch's mean also covers its replayed tokens (t' / T'_m = 1 in one process), and
    the shares stay 5/12 and 7/12, so a penalty still counts once."""
    model = tiny_lora()
    strategies = [Replay(buffer_size=4)] if augment else [L2()]
    trainer = _trainer(tmp_path, model, strategies)
    micro = [
        {"labels": torch.tensor([[-100, 4, 5, 6, -100], [-100, -100, 7, 8, -100]])},  # 3 + 2
        {"labels": torch.tensor([[-100, 4, 5, 6, 7, 8, 9, 10]])},  # 7
    ]
    replayed = [{"labels": torch.tensor([[-100, 3, 3, 3, 3, 3, 3, 3]])}] * 2  # 7 more each
    shares = []
    for batch, extra in zip(micro, replayed, strict=True):
        augmented = batch
        if augment:
            width = extra["labels"].shape[1] - batch["labels"].shape[1]
            padded = torch.nn.functional.pad(batch["labels"], (0, width), value=-100)
            augmented = {"labels": torch.cat([padded, extra["labels"]])}
        shares.append(float(trainer.step_share(batch, augmented, torch.tensor(12.0))))
    assert shares == pytest.approx([5 / 12, 7 / 12], rel=1e-6)
    assert sum(shares) == pytest.approx(1.0, rel=1e-6)
