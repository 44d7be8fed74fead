"""Dark Experience Replay: DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline"; Mammoth's models/der.py, derpp.py).

The buffer keeps every example with the logits z the model gave it at insertion time:

    loss = CE(f(x), y) + α · ‖f(x') − z'‖²  +  β · CE(f(x''), y'')      (x', z'), (x'', y'') ~ M

β = 0 is DER, β > 0 is DER++. Both buffer draws (``ratio`` · batch size examples each) go
through one extra forward pass. Examples enter a reservoir buffer in ``after_task`` with the
logits of the model that finished the task (as Avalanche's DER does).

Causal LMs: logits are kept only at the positions that predict supervised tokens, and only the
``top_k`` largest per position (values in ``logit_dtype`` + int32 vocabulary indices); the α term
matches the student's logits at those indices. Memory per stored example with P supervised
tokens: P·k·(2 + 4) bytes in float16, e.g. P = 64, k = 32: 12 KiB, against P·V·4 = 12 MiB for
full float32 logits over SmolLM2's V = 49152 vocabulary (plus the token ids, 8 bytes per token).
Classifiers (logits of shape (B, C)) keep all C logits unless ``top_k`` < C.

``logit_loss="kl"`` replaces the paper's MSE by a distillation term better suited to an LM, whose
raw logits have an arbitrary offset per position (our choice): T²·Σ_k q_k (log q_k − log p_k),
q = softmax(z'/T) over the kept entries, p = the student's softmax over the whole vocabulary at
the same indices (0 when the student puts all its mass on the kept tokens in the stored ratios).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cf_strategies.base import Batch, Strategy
from cf_strategies.buffer import (
    ReservoirBuffer,
    batch_size,
    collate,
    forward_rows,
    is_token_batch,
    target_positions,
    target_rows,
    unbatch,
)
from cf_strategies.registry import register

LOGITS, INDEX = "_der_logits", "_der_index"


@register
class DER(Strategy):
    """DER (β = 0) and DER++ (β > 0): logit matching on replayed examples, plus their labels."""

    name = "der"

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.5,
        buffer_size: int = 500,
        ratio: float = 1.0,
        top_k: int | None = 32,
        logit_dtype: str = "float16",
        per_task_quota: bool = False,
        pad_token_id: int = 0,
        seed: int = 0,
        logit_loss: str = "mse",
        temperature: float = 1.0,
    ):
        if logit_loss not in ("mse", "kl"):
            raise ValueError(f"der: logit_loss must be 'mse' or 'kl', not {logit_loss!r}")
        self.logit_loss, self.temperature = logit_loss, temperature
        self.alpha, self.beta = alpha, beta
        self.buffer = ReservoirBuffer(buffer_size, per_task_quota, seed)
        self.ratio = ratio
        self.top_k = top_k
        self.logit_dtype = getattr(torch, logit_dtype)
        self.pad_token_id = pad_token_id
        self.task = 0
        self.data_version: str | None = None

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        n = round(self.ratio * batch_size(batch))
        if n == 0 or len(self.buffer) == 0:
            return None
        draws = [self.buffer.sample(n) for _ in range(2 if self.beta else 1)]
        examples = [ex for draw in draws for ex in draw]
        replay = collate([_inputs(ex) for ex in examples], self.pad_token_id)
        device = target_rows(batch).device
        replay = {k: v.to(device) for k, v in replay.items()}
        rows = forward_rows(model, replay)  # one row per stored logit vector
        split = sum(len(_stored(ex)) for ex in draws[0])  # rows of the first draw

        stored = torch.cat([_stored(ex) for ex in draws[0]]).to(device, rows.dtype)
        student = rows[:split]
        if self.logit_loss == "kl":  # log-probabilities over the whole vocabulary first
            student = F.log_softmax(student.float() / self.temperature, dim=-1)
        if INDEX in draws[0][0]:  # top-k: the student's logits at the stored vocabulary indices
            index = torch.cat([_stored(ex, INDEX) for ex in draws[0]]).to(device)
            student = student.gather(-1, index.long())
        if self.logit_loss == "kl":
            log_q = F.log_softmax(stored.float() / self.temperature, dim=-1)
            kl = (log_q.exp() * (log_q - student)).sum(-1).mean()
            loss = self.alpha * kl * self.temperature**2
        else:
            loss = self.alpha * F.mse_loss(student, stored)
        if self.beta:
            targets = target_rows(replay)[split:]
            loss = loss + self.beta * F.cross_entropy(rows[split:], targets)
        return loss

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        was_training = model.training
        model.eval()
        for batch in data or ():
            logits = forward_rows(model, batch)
            if is_token_batch(batch):  # rows of every example, one after the other
                per_example = logits.split(target_positions(batch).sum(1).tolist())
            else:
                per_example = logits.unbind(0)
            for ex, z in zip(unbatch(batch), per_example, strict=True):
                self.buffer.add({**ex, **self._compress(z)}, self.task)
        model.train(was_training)
        self.buffer.versions[self.task] = self.data_version
        self.task += 1

    def _compress(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits to keep for one example: all of them, or the top-k per position."""
        z = z.detach().float().cpu()
        if self.top_k is None or self.top_k >= z.shape[-1]:
            return {LOGITS: z.to(self.logit_dtype)}
        values, index = z.topk(self.top_k, dim=-1)
        return {LOGITS: values.to(self.logit_dtype), INDEX: index.to(torch.int32)}

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task = state["task"]
        self.buffer.load_state_dict(state)

    def __repr__(self) -> str:
        kind = "DER++" if self.beta else "DER"
        return f"{kind}(alpha={self.alpha}, beta={self.beta}, buffer={len(self.buffer)})"


def _inputs(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in example.items() if k not in (LOGITS, INDEX)}


def _stored(example: Mapping[str, torch.Tensor], key: str = LOGITS) -> torch.Tensor:
    """Stored logits (or their indices) as rows: (1, C) for a classifier example, (P, k) for a
    sequence with P supervised tokens."""
    z = example[key]
    return z.reshape(-1, z.shape[-1])
