"""Self-Distillation Fine-Tuning (Shenfeld, Damani, Hübotter & Agrawal, 2026, "Self-Distillation
Enables Continual Learning", arXiv:2601.19897).

Supervised fine-tuning trains on the demonstration y off-policy. SDFT learns on-policy instead:
the student answers the prompt x itself, ŷ ~ π_θ(·|x), and is pulled, token by token, toward
what the same network predicts when it has seen the demonstration in context (the teacher):

    loss = α · mean over t of KL( π_θ(·|x, ŷ<t) ‖ π_teacher(·|c(x, y), ŷ<t) )     (reverse KL)

Nothing is trained on y directly, so the update stays close to what the model already does
(the paper's explanation of why it forgets less than SFT).

Choices made here, each the paper's or TRL's ``SDFTTrainer`` default unless said otherwise:

- the teacher is the weights the task started from (TRL's ``teacher_model_kind="base"``): with
  LoRA the same model under ``disable_adapter()``, otherwise a frozen copy (LwF's teacher, which
  this strategy holds); its forward runs without gradients;
- the KL is the full-vocabulary reverse KL at each answer position (TRL's ``full_logits``
  mode, ``distillation_alpha=1``);
- the demonstration context c(x, y) is built from token ids, so that it needs no template:
  the prompt, the demonstration as an answer to it, then the prompt again (``x ⊕ y ⊕ x``): the
  model has just seen the question answered (ours; the paper writes the demonstration into the
  prompt as text);
- the student's answer is greedy (ours: deterministic, so a resumed run trains on the same
  samples; the paper samples at temperature 1), at most ``max_new_tokens`` and the length of
  the demonstration plus ``answer_margin`` tokens;
- the task loss on y is replaced, not added to: ``sft_weight`` > 0 adds ``sft_weight · CE(y)``
  back (a mix the paper does not use).

We write the loss on the project's Trainer rather than wrap TRL's ``SDFTTrainer``: the pipeline's
checkpoints, strategy hooks, combinations and several-process training all go through
``cf_strategies.trainer``, and a second trainer would need its own copy of each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, Strategy, TaskContext, greedy_answers
from cf_strategies.buffer import (
    IGNORE_INDEX,
    answer_example,
    collate,
    logits_of,
    target_positions,
)
from cf_strategies.lwf import LwF, _unwrap
from cf_strategies.registry import register


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) ‖ softmax(teacher)) per row, summed over the vocabulary; (N,)."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def prompt_and_answer(row: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """A training row's prompt (tokens before the first supervised one) and its answer (the
    supervised tokens)."""
    supervised = (row["labels"] != IGNORE_INDEX).nonzero().flatten()
    if len(supervised) == 0:
        return row["input_ids"][row["attention_mask"].bool()].tolist(), []
    start = int(supervised[0])
    return row["input_ids"][:start].tolist(), row["input_ids"][supervised].tolist()


@register
class SDFT(Strategy):
    """On-policy self-distillation from a demonstration-conditioned teacher (module doc)."""

    name = "sdft"
    stores = "nothing (the teacher is the start-of-task model)"
    replaces_task_loss = True  # the loss is the distillation term (plus sft_weight · CE)
    rank_safe = True  # each rank samples and distils its own rows; DDP averages the gradients

    def __init__(
        self,
        alpha: Annotated[float, Field(gt=0)] = 1.0,
        max_new_tokens: Annotated[int, Field(ge=1)] = 64,
        answer_margin: Annotated[int, Field(ge=0)] = 8,
        sft_weight: Annotated[float, Field(ge=0)] = 0.0,
        generation_batch_size: Annotated[int, Field(ge=1)] = 16,
        pad_token_id: Annotated[int, Field(ge=0)] | None = None,
        eos_token_id: Annotated[int, Field(ge=0)] | None = None,
    ):
        self.alpha, self.sft_weight = alpha, sft_weight
        self.max_new_tokens, self.answer_margin = max_new_tokens, answer_margin
        self.generation_batch_size = generation_batch_size
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.teacher = LwF()  # its start-of-task model: the adapter disabled, or a frozen copy
        self._teacher_logits: torch.Tensor | None = None  # the teacher's logits at the answer rows
        self._demonstration: Batch | None = None  # the original batch, for sft_weight

    def prepare(self, context: TaskContext) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = context.pad_token_id
        if self.eos_token_id is None:
            self.eos_token_id = context.eos_token_id

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.teacher.before_task(model, data)

    def augment_batch(self, model: nn.Module, batch: Batch) -> Batch:
        """The student's own answers to the batch's prompts, as the rows to train on; the
        teacher's logits on those answers, in the demonstration's context, kept for
        ``extra_loss``."""
        pad = 0 if self.pad_token_id is None else self.pad_token_id
        device = batch["input_ids"].device
        rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        pairs = [prompt_and_answer(r) for r in rows]
        budget = min(self.max_new_tokens, max(len(y) for _, y in pairs) + self.answer_margin)
        answers = greedy_answers(
            _unwrap(model),
            [x for x, _ in pairs],
            budget,
            pad,
            self.eos_token_id,
            self.generation_batch_size,
        )
        answers = [
            a or [self._fallback_token(y, pad)] for a, (_, y) in zip(answers, pairs, strict=True)
        ]
        student = collate(
            [answer_example(x, a) for (x, _), a in zip(pairs, answers, strict=True)], pad
        )
        shown = collate(  # the same answers after the demonstration
            [answer_example(x + y + x, a) for (x, y), a in zip(pairs, answers, strict=True)], pad
        )
        shown = {k: v.to(device) for k, v in shown.items()}
        self._teacher_logits = self.teacher.teacher_rows(model, shown)
        self._demonstration = batch if self.sft_weight else None
        return {k: v.to(device) for k, v in student.items()}

    def _fallback_token(self, demonstration: list[int], pad: int) -> int:
        """An answer of no token still gets one (the end of sequence) to be distilled on."""
        return self.eos_token_id if self.eos_token_id is not None else (demonstration or [pad])[-1]

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self._teacher_logits is None:
            return None
        teacher, self._teacher_logits = self._teacher_logits, None
        student = logits_of(outputs)[target_positions(batch)]
        loss = self.alpha * reverse_kl(student, teacher).mean()
        if self._demonstration is not None:  # the demonstration's own loss, as SFT trains it
            demonstration, self._demonstration = self._demonstration, None
            loss = loss + self.sft_weight * model(**demonstration).loss
        return loss

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.teacher.frozen = None

    def __repr__(self) -> str:
        return f"SDFT(alpha={self.alpha}, sft_weight={self.sft_weight})"
