"""Learning without Forgetting (Li & Hoiem, ECCV 2016, "Learning without Forgetting").

    loss = CE(f(x), y) + α · T² · KL( softmax(f₀(x) / T) ‖ softmax(f(x) / T) )   on the new x

f₀ is the model as it was when the task began, frozen. With LoRA (a peft model) f₀ is the same
model under ``disable_adapter()``, in eval mode and without gradients: no copy in memory, one
extra forward pass per step (the base weights, i.e. the champion the adapter was put on). Without
LoRA ``before_task`` keeps a frozen deep copy (twice the weights in memory).

Several processes: the teacher runs per rank, on that rank's share of the batch, with the
adapter disabled on the rank's own model (the same weights on every rank); nothing is exchanged,
and the distillation term's gradient is averaged with the rest by DDP. Under FSDP the teacher
pass goes through the sharded model like the student's.

Which logits are distilled:
  * causal LMs: the positions that predict supervised tokens (``positions="labels"``) or every
    non-padding position (``"all"``); the teacher's LM head runs only there (``logits_to_keep``);
  * one shared classifier head: all logits (``classes="all"``) or only the classes of earlier
    tasks (``"seen"``, class-incremental);
  * one head per task (``multi_head=True``, batches carry ``task``): every earlier task's head on
    the new inputs, summed, as in the paper.
``skip_first_task``: a randomly initialised classifier has nothing to keep on its first task; a
pretrained LM has, so by default LwF distils from the first task on.

``non_target=True`` distils only the teacher's distribution over the tokens (classes) other than
each row's label, both sides renormalised without it: the non-target part (NCKD) of Decoupled
Knowledge Distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"). The label's
own probability is then left to the task loss, which LwF otherwise pulls back toward the
teacher's; what is kept is how the model ranks everything else (our use of it for LwF).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, Strategy
from cf_strategies.buffer import (
    forward_rows,
    is_token_batch,
    output_rows,
    target_positions,
    target_rows,
)
from cf_strategies.registry import register

NO_LOGIT = -1e9  # a logit that takes a class out of a softmax (finite: KL stays 0·0, not NaN)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over rows."""
    if len(student) == 0:
        return student.sum() * 0.0
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


@register
class LwF(Strategy):
    """Distil the frozen start-of-task model into the student on the new task's inputs."""

    name = "lwf"
    stores = "nothing (a task count; for classifiers, the seen class and head ids)"
    rank_safe = shard_safe = True  # the teacher runs on each rank's own batch (module doc)
    flattening_safe = True  # positions="labels", one head (narrowed in __init__)

    def __init__(
        self,
        alpha: Annotated[float, Field(ge=0)] = 1.0,
        temperature: Annotated[float, Field(gt=0)] = 2.0,
        positions: Literal["labels", "all"] = "labels",
        classes: Literal["all", "seen"] = "all",
        multi_head: bool = False,
        teacher: Literal["auto", "adapter", "copy"] = "auto",
        skip_first_task: bool = False,
        non_target: bool = False,
    ):
        if non_target and (positions != "labels" or multi_head):
            raise ValueError("non_target needs positions='labels' and one head (every row a label)")
        self.non_target = non_target
        # a flattened batch has no attention_mask ("all") and no task ids (multi_head)
        self.flattening_safe = positions == "labels" and not multi_head
        self.alpha, self.temperature = alpha, temperature
        self.positions, self.classes, self.multi_head = positions, classes, multi_head
        self.teacher = teacher
        self.skip_first_task = skip_first_task
        self.tasks_done = 0
        self.seen_classes: list[int] = []  # labels of earlier tasks (classes="seen")
        self.old_heads: list[int] = []  # task ids of earlier tasks (multi_head)
        self.frozen: nn.Module | None = None
        self.active = False

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.active = not (self.skip_first_task and self.tasks_done == 0)
        self.frozen = None
        if self.active and not self.uses_adapter(model):
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def uses_adapter(self, model: nn.Module) -> bool:
        is_lora = hasattr(_unwrap(model), "disable_adapter")
        return self.teacher == "adapter" or (self.teacher == "auto" and is_lora)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if not self.active:
            return None
        if self.multi_head:  # every earlier head on the new inputs
            losses = []
            for t in self.old_heads:
                b = {**batch, "task": torch.full_like(batch["task"], t)}
                student = forward_rows(model, b)
                losses.append(distillation(student, self.teacher_rows(model, b), self.temperature))
            return self.alpha * sum(losses) if losses else None
        mask = target_positions(batch, self.positions) if is_token_batch(batch) else None
        student = output_rows(batch, outputs, mask)
        teacher = self.teacher_rows(model, batch, mask)
        if self.classes == "seen":
            if not self.seen_classes:
                return None
            keep = torch.tensor(self.seen_classes, device=student.device)
            student, teacher = student[:, keep], teacher[:, keep]
        elif self.non_target:  # the label's logit out of both distributions
            label = target_rows(batch)[:, None]
            student = student.float().scatter(-1, label, NO_LOGIT)
            teacher = teacher.float().scatter(-1, label, NO_LOGIT)
        return self.alpha * distillation(student, teacher, self.temperature)

    @torch.no_grad()
    def teacher_rows(
        self, model: nn.Module, batch: Batch, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """f₀'s logits on ``batch`` (rows as ``forward_rows``)."""
        if self.frozen is not None:
            return forward_rows(self.frozen, batch, mask)
        model = _unwrap(model)
        was_training = model.training
        model.eval()  # no dropout in the teacher
        try:
            with model.disable_adapter():
                return forward_rows(model, batch, mask)
        finally:
            model.train(was_training)

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.frozen = None
        if self.classes == "seen" or self.multi_head:
            for batch in data or ():
                if self.classes == "seen" and not is_token_batch(batch):
                    self.seen_classes += target_rows(batch).unique().tolist()
                if self.multi_head:
                    self.old_heads += batch["task"].unique().tolist()
            self.seen_classes = sorted(set(self.seen_classes))
            self.old_heads = sorted(set(self.old_heads))
        self.tasks_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks_done": self.tasks_done,
            "seen_classes": self.seen_classes,
            "old_heads": self.old_heads,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tasks_done = state["tasks_done"]
        self.seen_classes = list(state["seen_classes"])
        self.old_heads = list(state["old_heads"])

    def __repr__(self) -> str:
        return f"LwF(alpha={self.alpha}, temperature={self.temperature})"


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DataParallel/DDP wrapper."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model
