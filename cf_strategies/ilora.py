"""I-LoRA: a fast and a slow LoRA learner with replay and hidden-state consistency (Ren et al.
2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning",
arXiv 2402.18865; a LoRA form of CLS-ER's fast/slow learners).

    after every optimizer step t:   θ_s ← λ_t · θ_s + (1 − λ_t) · θ_f
    loss = CE(f_θf(x), y) + β · CE(f_θf(x_m), y_m) + γ · MSE(h_θf(x_m), h_θs(x_m)),   x_m ~ M

θ_f is the fast (plastic) learner: the model's own trainable weights, trained by the optimizer.
θ_s is the slow (stable) learner: an exponential moving average of θ_f, kept by this strategy.

The interpolation convention: λ (``lambda_``) is the weight of the slow side, the formula above
as the authors' released code applies it (``ema_alpha`` there; some re-implementations give
that name to the weight of the fast side instead), once per optimizer step (not per micro-batch
under gradient accumulation). λ = 0 makes θ_s = θ_f; λ → 1 freezes θ_s. With ``warmup`` (the
authors' code's schedule) λ_t = min(λ, t / (t + 1)) at the t-th step of the task, so θ_s is the
plain mean of θ_f's start and its first t iterates for as long as t / (t + 1) ≤ λ: with the
default λ = 0.99, the mean of the whole trajectory of a release of up to 99 steps (our default;
the authors' code uses λ = 0.25, which leaves θ_s only λ / (1 − λ) = 1/3 step behind θ_f). A and
B of each LoRA matrix are averaged separately, as in the authors' code, so the slow update is
B_s·A_s, not the average of the B·A products.

M is a reservoir buffer of earlier tasks' examples (replay's :class:`BufferStrategy`: filled in
``after_task``, saved with the model version, replayed from the next task on). Each step draws
``round(ratio · |batch|)`` of them and runs them twice: through the fast learner (with
gradients; its CE on their labels is the replay term, weight β = ``replay_weight``) and through
the slow learner (no gradients, eval mode, LM head on one position only). The slow forward uses
θ_s in place of the model's trainable weights for that one call (``torch.func.functional_call``):
the model never holds a second adapter. The consistency term is the mean squared difference of
their hidden states, weight γ = ``consistency_weight``: every hidden state the model returns
(the embeddings and each layer's output, the last after the final norm, as the authors' code
compares) or those at ``layers`` (indices into that tuple, e.g. ``[-1]``), averaged over the
non-padding positions (our choice: the authors' code also counts padding). θ_s is kept in
float32 whatever the adapter's dtype, so that small (1 − λ) steps are not rounded away.
``one_sided`` reproduces the authors' code's target max(h_f, h_s) element-wise, which penalises
only the elements where the fast learner is below the slow one. The authors also halve the sum
of the new and the replayed CE; here the task loss is left as it is and β scales the replay.
Nothing is replayed and no consistency is computed while the buffer is empty (the first task).

What is kept, and merged: ``after_task`` copies θ_s into the model's trainable weights (the one
LoRA adapter's A and B), discarding θ_f. A pipeline that then calls ``merge_and_unload()``
merges W + (α/r)·B_s·A_s into each target matrix: the slow learner, at the inference cost of
one LoRA model. The next task starts both learners from the model it is given (in the
pipeline: the merged champion with a fresh adapter, ΔW = 0, which is the previous slow
learner). So θ_s is not part of the saved state: at the end of a task it *is* the model's
adapter, registered with the model; the saved state is the buffer (safetensors + JSON).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from cf_strategies.base import Batch, snapshot, trainable_parameters
from cf_strategies.buffer import _accepts_logits_to_keep, collate, to_device
from cf_strategies.lwf import _unwrap
from cf_strategies.registry import register
from cf_strategies.replay import BufferStrategy, NonNegativeFloat, NonNegativeInt


def consistency_loss(
    fast: Sequence[torch.Tensor],
    slow: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    one_sided: bool = False,
) -> torch.Tensor:
    """Mean over hidden states of mean((h_f − t)²), t = h_s (or max(h_f, h_s) when
    ``one_sided``), over the positions where ``mask`` (B, T) is true and every feature.
    Gradients flow into ``fast`` only: 2·(h_f − t)/N, toward the slow learner."""
    terms = []
    # the kept positions found once (one host sync), not by a boolean index per hidden state
    kept = None if mask is None else mask.bool().flatten().nonzero().squeeze(1)
    for f, s in zip(fast, slow, strict=True):
        diff = f.float() - s.detach().float()
        if one_sided:  # h_f − max(h_f, h_s) = min(h_f − h_s, 0)
            diff = diff.clamp(max=0)
        squared = diff.square()
        if kept is not None:  # the rows squared[mask], in the same order
            squared = squared.flatten(0, 1).index_select(0, kept)
        terms.append(squared.mean())
    return torch.stack(terms).mean()


@register
class ILoRA(BufferStrategy):
    """Fast LoRA trained, slow LoRA its moving average, replay + consistency; the slow one kept."""

    name = "ilora"
    stores = "raw examples (a reservoir buffer); the slow learner is the saved model itself"

    def __init__(
        self,
        lambda_: Annotated[float, Field(ge=0, le=1)] = 0.99,
        warmup: bool = True,
        consistency_weight: NonNegativeFloat = 1.0,
        replay_weight: NonNegativeFloat = 1.0,
        layers: list[int] | None = None,
        one_sided: bool = False,
        buffer_size: NonNegativeInt = 500,
        ratio: NonNegativeFloat = 1.0,
        per_task_quota: bool = False,
        pad_token_id: NonNegativeInt | None = None,
        seed: int = 0,
    ):
        super().__init__(buffer_size, ratio, per_task_quota, pad_token_id, seed)
        self.lambda_, self.warmup = lambda_, warmup
        self.consistency_weight, self.replay_weight = consistency_weight, replay_weight
        self.layers, self.one_sided = layers, one_sided
        self.slow: dict[str, torch.Tensor] = {}  # θ_s by parameter name, float32
        self.steps = 0  # optimizer steps in this task

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        """Both learners start from the model's trainable weights."""
        params = trainable_parameters(_unwrap(model))
        self.slow = {name: t.float() for name, t in snapshot(params).items()}
        self.steps = 0

    def interpolation_weight(self, step: int) -> float:
        """λ_t of the update after the t-th optimizer step of a task (t = 1, 2, ...)."""
        return min(self.lambda_, step / (step + 1)) if self.warmup else self.lambda_

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if not self.slow:
            raise RuntimeError("ilora: before_task must be called before training")
        self.steps += 1
        lam = self.interpolation_weight(self.steps)
        params = trainable_parameters(_unwrap(model))
        slow = list(self.slow.values())
        torch._foreach_mul_(slow, lam)
        torch._foreach_add_(slow, [params[n].detach().float() for n in self.slow], alpha=1 - lam)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        replayed = self.draw(batch)
        if not replayed:
            return None
        if not self.slow:
            raise RuntimeError("ilora: before_task must be called before training")
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "ilora replays token batches (dicts with input_ids) of a transformers model"
            )
        replay = to_device(collate(replayed, self.pad_token_id), batch["input_ids"].device)
        fast = model(**replay, output_hidden_states=True)
        slow_hidden = self.slow_hidden_states(model, replay)
        loss = self.consistency_weight * consistency_loss(
            self.select(fast.hidden_states),
            self.select(slow_hidden),
            replay.get("attention_mask"),
            self.one_sided,
        )
        if self.replay_weight:
            loss = loss + self.replay_weight * fast.loss
        return loss

    def select(self, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states the consistency term compares: all, or those at ``layers``."""
        if self.layers is None:
            return list(hidden_states)
        return [hidden_states[i] for i in self.layers]

    @torch.no_grad()
    def slow_hidden_states(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        """The slow learner's hidden states on ``batch``: the model with θ_s in place of its
        trainable weights for this call, in eval mode, without gradients."""
        model = _unwrap(model)
        params = trainable_parameters(model)
        slow = {n: t.to(params[n].dtype) for n, t in self.slow.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        inputs.update(output_hidden_states=True, use_cache=False)
        if _accepts_logits_to_keep(model):
            inputs["logits_to_keep"] = 1  # the LM head is not needed here
        was_training = model.training
        model.eval()
        try:
            return functional_call(model, slow, args=(), kwargs=inputs).hidden_states
        finally:
            model.train(was_training)

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        """Keep the slow learner: θ_s into the model's trainable weights; then fill the buffer."""
        params = trainable_parameters(_unwrap(model))
        for name, slow in self.slow.items():
            params[name].copy_(slow)
        self.slow = {}
        super().after_task(model, data)

    def task_state_dict(self) -> dict[str, Any]:
        """The slow learner θ_s and the steps taken in this task (λ_t's schedule)."""
        if not self.slow:
            return {}
        return {"steps": self.steps, **{f"slow.{n}": t for n, t in self.slow.items()}}

    def load_task_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        if not state:
            return
        slow = {k.removeprefix("slow."): v for k, v in state.items() if k.startswith("slow.")}
        if set(slow) != set(self.slow):
            raise ValueError("ilora: the checkpoint's slow learner is for other parameters")
        self.slow = {n: slow[n].to(t.device, torch.float32) for n, t in self.slow.items()}
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return (
            f"ILoRA(lambda_={self.lambda_}, warmup={self.warmup}, "
            f"consistency_weight={self.consistency_weight}, replay_weight={self.replay_weight}, "
            f"buffer={len(self.buffer)}/{self.buffer.capacity}, ratio={self.ratio})"
        )
