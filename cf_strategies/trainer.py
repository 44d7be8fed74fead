"""Run strategies inside a transformers ``Trainer`` or a plain torch loop.

Checkpoints (``ContinualTrainer`` with ``save_strategy="steps"``): beside what the Trainer writes
in ``checkpoint-N/`` (the LoRA adapter alone for a peft model, optimizer, scheduler, RNG states,
``trainer_state.json``), every strategy's ``state_dict()`` and ``task_state_dict()`` go into
``checkpoint-N/strategy_state/``, and ``checkpoint.json`` is written last: the size of every file
and a tag naming the training setup. A checkpoint without it, with a file of another size (killed
while it was written) or with another tag is not resumed (``checkpoint_problem``).

Resuming (``train(resume_from_checkpoint=...)``), per hook: the strategies' state is loaded from
the checkpoint *before* ``before_task``, so work ``before_task`` guards on that state is not
redone (EWC/SI/HLR's importance of general knowledge: their task count is past 0; self-rehearsal's
answers: its queue is empty and the buffer holds them); ``before_task`` itself runs again on the
model as it was when the task started (the Trainer loads the checkpoint's weights only after it),
so what it takes from that model comes out as in the first run (LwF's teacher, L2's and WiSE's
start weights, PackNet's packed weights, a progressive column's place, SI's sites); then, once
the weights are loaded, ``load_task_state_dict`` puts back the running state (SI's path integral,
iLoRA's slow learner, PackNet's masks, the progressive column). The replay buffers' random state
is in ``state_dict()``, so the examples drawn after the resume are those of an uninterrupted run;
the Trainer restores the optimizer, the scheduler, the RNG states and the step counter and skips
the batches already trained on (its sampler is seeded per epoch: the same data order).

The loss of an optimizer step (``ContinualTrainer``, as transformers intends with
``num_items_in_batch``): the mean over every label token the step trains on, whichever process
and gradient-accumulation micro-batch holds it, so that N processes × batch b, or b with N
micro-batches, train as one process with batch N·b. For micro-batch m on rank r, with t its
label tokens (shifted, as the causal LM's loss counts them), t' those of the batch after
``augment_batch`` (replayed rows added), T_m and T'_m their sums over the ranks, T = Σ_m T_m
(the Trainer's ``num_items_in_batch``, gathered over the ranks with
``average_tokens_across_devices``) and W ranks:

    share = W · (t' / T'_m) · (T_m / T)
    loss_{m,r} = share · (task loss (mean over the t' tokens) + Σ strategies' extra_loss)

DDP averages the ranks' gradients (hence W) and accumulation adds the micro-batches'; the shares
/ W add up to 1. So, per kind of term:

* the task loss: Σ_m (T_m / T) · Σ_r ΣCE / T'_m. Without a strategy that augments (t' = t) it is
  ΣCE / T, transformers' loss; with replay each micro-batch's mean is over all its label tokens,
  new and replayed, of every rank (one process with the global batch draws the same rows: one
  draw shared out over the ranks, ``BufferStrategy.draw``), as one process's mean over the
  augmented batch always was. Micro-batches are weighted by their new tokens (T_m / T): their
  replayed rows are drawn only as each is trained, after the first backward;
* penalties on the weights (EWC, SI, HLR, L2), the same on every rank and micro-batch: the
  shares add up to 1, so they count once per step, as in one process;
* terms averaged over the batch's label tokens (LwF with ``positions="labels"``, label
  smoothing): exact, like the task loss (their sum over every rank's t' tokens, / T'_m);
* terms averaged over other rows (DER's and iLoRA's replayed rows, self-rehearsal's distilled
  rows, LwF with ``positions="all"``): weighted like the micro-batch they come with. Exact in one
  process without accumulation; otherwise a mean of the micro-batches' and ranks' means weighted
  by their label tokens (the plain mean when those are equal).

One process without accumulation: share = 1 exactly, the loss and gradients of before (the mean
over the augmented batch's label tokens plus the terms). ``train_task`` / ``train_step`` are that
case. A micro-batch without a label token has a NaN mean, hence :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from cf_strategies import distributed
from cf_strategies.base import Batch, Strategy, is_causal_lm, read_state, write_state

CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's folder name, then the step
STRATEGY_CHECKPOINT = "strategy_state"  # the strategies' state in a checkpoint folder
TASK_STATE = "task"  # ... and their running state within it
CHECKPOINT_MANIFEST = "checkpoint.json"  # written last: a checkpoint without it is incomplete
IGNORE_INDEX = -100  # a label the loss skips


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops rather than corrupt weights."""


