"""PackNet: several tasks in one network by iterative pruning (Mallya & Lazebnik, CVPR 2018,
"PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning").

Every trainable weight is free or owned by exactly one task. Task t (0, 1, ... in learning order):

  1. trains the free weights; the weights of tasks < t do not move: their gradients are zeroed
     in ``after_backward`` and their values put back in ``after_step``, so neither weight decay
     nor Adam's momentum can shift them;
  2. after optimizer step ``prune_at`` keeps, in each weight matrix, the (1 − prune_ratio) share
     of the free weights it trained with the largest |θ| (a weight that got no gradient in this
     task, e.g. another task's head or the input of a dead unit, is never claimed: were it
     counted, a task would keep all it trained and leave only unusable weights free); the other
     free weights are set to 0 and stay free for the later tasks, which start training them
     from the values they had when pruned (as Avalanche's PackNet does; a start at 0 would
     leave a later task little room to move them, and a dead unit's inputs dead for good);
  3. retrains only the kept weights for the rest of the task, and then owns them: its mask
     M_t = [owner = t]. The masks of two tasks never overlap.

    answer for task t:   θ_t = θ ⊙ Σ_{k ≤ t} M_k        (the weights of later tasks masked out)

Every weight not owned by a task ≤ t was 0 when task t ended, and owned weights never move, so
θ_t is exactly the model that finished task t: its outputs are bit-identical after any number of
later tasks. Parameters of one dimension (biases, norm gains) are not pruned: the first task that
trains an element owns it (as the paper's biases, fixed after the first task).

``prune_at`` counts the task's optimizer steps. None takes it from the task's length when the
pipeline gives it (``TaskContext.max_steps``): round((1 − ``retrain_fraction``) · max_steps), so
by default the last 20% of the steps retrain the kept weights (``max_steps`` 30: prune at 24).
Without either, or in a task shorter than ``prune_at``, it prunes when the task ends, without
retraining (a warning says so when a step was set).

Capacity: ``capacity()`` gives the share of the weight matrices' elements still free and the share
each task owns. Task t trains on what is free, about prune_ratio^t of the weights with a constant
ratio, so later tasks get less. When nothing is free, ``before_task`` raises
:class:`PackNetCapacityError`, naming the capacity, rather than train nothing.

Task selection (``use_task`` / ``cf_strategies.base.using_task``) writes θ_t into the model's
parameters, from the packed weights kept in the strategy's state; ``use_task(model, None)`` writes
the latest task's. With LoRA (the pipeline's case) the weights packed are the adapter's A and B,
so task t's model is  W₀ + s·(B ⊙ mask_≤t)(A ⊙ mask_≤t)  on the frozen base W₀. The state (per
parameter: an int16 owner map, -1 = free, and the packed values, i.e. the owned weights and, where
free, the values the next task starts from; the task names in JSON) is enough to rebuild any
task's model from the base weights: put the same adapter on the *unmerged* base (its initial
values do not matter), ``load`` the state and ``use_task(model, t)``; ``merge_and_unload()`` after
that gives a standalone model of task t. ``before_task`` writes the packed values into a fresh
adapter, so the next release continues the same adapter; the base must therefore not have the
adapter merged into it (``isolates_tasks``). Pruning a fully fine-tuned
pretrained model zeroes a share of its pretrained weights, as the paper does for its first,
ImageNet, task.

Cost: no extra parameters and no extra inference compute (masked weights are zeros of the same
matrices); memory, one copy of the trainable weights and an int16 map of the same shape; a
masked copy per training step and per task switch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from cf_strategies.base import (
    BASE,
    Batch,
    Strategy,
    TaskContext,
    task_index,
    trainable_parameters,
)
from cf_strategies.registry import register

FREE = -1  # owner of a weight no task has kept


class PackNetCapacityError(ValueError):
    """No free weight is left for a new task."""


@register
class PackNet(Strategy):
    """Train the free weights, keep the largest (1 − prune_ratio) of them, retrain, freeze."""

    name = "packnet"
    isolates_tasks = True
    state_on_adapter = True
    stores = "masks (an int16 owner map per weight) and a copy of the packed weights"
    flattening_safe = True  # masks from gradients and magnitudes, never from the batch

    def __init__(
        self,
        prune_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.5,
        prune_at: Annotated[int, Field(ge=1)] | None = None,
        retrain_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2,
    ) -> None:
        self.prune_ratio = prune_ratio
        self.prune_at = prune_at
        self.retrain_fraction = retrain_fraction
        self._prune_step: int | None = prune_at  # this task's
        self.tasks: list[str] = []  # names of the tasks learned, in order
        self.owner: dict[str, torch.Tensor] = {}  # int16, FREE or the owning task's index
        self.weights: dict[str, torch.Tensor] = {}  # owned values; where free, the next start
        self._release: str | None = None
        # during a task
        self._params: dict[str, nn.Parameter] = {}
        self._frozen: dict[str, torch.Tensor] = {}  # True where this step must not move
        self._fixed: dict[str, torch.Tensor] = {}  # the values the frozen elements keep
        self._guarded: list[str] = []  # parameters with frozen elements
        self._touched: dict[str, torch.Tensor] = {}  # free elements that got a gradient
        self._released: dict[str, torch.Tensor] = {}  # the values when pruned
        self._step = 0
        self._pruned = False

    # ---- the task ---------------------------------------------------------------------------
    def prepare(self, context: TaskContext) -> None:
        self._release = context.release
        self._prune_step = self.prune_at
        if self.prune_at is None and context.max_steps:
            self._prune_step = max(1, round((1 - self.retrain_fraction) * context.max_steps))

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        params = trainable_parameters(model)
        if not params:
            raise ValueError("packnet: the model has no trainable parameters")
        self._check_names(params, "train")
        for name, p in params.items():
            if name not in self.owner:  # a parameter no task has trained yet: all free
                self.owner[name] = torch.full(p.shape, FREE, dtype=torch.int16, device=p.device)
            self.owner[name] = self.owner[name].to(p.device)
        free, total = self._free_weights(params)
        if self.tasks and free == 0:
            shares = ", ".join(
                f"{n} {100 * s:.1f}%" for n, s in zip(self.tasks, self._shares(), strict=True)
            )
            raise PackNetCapacityError(
                f"packnet: no capacity left for a new task: 0 of the {total:,} weight-matrix "
                f"elements are free (0.0%); the {len(self.tasks)} tasks learned own them all "
                f"({shares}; prune_ratio={self.prune_ratio}). Training would change nothing. "
                "Use a higher prune_ratio (each task keeps fewer weights), or start a new "
                "PackNet state on a new base model."
            )
        with torch.no_grad():
            for name, p in params.items():
                if name in self.weights:  # every task's weights, free ones where they were pruned
                    p.copy_(self.weights[name].to(p.device, p.dtype))
        self._params = params
        self._frozen = {n: self.owner[n] != FREE for n in params}
        self._fixed = {n: p.detach().clone() for n, p in params.items()}
        self._touched = {n: torch.zeros_like(f) for n, f in self._frozen.items()}
        self._guarded = [n for n, f in self._frozen.items() if bool(f.any())]
        self._step, self._pruned = 0, False

    def after_backward(self, model: nn.Module) -> None:
        for name, p in self._params.items():
            if p.grad is None:
                continue
            if not self._pruned:
                self._touched[name] |= p.grad != 0
            p.grad.masked_fill_(self._frozen[name], 0)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if not self._params:
            return
        for name in self._guarded:  # undo weight decay and momentum on the frozen weights
            p = self._params[name]
            p.copy_(torch.where(self._frozen[name], self._fixed[name], p))
        self._step += 1
        if self._prune_step is not None and self._step == self._prune_step and not self._pruned:
            self._prune()

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if not self._params:
            return
        if not self._pruned:
            if self._prune_step is not None:
                warnings.warn(
                    f"packnet: the task ended after {self._step} optimizer steps, before "
                    f"prune_at={self._prune_step}: pruned at its end, without retraining",
                    stacklevel=2,
                )
            with torch.no_grad():
                self._prune()
        self.weights = {
            n: torch.where(self.owner[n] == FREE, self._released[n], p.detach())
            for n, p in self._params.items()
        }
        self.tasks.append(self._release or f"task-{len(self.tasks)}")
        self._release, self._prune_step = None, self.prune_at
        self._params, self._frozen, self._fixed, self._touched = {}, {}, {}, {}
        self._released = {}
        self._guarded = []

    def _prune(self) -> None:
        """Task t keeps the largest (1 − prune_ratio) of the free weights it trained (all of
        them in a 1-d parameter), owns them, and zeroes the other free weights."""
        task = len(self.tasks)
        for name, p in self._params.items():
            owner = self.owner[name]
            free = owner == FREE
            trained = free & self._touched[name]
            if p.dim() >= 2:
                n_keep = math.floor((1.0 - self.prune_ratio) * int(trained.sum()) + 0.5)
                keep = torch.zeros_like(free)
                if n_keep > 0:
                    score = p.detach().abs().float().masked_fill(~trained, -1.0)
                    keep.view(-1)[score.view(-1).topk(n_keep).indices] = True
            else:
                keep = trained
            owner[keep] = task
            self._released[name] = p.detach().clone()
            p.masked_fill_(free & ~keep, 0.0)
            self._frozen[name] = ~keep
            self._fixed[name] = p.detach().clone()
        self._guarded = [n for n, f in self._frozen.items() if bool(f.any())]
        self._pruned = True

    # ---- in the middle of a task (checkpoints) ----------------------------------------------
    def task_state_dict(self) -> dict[str, Any]:
        """The task's masks and counters: every owner map (pruning writes the task into them),
        the elements touched so far, what is frozen at which value, the values when pruned, the
        step and whether it pruned."""
        if not self._params:
            return {}
        state: dict[str, Any] = {"step": self._step, "pruned": self._pruned}
        for name in self._params:
            state[f"owner.{name}"] = self.owner[name]
            state[f"touched.{name}"] = self._touched[name]
            state[f"frozen.{name}"] = self._frozen[name]
            state[f"fixed.{name}"] = self._fixed[name]
            if name in self._released:
                state[f"released.{name}"] = self._released[name]
        return state

    def load_task_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        if not state:
            return
        for name, p in self._params.items():
            self.owner[name] = state[f"owner.{name}"].to(p.device, torch.int16)
            self._touched[name] = state[f"touched.{name}"].to(p.device, torch.bool)
            self._frozen[name] = state[f"frozen.{name}"].to(p.device, torch.bool)
            self._fixed[name] = state[f"fixed.{name}"].to(p.device, p.dtype)
            if f"released.{name}" in state:
                self._released[name] = state[f"released.{name}"].to(p.device, p.dtype)
        self._step, self._pruned = int(state["step"]), bool(state["pruned"])
        self._guarded = [n for n, f in self._frozen.items() if bool(f.any())]

    # ---- answering for one task -------------------------------------------------------------
    @torch.no_grad()
    def use_task(self, model: nn.Module, task: int | str | None) -> None:
        """Write θ_t = θ ⊙ [0 ≤ owner ≤ t] into ``model`` (None: every task's weights; ``BASE``,
        t = −1: none, i.e. zeros, so a LoRA adapter adds exactly nothing to the base)."""
        if self._params:
            raise RuntimeError("packnet: use_task is for between tasks, not during one")
        if not self.tasks and (task is None or task == BASE):
            return
        t = task_index(task, self.tasks, self.name)
        params = dict(model.named_parameters())
        self._check_names(params, "have")
        for name, packed in self.weights.items():
            p, owner = params[name], self.owner[name].to(params[name].device)
            p.copy_(packed.to(p.device, p.dtype).masked_fill((owner < 0) | (owner > t), 0.0))

    def masks(self, task: int | str) -> dict[str, torch.Tensor]:
        """The binary mask of one task, by parameter name: the weights it owns."""
        t = task_index(task, self.tasks, self.name)
        return {name: owner == t for name, owner in self.owner.items()}

    def capacity(self) -> dict[str, Any]:
        """Shares of the weight-matrix elements (every element if there is no matrix): ``free``,
        and ``owned`` by each task in learning order."""
        counts = torch.zeros(len(self.tasks) + 1, dtype=torch.long)
        for owner in self._sized(self.owner).values():
            counts += torch.bincount(owner.flatten().long() + 1, minlength=len(counts)).cpu()[
                : len(counts)
            ]
        total = max(int(counts.sum()), 1)
        return {
            "free": float(counts[0]) / total,
            "owned": [float(c) / total for c in counts[1:]],
            "tasks": list(self.tasks),
            "weights": int(counts.sum()),
        }

    def _shares(self) -> list[float]:
        return self.capacity()["owned"]

    def _free_weights(self, params: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        owners = self._sized({n: self.owner[n] for n in params})
        free = sum(int((o == FREE).sum()) for o in owners.values())
        return free, sum(o.numel() for o in owners.values())

    @staticmethod
    def _sized(owners: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weight matrices (pruned, so they hold the capacity); all if there are none."""
        matrices = {n: o for n, o in owners.items() if o.dim() >= 2}
        return matrices or dict(owners)

    def _check_names(self, params: Mapping[str, torch.Tensor], verb: str) -> None:
        unknown = sorted(set(self.weights) - set(params))
        if unknown:
            raise ValueError(
                f"packnet: the saved tasks' weights are for parameters this model does not "
                f"{verb}: {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(unknown)} in "
                "all); build the model as it was trained (the same adapter on the same base)"
            )
        for name, w in self.weights.items():
            if tuple(params[name].shape) != tuple(w.shape):
                raise ValueError(
                    f"packnet: saved weights for {name} have shape {tuple(w.shape)}, "
                    f"not {tuple(params[name].shape)}"
                )

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": list(self.tasks)}
        unsaved = len(self.tasks)  # a task pruned but not finished: its masks are task state
        for name, w in self.weights.items():
            owner = self.owner[name]
            state[f"owner.{name}"] = owner.masked_fill(owner >= unsaved, FREE)
            state[f"weight.{name}"] = w
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tasks = list(state.get("tasks", []))
        owner, weights = {}, {}
        for key, value in state.items():
            if key == "tasks":
                continue
            kind, _, name = key.partition(".")
            if kind == "owner":
                owner[name] = value.to(torch.int16)
            elif kind == "weight":
                weights[name] = value
            else:
                raise ValueError(f"packnet: unknown state key {key!r}")
        if set(owner) != set(weights):
            raise ValueError("packnet: the saved owner maps and weights name other parameters")
        for name, o in owner.items():
            if o.shape != weights[name].shape:
                raise ValueError(f"packnet: owner map and weights of {name} differ in shape")
            if o.numel() and int(o.max()) >= len(tasks):
                raise ValueError(
                    f"packnet: {name} is owned by a task beyond the {len(tasks)} saved"
                )
        self.tasks, self.owner, self.weights = tasks, owner, weights
