"""Synaptic Intelligence: each weight's importance is its share of the drop in the training loss.

    loss = task loss + c · Σ_i Ω_i (θ_i − θ*_i)²
    during a task:  ω_i = −Σ_steps g_i(t) · Δθ_i(t)           (Δθ(t): the change made by optimizer step t)
    after a task:   Ω_i ← Ω_i + max(ω_i, 0) / ((θ_i^end − θ_i^start)² + ξ),   θ* ← θ^end

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence" (ICML 2017).
As in the paper's code, g is the gradient of the loss *without* the SI term: SI subtracts its own
penalty gradient 2cΩ(θ − θ*) from ``.grad`` (other strategies' terms and gradient clipping stay in
it). Ω is never capped and never negative: a task whose path integral is negative for a weight
adds nothing to its importance. The path integral reads Δθ across each optimizer step, so it holds
for any optimizer (Adam included). One Ω and one θ* whatever the number of past releases, so the
per-step cost is constant: a few torch._foreach kernels over the trainable weights in
``after_backward`` and ``after_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cf_strategies.base import (
    Batch,
    Strategy,
    align_to,
    example_nll,
    is_causal_lm,
    logits_of,
    move_batch,
    quadratic_terms,
    snapshot,
    split_batch,
    trainable_parameters,
)
from cf_strategies.registry import register


@register
class SynapticIntelligence(Strategy):
    """SI: ``c·Σ Ω (θ − θ*)²`` with Ω the path integral of the loss, accumulated over tasks."""

    name = "si"

    def __init__(self, c: float = 1.0, xi: float = 1e-3) -> None:
        self.c, self.xi = float(c), float(xi)
        if self.c < 0 or self.xi <= 0:
            raise ValueError(f"{self.name}: need a strength >= 0 and xi > 0, got {c}, {xi}")
        self.tasks = 0
        self._omega: dict[str, torch.Tensor] = {}  # Ω by parameter name (float32): the state
        self._anchor: dict[str, torch.Tensor] = {}  # θ* by parameter name
        self._params: list[nn.Parameter] = []  # this task's working lists, in the same order
        self._importance: list[torch.Tensor] = []  # Ω
        self._sqrt_importance: list[torch.Tensor] = []  # √Ω: the penalty's weights
        self._anchors: list[torch.Tensor] = []  # θ*
        self._start: list[torch.Tensor] = []  # θ at the start of the task
        self._prev: list[torch.Tensor] = []  # θ before the current optimizer step
        self._grad: list[torch.Tensor] = []  # g of the current step, without the SI term
        self._path: list[torch.Tensor] = []  # ω
        self._diff: list[torch.Tensor] = []  # θ − θ* at the last penalty
        self._coef: float | list[torch.Tensor] = self.c  # the penalty's coefficient(s), last step
        self._penalised = False

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        params = trainable_parameters(model)
        self._params = list(params.values())
        self._importance = []
        if self._omega:
            self._importance = align_to(params, self._omega, f"{self.name} importance")
            self._sqrt_importance = torch._foreach_sqrt(self._importance)
            self._anchors = align_to(
                params, self._anchor, f"{self.name} anchor", missing=torch.clone
            )
        self._start = [p.detach().clone() for p in self._params]
        self._prev = [p.detach().clone() for p in self._params]
        self._grad = [torch.zeros_like(p) for p in self._params]
        self._path = [torch.zeros_like(p) for p in self._params]

    def coefficients(self, terms: torch.Tensor) -> float | torch.Tensor:
        """The multiplier of each tensor's term Σ Ω (θ − θ*)² (SI: c for all; HLR overrides)."""
        return self.c

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if not self._importance or self.c == 0:
            return None
        with torch.no_grad():  # θ − θ*, kept for after_backward
            self._diff = torch._foreach_sub(self._params, self._anchors)
        terms = quadratic_terms(self._params, None, self._sqrt_importance, diffs=self._diff)
        coef = self.coefficients(terms.detach())
        self._penalised = True
        if isinstance(coef, float):
            self._coef = coef
            return coef * terms.sum()
        self._coef = list(coef.unbind(0))
        return (coef * terms).sum()

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if not self._params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if not self._penalised:
            torch._foreach_copy_(self._grad, grads)
            return
        # g − ∂(own penalty)/∂θ = g − 2·coef·Ω·(θ − θ*)
        own, self._diff = self._diff, []
        if isinstance(self._coef, float):
            scale = -2.0 * self._coef
        else:  # one coefficient per tensor (HLR)
            torch._foreach_mul_(own, self._coef)
            scale = -2.0
        self._grad = torch._foreach_addcmul(grads, own, self._importance, value=scale)
        self._penalised = False

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if not self._params:
            return
        torch._foreach_sub_(self._prev, self._params)  # θ_before − θ_after = −Δθ
        torch._foreach_addcmul_(self._path, self._grad, self._prev)  # ω −= g·Δθ
        torch._foreach_copy_(self._prev, self._params)

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if not self._params:
            return
        names = list(trainable_parameters(model))
        denom = torch._foreach_sub(self._params, self._start)  # (θ_end − θ_start)² + ξ
        torch._foreach_mul_(denom, denom)
        torch._foreach_add_(denom, self.xi)
        gain = torch._foreach_maximum(self._path, 0.0)
        torch._foreach_div_(gain, denom)
        for name, g in zip(names, gain, strict=True):
            old = self._omega.get(name)
            self._omega[name] = g.float() if old is None else old.to(g.device) + g.float()
        self._anchor = {n: p.detach().clone() for n, p in zip(names, self._params, strict=True)}
        self._params, self._importance, self._sqrt_importance, self._anchors = [], [], [], []
        self._start, self._prev, self._grad, self._path = [], [], [], []
        self.tasks += 1

    def reanchor(self, model: nn.Module) -> None:
        params = trainable_parameters(model)
        self._anchor = {n: params[n].detach().clone() for n in self._omega if n in params}

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
        self.before_task(model)  # the loop below adds no penalty: the general loss alone
        device = next(iter(params.values())).device
        for batch in batches:
            loss = loss_fn(model, move_batch(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.after_backward(model)
            optimizer.step()
            self.after_step(model)
        self.after_task(model)
        with torch.no_grad():
            for p, p0 in zip(params.values(), pretrained.values(), strict=True):
                p.copy_(p0)
                p.grad = None
        self._anchor = pretrained
        model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": self.tasks}
        state.update({f"omega.{k}": v for k, v in self._omega.items()})
        state.update({f"anchor.{k}": v for k, v in self._anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = int(state.get("tasks", 0))
        self._omega = {k[6:]: v for k, v in state.items() if k.startswith("omega.")}
        self._anchor = {k[7:]: v for k, v in state.items() if k.startswith("anchor.")}
        if set(self._omega) != set(self._anchor):
            raise ValueError(f"{self.name}: saved importance and anchor cover different parameters")
        self._params, self._importance, self._sqrt_importance, self._anchors = [], [], [], []


def mean_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The mean over the batch of each example's negative log-likelihood of its labels."""
    args, kwargs, labels = split_batch(batch)
    return example_nll(logits_of(model(*args, **kwargs)), labels, is_causal_lm(model)).mean()
