"""Self-rehearsal: replay the champion's own answers when the old data cannot be kept.

Huang et al., ACL 2024, "Mitigating Catastrophic Forgetting in Large Language Models with
Self-Synthesized Rehearsal" (SSR). Before training on a new task the current model (the champion)
answers old-task prompts x_s greedily; prompt + answer become replay examples (labels -100 on the
prompt) and are mixed into the training batches exactly as ``replay`` does:

    loss = CE(f([x; x_s]), [y; ŷ_s]),   ŷ_s = greedy decode of f_champion(x_s)

With ``distill_alpha`` α > 0 the rehearsed answers are not trained as labels; the model instead
matches the champion's whole next-token distribution at each answer position (our choice; the
"LwF on rehearsal data" / DER form of the same idea):

    loss = CE(f(x), y) + α · T² · KL( softmax(f_champion([x_s; ŷ_s]) / T) ‖ softmax(f([x_s; ŷ_s]) / T) )

At the start this term and its gradient are zero (the student is the champion): it only pulls
back where learning the new task moves the model on general prompts, whereas training on the
greedy answers also sharpens the champion's habits (e.g. its answer format) on them. The teacher is
LwF's: with LoRA the same model under ``disable_adapter()``, otherwise a frozen copy.

SSR also synthesises the prompts by in-context learning with the base model; here they are given
by the pipeline (``TaskContext.rehearsal_prompts`` through ``prepare``, which also gives the
tokenizer's pad and end-of-sequence ids unless those options are set), with ``add_prompts``
(strings, or token ids e.g. from a chat template), or, with
``prompts_from_data``, kept from each task's data: prompt tokens only, never the answers. Nothing
else of the task data is stored. At most ``buffer_size`` pending prompts (a uniform sample) are
answered, left-padded, ``generation_batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, TaskContext, greedy_answers
from cf_strategies.buffer import (
    IGNORE_INDEX,
    _pad_to,
    answer_example,
    batch_size,
    logits_of,
    unbatch,
)
from cf_strategies.lwf import LwF
from cf_strategies.registry import register
from cf_strategies.replay import NonNegativeFloat, NonNegativeInt, Replay


@register
class SelfRehearsal(Replay):
    """Replay of the champion's greedy answers to old-task prompts."""

    name = "self_rehearsal"
    uses_rehearsal_prompts = True  # it answers TaskContext.rehearsal_prompts

    def __init__(
        self,
        buffer_size: NonNegativeInt = 500,
        ratio: NonNegativeFloat = 1.0,
        max_new_tokens: Annotated[int, Field(ge=1)] = 64,
        generation_batch_size: Annotated[int, Field(ge=1)] = 8,
        prompts_from_data: bool = False,
        per_task_quota: bool = False,
        pad_token_id: NonNegativeInt | None = None,
        eos_token_id: NonNegativeInt | list[NonNegativeInt] | None = None,
        seed: int = 0,
        distill_alpha: NonNegativeFloat = 0.0,
        temperature: Annotated[float, Field(gt=0)] = 1.0,
    ):
        super().__init__(buffer_size, ratio, per_task_quota, pad_token_id, seed)
        self.distill_alpha, self.temperature = distill_alpha, temperature
        self.teacher = LwF(alpha=distill_alpha, temperature=temperature)
        self._rehearsed: tuple[slice, torch.Tensor] | None = None  # rows, their answer labels
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = generation_batch_size
        self.prompts_from_data = prompts_from_data
        self.eos_option = eos_token_id  # the user's choice; None: the context's (or tokenizer's)
        self.eos_token_id = eos_token_id
        self.pending: list[tuple[list[int], int]] = []  # (prompt token ids, task) to answer

    def prepare(self, context: TaskContext) -> None:
        """Replay's (release, pad id), then the context's end-of-sequence id (unless the
        ``eos_token_id`` option was given) and its rehearsal prompts, queued for ``before_task``."""
        super().prepare(context)
        if self.eos_option is None and context.eos_token_id is not None:
            self.eos_token_id = context.eos_token_id
        self.add_prompts(context.rehearsal_prompts)

    def add_prompts(
        self, prompts: Sequence[str | Sequence[int]], tokenizer: Any = None, task: int | None = None
    ) -> None:
        """Queue old-task prompts; ``task`` defaults to the last finished task (-1 before any)."""
        task = self.task - 1 if task is None else task
        if tokenizer is not None and self.eos_token_id is None:
            self.eos_token_id = tokenizer.eos_token_id
        for p in prompts:
            ids = tokenizer(p)["input_ids"] if isinstance(p, str) else p
            self.pending.append(([int(i) for i in ids], task))

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.rehearse(model)
        if self.distill_alpha:
            self.teacher.before_task(model, data)

    def augment_batch(self, model: nn.Module, batch: Batch) -> Batch:
        start = batch_size(batch)
        mixed = super().augment_batch(model, batch)
        self._rehearsed = None
        if self.distill_alpha and batch_size(mixed) > start:
            rows = slice(start, batch_size(mixed))
            labels = mixed["labels"].clone()
            self._rehearsed = (rows, labels[rows].clone())
            labels[rows] = IGNORE_INDEX  # the task loss skips them; extra_loss distils them
            mixed = {**mixed, "labels": labels}
        return mixed

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self._rehearsed is None:
            return None
        rows, labels = self._rehearsed
        self._rehearsed = None
        rehearsed = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
        # a strategy after this one may have appended longer rows: the batch is wider now
        width = rehearsed["input_ids"].shape[1]
        rehearsed["labels"] = _pad_to(labels, width, IGNORE_INDEX)
        return self.teacher.extra_loss(model, rehearsed, logits_of(outputs)[rows])

    def rehearse(self, model: nn.Module) -> int:
        """Answer the pending prompts with ``model`` (greedy, left-padded batches, each answer up to
        its first end-of-sequence token); returns how many examples were offered to the buffer."""
        pending = self.pending
        if len(pending) > self.buffer.capacity:
            pending = self.buffer.rng.sample(pending, self.buffer.capacity)
        answers = greedy_answers(
            model,
            [ids for ids, _ in pending],
            self.max_new_tokens,
            self.pad_token_id,
            self.eos_token_id,
            self.generation_batch_size,
        )
        offered = 0
        for (ids, task), answer in zip(pending, answers, strict=True):
            if answer:
                self.buffer.add(answer_example(ids, answer), task)
                offered += 1
        self.pending = []
        return offered

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.teacher.frozen = None
        if self.prompts_from_data:
            for batch in data or ():
                for ex in unbatch(batch):
                    supervised = (ex["labels"] != IGNORE_INDEX).nonzero().flatten()
                    if len(supervised):
                        self.pending.append((ex["input_ids"][: supervised[0]].tolist(), self.task))
        super().after_task(model, None)  # nothing of the data is buffered; the task is counted

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending": [[ids, t] for ids, t in self.pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pending = [(list(ids), int(t)) for ids, t in state["pending"]]
