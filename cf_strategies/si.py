"""Synaptic Intelligence: each weight's importance is its share of the drop in the training loss.

    loss = task loss + c · Σ_i Ω_i (θ_i − θ*_i)²
    during a task:  ω_i = −Σ_steps g_i(t) · Δθ_i(t)           (Δθ(t): the change made by optimizer step t)
    after a task:   Ω_i ← Ω_i + max(ω_i, 0) / ((θ_i^end − θ_i^start)² + ξ),   θ* ← θ^end

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence" (ICML 2017).
As in the paper's code, g is the gradient of the loss *without* the SI term, and it is the
gradient before any clipping (clipping changes the step Δθ, not the loss's gradient): without
LoRA it is read from each parameter's ``.grad`` by a hook as backward accumulates it (before the
Trainer clips) and SI subtracts its own penalty gradient 2cΩ(θ − θ*); with LoRA, θ is each target
matrix W = W₀ + s·B·A (see ``cf_strategies.importance``), g = ∂L/∂W comes from layer hooks and the
penalty, computed from A and B directly, is never in it. Other strategies' terms that go through
the model's forward pass (replay, distillation) are in g. Ω is never capped and never negative: a
task whose path integral is negative for a weight adds nothing to its importance. The path
integral reads Δθ across each optimizer step, so it holds for any optimizer (Adam included). One
Ω and one θ* whatever the number of past releases, so the per-step cost is constant: a few
torch._foreach kernels over the trainable weights (with LoRA, also one product B·A and one
δᵀx per target matrix) in ``after_step``.

Several processes (DDP): Δθ is the same on every rank and each rank's g is the gradient of its
own shard of the batch, whose plain mean over the ranks is the gradient DDP steps with; ω is
linear in g, so the mean over the ranks of their ω, taken once in ``after_task``, is the path
integral of the global batches, the same on every rank. The importance of general knowledge
(``estimate_importance``) is computed on the same data on every rank, on purpose: the same Ω.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from cf_strategies.base import (
    Batch,
    align_to,
    example_nll,
    is_causal_lm,
    logits_of,
    move_batch,
    snapshot,
    split_batch,
    trainable_parameters,
)
from cf_strategies.distributed import all_reduce_mean_
from cf_strategies.importance import ImportanceRegulariser, WeightGradients
from cf_strategies.registry import register


@register
class SynapticIntelligence(ImportanceRegulariser):
    """SI: ``c·Σ Ω (θ − θ*)²`` with Ω the path integral of the loss, accumulated over tasks."""

    name = "si"
    stores = "per-weight importances (path integral Ω) and anchor weights θ*"
    flattening_safe = True  # Ω from the step's summed gradients; general data batched itself

    def __init__(
        self, c: Annotated[float, Field(ge=0)] = 1.0, xi: Annotated[float, Field(gt=0)] = 1e-3
    ) -> None:
        super().__init__()
        self.c, self.xi = c, xi
        self._recorder: WeightGradients | None = None  # ∂L/∂W of the LoRA sites, this step
        self._hooks: list[Any] = []  # without LoRA: .grad hooks
        self._start: list[torch.Tensor] = []  # θ at the start of the task
        self._prev: list[torch.Tensor] = []  # θ before the current optimizer step
        self._grad: list[torch.Tensor] = []  # g of the current step (without LoRA)
        self._path: list[torch.Tensor] = []  # ω
        self._diff: list[torch.Tensor] = []  # θ − θ* at the last penalty
        self._coef: float | list[torch.Tensor] = self.c  # the penalty's coefficient(s), last step
        self._penalised = False

    def begin(self, model: nn.Module) -> None:
        super().begin(model)
        self._release_hooks()
        with torch.no_grad():
            self._start = [v.detach().clone() for v in self.values()]
        self._prev = [v.clone() for v in self._start]
        self._path = [torch.zeros_like(v) for v in self._start]
        if self._lora:
            self._recorder = WeightGradients(self._lora).attach()
        else:
            self._grad = [torch.zeros_like(v) for v in self._start]
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._grad_hook(i))
                for i, p in enumerate(self._params.values())
            ]

    def _grad_hook(self, i: int) -> Callable:
        def hook(p: torch.Tensor) -> None:  # .grad so far (accumulation included), unclipped
            self._grad[i].copy_(p.grad)

        return hook

    def _release_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    def coefficients(self, terms: torch.Tensor) -> float | torch.Tensor:
        """The multiplier of each site's term Σ Ω (θ − θ*)² (SI: c for all; HLR overrides)."""
        return self.c

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if not self._sqrt_weights or self.c == 0:
            return None
        terms, self._diff = self.terms()
        coef = self.coefficients(terms.detach())
        self._penalised = True
        if isinstance(coef, float):
            self._coef = coef
            return coef * terms.sum()
        self._coef = list(coef.unbind(0))
        return (coef * terms).sum()

    @torch.no_grad()
    def task_gradient(self) -> list[torch.Tensor]:
        """g of this step: the loss's gradient without the SI term, before clipping."""
        if self._recorder is not None:
            return list(self._recorder.sums.values())
        if not self._penalised:
            return self._grad
        own = self._diff  # g − ∂(own penalty)/∂θ = g − 2·coef·Ω·(θ − θ*)
        if isinstance(self._coef, float):
            scale = -2.0 * self._coef
        else:  # one coefficient per tensor (HLR)
            own = torch._foreach_mul(own, self._coef)
            scale = -2.0
        return torch._foreach_addcmul(self._grad, own, self._weights, value=scale)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if not self._path:
            return
        g = self.task_gradient()
        now = [v.detach() for v in self.values()]
        torch._foreach_sub_(self._prev, now)  # θ_before − θ_after = −Δθ
        torch._foreach_addcmul_(self._path, g, self._prev)  # ω −= g·Δθ
        if self._lora:  # fresh products: keep them
            self._prev = now
            self._recorder.reset()
        else:  # views of the parameters: copy them
            torch._foreach_copy_(self._prev, now)
            torch._foreach_zero_(self._grad)
        self._penalised = False

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if not self._path:
            return
        all_reduce_mean_(self._path)  # several processes: ω of the global batches (module doc)
        names = list(self._lora or self._params)
        denom = torch._foreach_sub([v.detach() for v in self.values()], self._start)
        torch._foreach_mul_(denom, denom)  # (θ_end − θ_start)² + ξ
        torch._foreach_add_(denom, self.xi)
        gain = torch._foreach_maximum(self._path, 0.0)
        torch._foreach_div_(gain, denom)
        self.accumulate(names, gain, 1.0)
        self.snapshot_anchor()
        self._release_hooks()
        self._weights, self._sqrt_weights, self._anchors = [], [], []
        self._start, self._prev, self._grad, self._path = [], [], [], []
        self.tasks += 1

    def agree_task_state(self) -> None:
        """ω averaged over the ranks at a checkpoint rather than only at the task's end: the
        mean is linear, mean_r(ω̄_k + ω_r,after) = mean_r(ω_r), so the end result is unchanged
        and rank 0's checkpoint holds the global ω a resumed run must start from."""
        if self._path:
            all_reduce_mean_(self._path)

    def task_state_dict(self) -> dict[str, Any]:
        """The path integral ω and θ at the task's start, by site name (a fresh adapter's start,
        ΔW = 0, is not stored); θ before the next step is the checkpoint's weights."""
        if not self._path:
            return {}
        names = list(self._lora or self._params)
        state: dict[str, Any] = {f"path.{n}": w for n, w in zip(names, self._path, strict=True)}
        for n, start in zip(names, self._start, strict=True):
            if bool(start.any()):
                state[f"start.{n}"] = start
        return state

    @torch.no_grad()
    def load_task_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not state:
            return
        sites = self.shapes()
        path = {k.removeprefix("path."): v for k, v in state.items() if k.startswith("path.")}
        start = {k.removeprefix("start."): v for k, v in state.items() if k.startswith("start.")}
        self._path = align_to(sites, path, f"{self.name} path integral")
        self._start = align_to(sites, start, f"{self.name} task start")
        now = [v.detach() for v in self.values()]
        if self._lora:
            self._prev = now
        else:
            torch._foreach_copy_(self._prev, now)

    def estimate_importance(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        lr: float = 1e-4,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    ) -> None:
        """Record the importance of each weight for general knowledge on ``batches`` (general
        data) and anchor the penalty to the current weights, before the first task (HLR's
        "general importance recording"). One pass of Adam at ``lr`` with the path integral
        recorded, then the weights are restored: the model is left unchanged.
        ``loss_fn(model, batch)`` defaults to the mean negative log-likelihood of the labels."""
        loss_fn = loss_fn or mean_nll
        params = trainable_parameters(model)
        pretrained = snapshot(params)
        optimizer = torch.optim.Adam(params.values(), lr=lr)
        was_training = model.training
        model.train()
        self.begin(model)  # the loop below adds no penalty: the general loss alone
        device = next(iter(params.values())).device
        for batch in batches:
            loss = loss_fn(model, move_batch(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.after_step(model)
        self.after_task(model)
        with torch.no_grad():
            for p, p0 in zip(params.values(), pretrained.values(), strict=True):
                p.copy_(p0)
                p.grad = None
        self.bind(model)
        self.snapshot_anchor()
        model.train(was_training)


def mean_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The mean over the batch of each example's negative log-likelihood of its labels."""
    args, kwargs, labels = split_batch(batch)
    return example_nll(logits_of(model(*args, **kwargs)), labels, is_causal_lm(model)).mean()