def total_loss(
    model: nn.Module,
    batch: Batch,
    strategies: Sequence[Strategy],
    task_loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]],
    step: int,
    share: Callable[[Batch, Batch], torch.Tensor | float] | None = None,
) -> tuple[torch.Tensor, Any, Batch]:
    """``share(batch, augmented) · (task_loss(augmented) + Σ extra_loss)``: the task loss on the
    batch after every ``augment_batch``, plus every strategy's extra term, weighted by the
    micro-batch's share of the optimizer step (module doc; None: 1, one process without
    accumulation). Returns the loss, the model's outputs and the augmented batch."""
    original = batch
    for strategy in strategies:
        batch = strategy.augment_batch(model, batch)
    loss, outputs = task_loss(model, batch)
    if any(s.replaces_task_loss for s in strategies):
        loss = loss.new_zeros(())  # the extra terms below are the loss (SDFT)
    for strategy in strategies:
        extra = strategy.extra_loss(model, batch, outputs)
        if extra is not None:
            loss = loss + extra
    if share is not None:  # in the loss's dtype: share 1 leaves it bit for bit as it was
        loss = loss * torch.as_tensor(share(original, batch), dtype=loss.dtype)
    # the one host sync of the hooks per micro-batch, on purpose: stop before a NaN reaches the
    # weights (the Trainer's logging_nan_inf_filter already syncs on the same loss each step)
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"loss is {loss.detach().item()} at step {step}; stopping before the weights are "
            "damaged (lower the learning rate or check the data of this step)"
        )
    return loss, outputs, batch


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
    """``task_loss`` of a transformers causal LM: its own loss on a batch with ``labels``, the
    mean over the label tokens (``label_tokens``); ``ContinualTrainer`` weights it by the
    micro-batch's share of the step (module doc)."""
    outputs = model(**batch)
    return outputs.loss, outputs


def label_tokens(batch: Batch, shifted: bool = True) -> torch.Tensor:
    """The label tokens a causal LM's loss averages over, as the Trainer counts them for
    ``num_items_in_batch``: ``shift_labels`` if the batch has them, else ``labels[..., 1:]``
    (position t predicts label t + 1) when ``shifted``, else ``labels``; -100 skipped."""
    if "shift_labels" in batch:
        labels = batch["shift_labels"]
    else:
        labels = batch["labels"][..., 1:] if shifted else batch["labels"]
    return labels.ne(IGNORE_INDEX).sum()


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


class _CheckpointCallback(TrainerCallback):
    """Writes the strategies' state into each checkpoint the Trainer saves, and puts their
    running state back when training resumes from one."""

    def __init__(self, trainer: ContinualTrainer):
        self.trainer = trainer
        self.task_states: dict[str, dict[str, Any]] | None = None  # to load at the resume

    def on_train_begin(self, args, state, control, **kwargs):
        if self.task_states is None:
            return
        for s in self.trainer.strategies:  # the model now holds the checkpoint's weights
            s.load_task_state_dict(self.trainer.model, self.task_states.get(s.name, {}))
        self.task_states = None
        self.trainer.resumed_from_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        for s in self.trainer.strategies:  # every rank: the running state rank 0 saves is global
            s.agree_task_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files (its RNG state) are written
        if args.should_save:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            save_checkpoint_state(
                self.trainer.strategies,
                folder,
                state.global_step,
                self.trainer.checkpoint_tag,
                self.trainer.seconds_so_far(),
            )


def save_checkpoint_state(
    strategies: Sequence[Strategy], folder: Path, step: int, tag: str = "", seconds: float = 0.0
) -> None:
    """Add the strategies' state to the Trainer's checkpoint ``folder``, then mark it complete:
    ``checkpoint.json`` (written last, atomically) lists every file with its size, and the
    seconds of training up to it (resumed runs included)."""
    target = folder / STRATEGY_CHECKPOINT
    shutil.rmtree(target, ignore_errors=True)
    for s in strategies:
        s.save(target)
        write_state(target / TASK_STATE, s.name, s.task_state_dict())
    files = {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != CHECKPOINT_MANIFEST
    }
    manifest = folder / CHECKPOINT_MANIFEST
    partial = manifest.with_name(manifest.name + ".partial")
    listed = {"step": step, "tag": tag, "train_seconds": round(seconds, 3), "files": files}
    partial.write_text(json.dumps(listed, indent=1))
    os.replace(partial, manifest)


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder (None for any other name)."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", folder.name)
    return int(match.group(1)) if match else None


def checkpoint_seconds(folder: Path) -> float:
    """The seconds of training a complete checkpoint records (0 for one that does not)."""
    return float(json.loads((folder / CHECKPOINT_MANIFEST).read_text()).get("train_seconds", 0))


