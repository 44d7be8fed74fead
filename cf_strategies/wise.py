"""Weight-space interpolation toward the start of the task (WiSE-FT, model averaging).

    after the task:  θ ← θ⁰ + mix · (θ − θ⁰),      θ⁰ = the trainable weights when the task began

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022, WiSE-FT); for LLMs, Lin et
al., "Mitigating the Alignment Tax of RLHF" (EMNLP 2024), where averaging the weights before and
after fine-tuning gave the best trade-off between what is learnt and what is forgotten.
Training itself is plain; ``mix`` = 1 is naive fine-tuning, 0 keeps the old model.

With LoRA only the B matrices are interpolated, A stays as trained, so that the update
ΔW = B·A of an adapter started at B = 0 becomes exactly mix · ΔW (interpolating A too would
make it a product of two interpolations). Composes with any other strategy: it acts once, after the task.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, Strategy, trainable_parameters
from cf_strategies.registry import register

LORA_A = (".lora_A.", ".lora_embedding_A.")


@register
class WiSE(Strategy):
    """Interpolate the trained weights back toward the task's start: ``θ⁰ + mix·(θ − θ⁰)``."""

    name = "wise"
    stores = "nothing (the task's starting weights, held only while training)"
    rank_safe = True  # interpolates weights that are the same on every rank
    flattening_safe = True  # acts on the weights, after the task

    def __init__(self, mix: Annotated[float, Field(ge=0, le=1)] = 0.5) -> None:
        self.mix = mix
        self._start: dict[str, torch.Tensor] = {}

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self._start = {
            name: p.detach().clone()
            for name, p in trainable_parameters(model).items()
            if not any(a in name for a in LORA_A)
        }

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        params = trainable_parameters(model)
        for name, start in self._start.items():
            params[name].lerp_(start.to(params[name].device), 1.0 - self.mix)
        self._start = {}
