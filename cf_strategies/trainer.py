"""Run strategies inside a transformers ``Trainer`` or a plain torch loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from cf_strategies.base import Batch, Strategy


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops rather than corrupt weights."""


def total_loss(
    model: nn.Module,
    batch: Batch,
    strategies: Sequence[Strategy],
    task_loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]],
    step: int,
) -> tuple[torch.Tensor, Any, Batch]:
    """Task loss on the (possibly augmented) batch plus every strategy's extra term."""
    for strategy in strategies:
        batch = strategy.augment_batch(model, batch)
    loss, outputs = task_loss(model, batch)
    for strategy in strategies:
        extra = strategy.extra_loss(model, batch, outputs)
        if extra is not None:
            loss = loss + extra
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"loss is {loss.detach().item()} at step {step}; stopping before the weights are "
            "damaged (lower the learning rate or check the data of this step)"
        )
    return loss, outputs, batch


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
    """``task_loss`` of a transformers causal LM: its own loss on a batch with ``labels``."""
    outputs = model(**batch)
    return outputs.loss, outputs


class _StrategyCallback(TrainerCallback):
    def __init__(self, strategies: Sequence[Strategy]):
        self.strategies = strategies
        self.model: nn.Module | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for s in self.strategies:
            s.after_backward(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for s in self.strategies:
            s.after_step(self.model)


class ContinualTrainer(Trainer):
    """A ``transformers.Trainer`` that runs a list of strategies around one task.

    ``train()`` calls ``before_task``, trains with ``augment_batch`` / ``extra_loss`` /
    ``after_backward`` / ``after_step`` on every step, then ``after_task`` with the task's
    training batches. Raises :class:`NonFiniteLossError` on a NaN or infinite loss.
    Evaluation (the model in eval mode) gets the plain task loss, without replay or penalties.
    """

    # compute_loss returns the mean loss of one micro-batch (num_items_in_batch is not passed to
    # the model), so the Trainer must divide it by the gradient-accumulation steps; left to None,
    # the Trainer assumes a causal LM's loss is already scaled and the gradient (task loss and
    # penalties alike) comes out gradient_accumulation_steps times too large.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, strategies: Sequence[Strategy] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.strategies = list(strategies)
        self._strategy_callback = _StrategyCallback(self.strategies)
        self._strategy_callback.model = self.model
        self.add_callback(self._strategy_callback)

    def train(self, *args, **kwargs):
        data = self.get_train_dataloader()
        for s in self.strategies:
            s.before_task(self.model, data)
        result = super().train(*args, **kwargs)
        for s in self.strategies:
            s.after_task(self.model, self.get_train_dataloader())
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the task loss alone
            loss, outputs = causal_lm_loss(model, inputs)
            return (loss, outputs) if return_outputs else loss
        self._strategy_callback.model = model
        loss, outputs, _ = total_loss(
            model, inputs, self.strategies, causal_lm_loss, self.state.global_step
        )
        return (loss, outputs) if return_outputs else loss


def train_step(
    model: nn.Module,
    batch: Batch,
    strategies: Sequence[Strategy],
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]],
    step: int = 0,
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, Batch]:
    """One optimizer step with every strategy hook; returns the loss and the batch trained on
    (after ``augment_batch``)."""
    loss, _, trained = total_loss(model, batch, strategies, task_loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    for s in strategies:
        s.after_backward(model)
    optimizer.step()
    for s in strategies:
        s.after_step(model)
    return loss, trained


def train_task(
    model: nn.Module,
    data: Iterable[Batch],
    strategies: Sequence[Strategy],
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]],
    epochs: int = 1,
    max_grad_norm: float | None = None,
) -> list[float]:
    """The same hooks in a plain torch loop, for any ``nn.Module``.

    ``task_loss(model, batch) -> (loss, outputs)``. Returns the total loss of every step.
    """
    for s in strategies:
        s.before_task(model, data)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        for batch in data:
            loss, _ = train_step(
                model, batch, strategies, optimizer, task_loss, len(losses), max_grad_norm
            )
            losses.append(float(loss.detach()))
    for s in strategies:
        s.after_task(model, data)
    return losses
