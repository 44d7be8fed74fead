"""Hierarchical layer-wise and element-wise regularisation (HLR) of fine-tuning.

    loss = task loss + λ · Σ_l α_l R_l,        R_l = Σ_{i ∈ layer l} Ω_i (θ_i − θ*_i)²
    α_l  = L · R_l / Σ_k R_k                   (L layers; recomputed every step, no gradient)
    Ω_i  = Σ_tasks max(ω_i, 0) / (Δθ_i² + ξ),  ω_i = −Σ_steps g_i Δθ_i   (SI's path integral)

Song et al., "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise
and Element-Wise Regularization" (arXiv:2501.13669, 2025).

From the paper (its abstract and method overview): (1) the element-wise importance Ω of each
weight for general knowledge is an SI-style path integral, the weight's contribution to the drop in
loss, damped by ξ, recorded while fine-tuning on general data (the "general importance recording"
phase): ``estimate_importance(model, batches)``; (2) the dual objective: the task's cross-entropy
plus an importance-weighted penalty that keeps the weights important for general knowledge close to
their pre-trained values; (3) layer-wise coefficients that balance the layers' contributions,
recomputed during training. Not checked against the paper's equations (its full text was not at
hand): the form of α_l, each layer's share of the total regularisation loss, as the issue states it.

Our choices: α_l is scaled by the number of layers L (all layers equal gives α_l = 1, so λ keeps
SI's scale) and is a constant in backward (it weights the layers, it is not itself minimised);
a "layer" is the module path up to the first numeric component of a parameter name (a transformer
block ``...layers.7``, or ``0``, ``2`` in an ``nn.Sequential``), otherwise the parameter's module
(embeddings, head, final norm); ``estimate_importance`` runs one pass of Adam on the general data,
records the path integral and then restores the weights, so training starts from (and is anchored
to) the pre-trained weights; without general data, the first task trained with HLR plays the part
of the general task (no penalty on it, as in the paper's first phase). For continual releases,
importance keeps accumulating over every task and θ* moves to the end of each task, exactly as
in SI (which HLR extends: same path integral, same damping ξ, same unregularised gradient).
Several processes: ω is averaged over the ranks as in SI; α_l comes from the weights and Ω, the
same on every rank, so every rank applies the same coefficients.
With LoRA the elements are those of each target matrix W = W₀ + s·B·A, as in SI (see
``cf_strategies.importance``); a target matrix belongs to the block its name names.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from cf_strategies.registry import register
from cf_strategies.si import SynapticIntelligence


@register
class HLR(SynapticIntelligence):
    """SI's element-wise importance with layer-wise coefficients: ``λ·Σ_l α_l R_l``."""

    name = "hlr"
    stores = "per-weight importances (SI's path integral Ω) and anchor weights θ*"

    def __init__(
        self,
        lambda_: Annotated[float, Field(ge=0)] = 1.0,
        xi: Annotated[float, Field(gt=0)] = 1e-3,
        layer_balance: bool = True,
    ) -> None:
        super().__init__(c=lambda_, xi=xi)
        self.lambda_ = self.c
        self.layer_balance = layer_balance
        self._layer_index: torch.Tensor | None = None  # layer of each site
        self._layers = 0

    def begin(self, model: nn.Module) -> None:
        super().begin(model)
        layers = [layer_of(n) for n in (self._lora or self._params)]
        ids = {layer: i for i, layer in enumerate(dict.fromkeys(layers))}
        device = self._start[0].device if self._start else None
        self._layer_index = torch.tensor([ids[x] for x in layers], device=device)
        self._layers = len(ids)

    def coefficients(self, terms: torch.Tensor) -> float | torch.Tensor:
        """λ·α_l for each tensor, α_l = L·R_l/Σ R (1 everywhere without layer balance)."""
        if not self.layer_balance:
            return self.lambda_
        per_layer = torch.zeros(self._layers, dtype=terms.dtype, device=terms.device)
        per_layer.index_add_(0, self._layer_index, terms)
        alpha = self._layers * per_layer / per_layer.sum().clamp_min(1e-30)
        return self.lambda_ * alpha[self._layer_index]


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its path up to the first numeric component
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its module path."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name