def checkpoint_problem(folder: Path, tag: str = "") -> str | None:
    """Why ``folder`` cannot be resumed, or None when it is complete and was written with
    ``tag``: a missing or unreadable ``checkpoint.json`` (killed before the end of the save), a
    file missing or of another size than listed (truncated), or another tag (another setup)."""
    manifest = folder / CHECKPOINT_MANIFEST
    try:
        listed = json.loads(manifest.read_text())
        step, files, written_tag = listed["step"], dict(listed["files"]), listed["tag"]
    except FileNotFoundError:
        return f"no {CHECKPOINT_MANIFEST}: the save did not finish"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{CHECKPOINT_MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if written_tag != tag:
        return f"written for another training setup (tag {written_tag!r}, not {tag!r})"
    if step != checkpoint_step(folder):
        return f"{CHECKPOINT_MANIFEST} is for step {step}"
    for needed in ("trainer_state.json", f"{STRATEGY_CHECKPOINT}/"):
        if not any(name.startswith(needed) for name in files):
            return f"it holds no {needed}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}: truncated"
    return None


def latest_checkpoint(output_dir: Path, tag: str = "") -> tuple[Path | None, dict[Path, str]]:
    """The complete checkpoint of ``output_dir`` with the highest step (None if there is none),
    and why each newer one was passed over."""
    folders = [f for f in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if f.is_dir()]
    folders = sorted((f for f in folders if checkpoint_step(f) is not None), key=checkpoint_step)
    skipped: dict[Path, str] = {}
    for folder in reversed(folders):
        problem = checkpoint_problem(folder, tag)
        if problem is None:
            return folder, skipped
        skipped[folder] = problem
    return None, skipped


def remove_checkpoints(output_dir: Path, keep: Path | None = None) -> None:
    """Delete every ``checkpoint-N`` folder of ``output_dir`` but ``keep``."""
    for folder in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        if folder.is_dir() and checkpoint_step(folder) is not None and folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


class ContinualTrainer(Trainer):
    """A ``transformers.Trainer`` that runs a list of strategies around one task.

    ``train()`` calls ``before_task``, trains with ``augment_batch`` / ``extra_loss`` /
    ``after_backward`` / ``after_step`` on every step, then ``after_task`` with the task's
    training batches. Raises :class:`NonFiniteLossError` on a NaN or infinite loss.
    Evaluation (the model in eval mode) gets the plain task loss, without replay or penalties.

    Every checkpoint the Trainer saves holds the strategies' state too (module doc), marked with
    ``checkpoint_tag``; ``train(resume_from_checkpoint=folder)`` (or True: the latest complete
    one) continues the task from it and sets ``resumed_from_step``.
    """

    def __init__(
        self, *args, strategies: Sequence[Strategy] = (), checkpoint_tag: str = "", **kwargs
    ):
        super().__init__(*args, **kwargs)
        # the Trainer counts the step's label tokens (num_items_in_batch) only for a model that
        # takes loss kwargs; compute_loss never passes them to the model, so always count
        self.model_accepts_loss_kwargs = True
        self._loss_is_scaled = False  # whether the last compute_loss weighted by its share
        self.strategies = list(strategies)
        self.checkpoint_tag = checkpoint_tag
        self.resumed_from_step: int | None = None  # the step of the checkpoint resumed from
        self.train_seconds = 0.0  # of the last train(), with the runs it resumed from
        self._clock = (time.perf_counter(), 0.0)  # this run's start, the seconds before it
        self._strategy_callback = _StrategyCallback(self.strategies)
        self._strategy_callback.model = self.model
        self.add_callback(self._strategy_callback)
        self._checkpoint_callback = _CheckpointCallback(self)
        self.add_callback(self._checkpoint_callback)

    def seconds_so_far(self) -> float:
        """Seconds of training of the current ``train()``, with those of the runs it resumed."""
        start, before = self._clock
        return before + time.perf_counter() - start

    def train(self, resume_from_checkpoint: str | Path | bool | None = None, **kwargs):
        data = self.get_train_dataloader()
        checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        before = 0.0 if checkpoint is None else checkpoint_seconds(checkpoint)
        self._clock = (time.perf_counter(), before)
        if checkpoint is not None:  # the state as of the checkpoint, before before_task
            saved = checkpoint / STRATEGY_CHECKPOINT
            for s in self.strategies:
                s.load(saved)
            self._checkpoint_callback.task_states = {
                s.name: read_state(saved / TASK_STATE, s.name) or {} for s in self.strategies
            }
        for s in self.strategies:
            s.before_task(self.model, data)
        if checkpoint is not None and self._trained_through(checkpoint):
            result = self._load_finished(checkpoint)
        else:
            resume = None if checkpoint is None else str(checkpoint)
            result = super().train(resume_from_checkpoint=resume, **kwargs)
        for s in self.strategies:
            s.after_task(self.model, self.get_train_dataloader())
        self.train_seconds = self.seconds_so_far()
        return result

    def _trained_through(self, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` was saved at the last step (the Trainer always saves there):
        resumed from it, the Trainer would take one step more."""
        return 0 < self.args.max_steps <= (checkpoint_step(checkpoint) or 0)

    def _load_finished(self, checkpoint: Path) -> TrainOutput:
        """The state of a checkpoint saved at the last step, without training: its weights, the
        Trainer's state and the strategies' running state (a crash after training, before the
        model was saved)."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        self._checkpoint_callback.on_train_begin(self.args, self.state, self.control)
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), {})

    def _checkpoint_to_resume(self, resume: str | Path | bool | None) -> Path | None:
        """The checkpoint folder ``train(resume_from_checkpoint=...)`` names: a folder, which
        must be complete; True, the latest complete one in ``output_dir``; None or False, none."""
        if resume is None or resume is False:
            return None
        if resume is True:
            folder, skipped = latest_checkpoint(Path(self.args.output_dir), self.checkpoint_tag)
            if folder is None:
                raise ValueError(
                    f"no complete checkpoint in {self.args.output_dir} to resume from"
                    + "".join(f"; {f.name}: {why}" for f, why in skipped.items())
                )
            return folder
        folder = Path(resume)
        problem = checkpoint_problem(folder, self.checkpoint_tag)
        if problem is not None:
            raise ValueError(
                f"cannot resume from {folder}: {problem}; resume from an earlier checkpoint "
                "(latest_checkpoint) or train from the start"
            )
        return folder

    @property
    def loss_is_scaled_for_ga(self) -> bool:
        """Read by ``Trainer.training_step`` after ``compute_loss``: True when the loss was
        weighted by its share of the step (the Trainer uses it as is), False for a micro-batch's
        plain loss (no ``num_items_in_batch``; the Trainer divides it by the accumulation steps)."""
        return self._loss_is_scaled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: ``share · (task loss + extra terms)`` on this micro-batch, with the step's
        label tokens ``num_items_in_batch`` (module doc); without them (a direct call), the plain
        sum, which the Trainer would divide by the accumulation steps. Evaluation (the model in
        eval mode): the task loss alone, the batch's mean."""
        if not model.training:
            loss, outputs = causal_lm_loss(model, inputs)
            return (loss, outputs) if return_outputs else loss
        self._strategy_callback.model = model
        self._loss_is_scaled = num_items_in_batch is not None
        share = None
        if num_items_in_batch is not None:

            def share(original: Batch, augmented: Batch) -> torch.Tensor:
                return self.step_share(original, augmented, num_items_in_batch)

        loss, outputs, _ = total_loss(
            model, inputs, self.strategies, causal_lm_loss, self.state.global_step, share
        )
        return (loss, outputs) if return_outputs else loss

    def step_share(
        self, original: Batch, augmented: Batch, step_tokens: torch.Tensor | int
    ) -> torch.Tensor:
        """``W · (t' / T'_m) · (T_m / T)``: this micro-batch's weight in the optimizer step whose
        label tokens are ``step_tokens`` = T (module doc). Across ranks (``average_tokens_across_
        devices``, as the Trainer counted T) the micro-batch's counts are summed over the ranks
        (one all-reduce, only when a strategy augments batches); otherwise W = 1 and the counts
        are this rank's, which DDP then averages as transformers does."""
        shifted = getattr(self, "_loss_shifts_labels", None)
        if shifted is None:
            shifted = is_causal_lm(self.accelerator.unwrap_model(self.model))
        new = label_tokens(original, shifted)
        across = self.args.average_tokens_across_devices and self.args.world_size > 1
        ranks = self.args.world_size if across else 1
        if not any(type(s).augment_batch is not Strategy.augment_batch for s in self.strategies):
            return ranks * new / step_tokens  # t' = t and T'_m = T_m
        trained = label_tokens(augmented, shifted)
        counts = torch.stack([new, trained])  # [t, t'] -> [T_m, T'_m]
        if across:
            distributed.all_reduce_sum_([counts])
        return ranks * (trained / counts[1]) * (counts[0] / step_tokens)


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
    (after ``augment_batch``). One process, one batch per step: the loss is ``total_loss``'s with
    share 1, what ``ContinualTrainer`` gives one process without accumulation."""
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
