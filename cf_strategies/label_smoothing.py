"""Label smoothing as a composable term (Szegedy et al., CVPR 2016, "Rethinking the Inception
Architecture for Computer Vision"; Müller et al., NeurIPS 2019, "When Does Label Smoothing Help?").

    loss_ε = (1 − ε) · CE(p, y) + ε · (1/C) Σ_c −log p_c  =  CE + ε · ((1/C) Σ_c −log p_c − CE)

The task loss already holds CE (mean over supervised tokens, or over examples), so ``extra_loss``
adds the second term, computed from the same logits at the same rows: with any other strategy,
``"ewc+label_smoothing"``, the total is the label-smoothed loss plus the other terms. It softens
the targets of new data, so the model's distribution over old answers is pushed less hard.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, Strategy
from cf_strategies.buffer import output_rows, target_rows
from cf_strategies.registry import register


@register
class LabelSmoothing(Strategy):
    """Turns the task's cross-entropy into label-smoothed cross-entropy with weight ``epsilon``."""

    name = "label_smoothing"
    stores = "nothing"
    rank_safe = shard_safe = True  # a term on the logits of the rank's own batch
    flattening_safe = True  # the same label positions, however the batch is laid out

    def __init__(self, epsilon: Annotated[float, Field(ge=0, le=1)] = 0.1):
        self.epsilon = epsilon

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        logits = output_rows(batch, outputs).float()
        if len(logits) == 0:
            return None
        log_p = F.log_softmax(logits, dim=-1)
        uniform = -log_p.mean(dim=-1).mean()
        ce = F.nll_loss(log_p, target_rows(batch))
        return self.epsilon * (uniform - ce)

    def __repr__(self) -> str:
        return f"LabelSmoothing(epsilon={self.epsilon})"
