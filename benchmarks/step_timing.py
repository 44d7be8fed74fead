"""Timing the fine-tune step: its own trainer, its batches counted, each optimizer step timed.

``step_trainer`` is what ``flows.steps.finetune.finetune`` trains with (``build_trainer``), so a
benchmark times the step as the pipeline runs it: on the GPU when there is one (bf16 mixed precision where the
GPU has it, fp32 master weights), else fp32 on the CPU. Only what a benchmark must change is
changed: the number of steps, no checkpoints, the seed.

``Counting`` wraps the collator and records every batch's real tokens, label tokens and the
positions computed (padding included); ``StepTimer`` times each optimizer step from
``on_step_begin`` to ``on_step_end`` (forward, the strategies' terms, backward, AdamW, hooks; the
batch is collated before), with ``torch.cuda.synchronize()`` at both ends on a GPU (kernels run
asynchronously: without it a step's time is the time to queue it) and the step's peak GPU memory.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import TrainerCallback

import cf_strategies
from flows.core.config import Params
from flows.core.data import load_release
from flows.registry.serving import STRATEGY_STATE
from flows.steps.finetune import (
    FinetuneStep,
    build_trainer,
    check_padding_free,
    collator,
    lora_config,
    task_context,
)
from flows.steps.modeling import load_model, tokenize_for_training


class Counting:
    """A collator that records, per batch, its real tokens, label tokens and padded size
    (``batches``), and the real length of each of its examples (``lengths``)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.lengths: list[list[int]] = []

    def __call__(self, features):
        lengths = [len(f["input_ids"]) for f in features]
        labels = sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features)
        batch = self.inner(features)
        self.batches.append((sum(lengths), labels, batch["input_ids"].numel()))
        self.lengths.append(lengths)
        return batch


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall and CPU seconds (this process, every thread) of each optimizer step (``times``);
    on a GPU also each step's peak allocated memory in bytes (``peaks``: the peak is reset at
    the step's start, so it holds the weights, optimizer and strategies' state resident then
    plus the step's activations); with ``counting``, which of its batches each step trained on
    (``batch_of``; one batch per step, no gradient accumulation)."""

    def __init__(self, counting: Counting | None = None):
        self.times: list[tuple[float, float]] = []
        self.peaks: list[int] = []
        self.counting = counting
        self.batch_of: list[int] = []  # the counted batch each step trained on (its index)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.counting is not None:  # the step's batch was collated just before
            self.batch_of.append(len(self.counting.batches) - 1)
        cuda_sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        cuda_sync()
        wall, cpu = self._start
        self.times.append((time.perf_counter() - wall, time.process_time() - cpu))
        if torch.cuda.is_available():
            self.peaks.append(torch.cuda.max_memory_allocated())


def carry_over(params: Params, model_dir: Path, release_dir: Path, work: Path) -> Path:
    """A champion that learned ``release_dir``, as far as the strategies of ``train.strategy``
    are concerned: ``model_dir``'s files (linked, not copied) and ``strategy_state/`` built by
    the strategies' own hooks (``prepare`` with that release's context, ``before_task`` and
    ``after_task`` on its padded training batches: EWC's importance of general knowledge and
    the release's Fisher; replay's buffer filled with its rows). The step then loads that state
    as it loads any champion's. The weights are not trained on the release: what a step costs
    does not depend on their values."""
    cfg = params.train
    champion = work / f"champion-{cfg.strategy}"
    shutil.rmtree(champion, ignore_errors=True)
    champion.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.name != STRATEGY_STATE:
            (champion / f.name).symlink_to(f.resolve())
    model, tokenizer = load_model(
        model_dir, for_training=True, trust_remote_code=params.model.trust_remote_code
    )
    model = get_peft_model(model, lora_config(cfg))
    rows = [
        tokenize_for_training(tokenizer, ex, params.model.use_chat_template, cfg.max_length)
        for ex in load_release(release_dir, "train")
    ]
    batches = DataLoader(rows, batch_size=cfg.batch_size, collate_fn=collator(tokenizer, False))
    strategies = cf_strategies.build_strategies(cfg.strategy, cfg.strategy_params)
    context = task_context(FinetuneStep.from_params(params), tokenizer, release_dir)
    for s in strategies:
        s.prepare(context)
        s.before_task(model, batches)
        s.after_task(model, batches)
    cf_strategies.save_strategies(strategies, champion / STRATEGY_STATE)
    return champion


def step_trainer(
    params: Params,
    model_dir: Path,
    release_dir: Path,
    strategy: str,
    work: Path,
    steps: int,
    padding_free: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    seed: int | None = None,
    previous_release: Path | None = None,
) -> tuple[cf_strategies.ContinualTrainer, Counting, StepTimer]:
    """The fine-tune step's trainer (``flows.steps.finetune.build_trainer``): the champion
    ``model_dir`` with the LoRA of ``params`` learning ``release_dir`` with ``strategy``
    (``train.strategy`` and ``train.padding_free`` set to these), ``steps`` optimizer steps in
    all (warm-up included), no checkpoints, seeded with ``seed`` (default ``train.seed``: the
    LoRA initialisation and the data order). With ``previous_release`` the champion first
    carries that release's strategy state (``carry_over``), as at the release after it. Call
    ``trainer.train()``; the counting collator and the step timer (also among the trainer's
    callbacks) come back with it."""
    changes = {
        "train.strategy": strategy,
        "train.padding_free": padding_free,
        "train.max_steps": steps,
        "train.checkpoint_steps": 0,
    }
    if seed is not None:
        changes["train.seed"] = seed
    params = params.with_overrides(changes)
    check_padding_free(params.train)
    if previous_release is not None:
        model_dir = carry_over(params, model_dir, previous_release, work)
    trainer, _ = build_trainer(
        FinetuneStep.from_params(params), model_dir, release_dir, work / "trainer"
    )
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    timer = StepTimer(counting)
    for callback in (timer, *callbacks):
        trainer.add_callback(callback)
    return trainer, counting, timer
