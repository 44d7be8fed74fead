"""L2-SP: an L2 penalty toward the weights at the start of the task.

    loss = task loss + λ/2 · Σ_i (θ_i − θ⁰_i)²,    θ⁰ = the trainable weights when the task starts

Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks" (ICML 2018): the α/2·‖w − w⁰‖² term they call L2-SP (their β-term on newly added layers
has no counterpart here: a continually fine-tuned model gains no layers). Every parameter is pulled
back equally; EWC, SI and HLR weight the pull by an importance. θ⁰ is re-taken at each task, so no
state survives between releases. With LoRA only the adapter weights are penalised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cf_strategies.base import Batch, Strategy, quadratic_terms, trainable_parameters
from cf_strategies.registry import register


@register
class L2(Strategy):
    """L2-SP: ``λ/2·‖θ − θ⁰‖²`` toward the weights at the start of the task."""

    name = "l2"
    stores = "nothing (its anchor is the weights at the task's start, held only while training)"
    rank_safe = True  # the anchor is the weights, the same on every rank
    flattening_safe = True  # a term on the weights alone

    def __init__(self, lambda_: float = 1.0) -> None:
        self.lambda_ = float(lambda_)
        if self.lambda_ < 0:
            raise ValueError(f"l2: lambda_ must be >= 0, got {lambda_}")
        self._params: list[nn.Parameter] = []
        self._anchors: list[torch.Tensor] = []

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self._params = list(trainable_parameters(model).values())
        self._anchors = [p.detach().clone() for p in self._params]

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if not self._params or self.lambda_ == 0:
            return None
        return 0.5 * self.lambda_ * quadratic_terms(self._params, self._anchors).sum()

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self._params, self._anchors = [], []
