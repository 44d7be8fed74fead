"""Dark Experience Replay: DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline"; Mammoth's models/der.py, derpp.py).

The buffer keeps every example with the logits z the model gave it at insertion time:

    loss = CE(f(x), y) + α · ‖f(x') − z'‖²  +  β · CE(f(x''), y'')      (x', z'), (x'', y'') ~ M

β = 0 is DER, β > 0 is DER++. Both buffer draws (``ratio`` · batch size examples each) go
through one extra forward pass. Examples enter a reservoir buffer (Replay's,
:class:`~cf_strategies.replay.BufferStrategy`) in ``after_task`` with the logits of the model
that finished the task (as Avalanche's DER does). With several processes each rank computes the
logits of its shard of the task and the buffer is filled from every rank's, the same on all.

Causal LMs: logits are kept only at the positions that predict supervised tokens, and only the
``top_k`` largest per position (values in ``logit_dtype`` + int32 vocabulary indices), with the
log of the probability mass the teacher put on all other tokens, ρ = log Σ_{j∉K} softmax(z)_j
(float32, computed over the full vocabulary at insertion). The MSE term matches the student's
logits at the kept indices. Memory per stored example with P supervised tokens: P·(k·(2 + 4) + 4)
bytes in float16, e.g. P = 64, k = 32: 12.3 KiB, against P·V·4 = 12 MiB for full float32 logits
over SmolLM2's V = 49152 vocabulary (plus the token ids, 8 bytes per token). Classifiers (logits
of shape (B, C)) keep all C logits unless ``top_k`` < C.

``logit_loss="kl"`` replaces the paper's MSE by a distillation term better suited to an LM, whose
raw logits have an arbitrary offset per position (our choice). With top-k it is the KL between
the two full-vocabulary distributions with the tokens outside the stored set K merged into one
"rest" outcome, k + 1 outcomes in all:

    q = [ (1 − e^ρ) · softmax(z_K),  e^ρ ]                 the teacher, exact from what is stored
    p = [ softmax(f(x))_K,  1 − Σ_K softmax(f(x)) ]         the student, over its full vocabulary
    term = T² · Σ_{k+1} q^T (log q^T − log p^T),   q^T = softmax(log q / T), p^T likewise

Why: it is 0, with a zero gradient, exactly when the student's distribution equals the teacher's
(its logits equal the stored ones up to an offset), and it is the exact KL of the coarsened
distributions (≤ the full-vocabulary KL), so a student that moves mass from the kept tokens to
any other token is pulled back. Renormalising the student over K alone would miss that, and
renormalising only the teacher (the earlier version) left a loss of −log Σ_K p > 0 and a gradient
at the teacher itself. The temperature softens the k + 1 outcomes (the rest as one outcome), so
ρ is stored once, at T = 1, whatever ``temperature`` and ``logit_loss`` are used later. Without
top-k (all logits kept) the term is the plain T²·KL(softmax(z/T) ‖ softmax(f(x)/T)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cf_strategies.base import Batch
from cf_strategies.buffer import (
    Example,
    collate,
    forward_rows,
    is_token_batch,
    target_positions,
    target_rows,
    to_device,
    unbatch,
)
from cf_strategies.registry import register
from cf_strategies.replay import BufferStrategy, NonNegativeFloat, NonNegativeInt

LOGITS, INDEX, REST = "_der_logits", "_der_index", "_der_rest"
STORED = (LOGITS, INDEX, REST)
# The rest mass of examples saved before it was kept: unknown, so both sides compare on the kept
# tokens only (a log-probability that takes the outcome out of a softmax, finite so KL stays 0·x).
UNKNOWN_REST = -1e9


def teacher_log_probs(values: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
    """(N, k + 1) log q: the stored top-k logits at their full-vocabulary probabilities
    (1 − e^ρ)·softmax(z_K), then the rest ρ."""
    kept_mass = _log1mexp(log_rest.float())
    kept = F.log_softmax(values.float(), dim=-1) + kept_mass[:, None]
    return torch.cat([kept, log_rest.float()[:, None]], dim=-1)


def student_log_probs(
    logits: torch.Tensor, index: torch.Tensor, log_rest: torch.Tensor
) -> torch.Tensor:
    """(N, k + 1) log p: the student's full-vocabulary log-softmax at ``index``, then the log of
    its mass on every other token (UNKNOWN_REST where the teacher's rest is unknown)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    rest = log_p.scatter(-1, index, float("-inf")).logsumexp(-1)
    rest = torch.where(log_rest <= UNKNOWN_REST / 2, UNKNOWN_REST, rest)
    return torch.cat([log_p.gather(-1, index), rest[:, None]], dim=-1)


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over rows (logits or
    log-probabilities alike: both are renormalised at T)."""
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature**2


@register
class DER(BufferStrategy):
    """DER (β = 0) and DER++ (β > 0): logit matching on replayed examples, plus their labels."""

    name = "der"
    stores = "raw examples and their logits (top-k per supervised token)"
    # every rank computes the logits of its own shard; the buffer is filled from all of them
    rank_safe = shard_safe = True

    def __init__(
        self,
        alpha: NonNegativeFloat = 0.3,
        beta: NonNegativeFloat = 0.5,
        buffer_size: NonNegativeInt = 500,
        ratio: NonNegativeFloat = 1.0,
        top_k: Annotated[int, Field(ge=1)] | None = 32,
        logit_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        per_task_quota: bool = False,
        pad_token_id: NonNegativeInt | None = None,
        seed: int = 0,
        logit_loss: Literal["mse", "kl"] = "mse",
        temperature: Annotated[float, Field(gt=0)] = 1.0,
    ):
        super().__init__(buffer_size, ratio, per_task_quota, pad_token_id, seed)
        self.logit_loss, self.temperature = logit_loss, temperature
        self.alpha, self.beta = alpha, beta
        self.top_k = top_k
        self.logit_dtype = getattr(torch, logit_dtype)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        draws = [self.draw(batch) for _ in range(2 if self.beta else 1)]
        if not draws[0]:
            return None
        examples = [ex for draw in draws for ex in draw]
        replay = collate([_inputs(ex) for ex in examples], self.pad_token_id)
        device = target_rows(batch).device
        replay = to_device(replay, device)
        rows = forward_rows(model, replay)  # one row per stored logit vector
        split = sum(len(_rows(ex, LOGITS)) for ex in draws[0])  # rows of the first draw
        stored = {
            key: torch.cat([_rows(ex, key) for ex in draws[0]]).to(device)
            for key in STORED
            if key in draws[0][0]
        }
        loss = self.alpha * self.logit_term(rows[:split], stored)
        if self.beta:
            targets = target_rows(replay)[split:]
            loss = loss + self.beta * F.cross_entropy(rows[split:], targets)
        return loss

    def logit_term(self, student: torch.Tensor, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MSE to the stored logits (at the stored indices), or the tempered KL (module doc)."""
        values, index = stored[LOGITS], stored.get(INDEX)
        if self.logit_loss == "mse":
            if index is not None:
                student = student.gather(-1, index.long())
            return F.mse_loss(student, values.to(student.dtype))
        if index is not None:
            log_rest = stored[REST]
            student = student_log_probs(student, index.long(), log_rest)
            values = teacher_log_probs(values, log_rest)
        return tempered_kl(student, values, self.temperature)

    def examples(self, model: nn.Module, batch: Batch) -> list[Example]:
        """The batch's rows, each with the logits ``model`` gives it (compressed)."""
        logits = forward_rows(model, batch)
        if is_token_batch(batch):  # rows of every example, one after the other
            per_example = logits.split(target_positions(batch).sum(1).tolist())
        else:
            per_example = logits.unbind(0)
        return [
            {**ex, **self._compress(z)} for ex, z in zip(unbatch(batch), per_example, strict=True)
        ]

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        was_training = model.training
        model.eval()
        super().after_task(model, data)
        model.train(was_training)

    def _compress(self, z: torch.Tensor) -> Example:
        """The logits to keep for one example: all of them, or the top-k per position with the
        log of the rest's probability mass."""
        z = z.detach().float().cpu()
        if self.top_k is None or self.top_k >= z.shape[-1]:
            return {LOGITS: z.to(self.logit_dtype)}
        values, index = z.topk(self.top_k, dim=-1)
        log_rest = z.scatter(-1, index, float("-inf")).logsumexp(-1) - z.logsumexp(-1)
        return {LOGITS: values.to(self.logit_dtype), INDEX: index.to(torch.int32), REST: log_rest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for ex in self.buffer.examples:  # saved before the rest mass was kept
            if INDEX in ex and REST not in ex:
                ex[REST] = torch.full(ex[INDEX].shape[:-1], UNKNOWN_REST)

    def __repr__(self) -> str:
        kind = "DER++" if self.beta else "DER"
        return f"{kind}(alpha={self.alpha}, beta={self.beta}, buffer={len(self.buffer)})"


def _inputs(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in example.items() if k not in STORED}


def _rows(example: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """Stored logits or their indices as rows, (1, C) for a classifier example and (P, k) for a
    sequence with P supervised tokens; the rest masses as (1,) or (P,)."""
    z = example[key]
    return z.reshape(-1) if key == REST else z.reshape(-1, z.shape[-1])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-x.exp()))
