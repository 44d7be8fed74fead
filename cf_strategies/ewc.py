"""Online Elastic Weight Consolidation: a diagonal-Fisher penalty toward the previous weights.

    loss = task loss + λ/2 · Σ_i F_i (θ_i − θ*_i)²
    after each task:  F ← γ·F + F_task,   θ* ← θ,
    F_task,i = 1/N Σ_n (∂ log p(y_n | x_n; θ) / ∂θ_i)²      (N ≤ fisher_samples examples of the task)

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks" (PNAS 2017); the online
form with decay γ is Schwarz et al., "Progress & Compress" (ICML 2018). One Fisher and one anchor
whatever the number of past releases, so the per-step cost stays constant (γ = 1 sums the Fisher of
every past task; γ < 1 lets old tasks fade).

The Fisher is a mean of per-example squared gradients, not of squared minibatch-mean gradients
(which shrink it, by up to the batch size, as the examples' gradients cancel). They are computed
exactly and batched: in closed form for an MLP, else with torch.func (vmap of grad) on chunks of
``fisher_batch_size`` examples, else example by example (see ``diagonal_fisher``).
``fisher="empirical"`` takes y_n from the data (the empirical Fisher); ``fisher="true"`` samples
y_n from the model's own prediction p(·|x_n) (the true Fisher, one sample per example). For a
sequence, log p is the mean over its labelled tokens, so F does not grow with sequence length.

Several processes (DDP): each rank measures its shard of the task's data (its share of
``fisher_samples``) and the sums and counts are added over the ranks, so every rank holds the
same Fisher, the mean over all the examples, as one process would compute it on the whole task
(when the task's size is not a multiple of ranks × batch size, the few examples accelerate
repeats to give every rank its last batch count twice).

With LoRA, θ is each target matrix W = W₀ + s·B·A, not the adapter's A and B (see
``cf_strategies.importance``): F is the Fisher of W, the penalty λ/2·Σ F (W − W*)² is EWC's on the
model's weights, and both carry over when the adapter is merged and a fresh one starts the next
release (W* = the merged weights). Per-example gradients of W come from layer hooks
(``lora_fisher``), exact for any padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from cf_strategies.base import (
    Batch,
    example_nll,
    is_causal_lm,
    logits_of,
    move_batch,
    split_batch,
)
from cf_strategies.distributed import rank_share, reduce_mean_
from cf_strategies.importance import ImportanceRegulariser, LoraSite, WeightGradients
from cf_strategies.registry import register


@register
class EWC(ImportanceRegulariser):
    """Online EWC: ``λ/2·Σ F (θ − θ*)²`` with a per-example diagonal Fisher, decayed by γ."""

    name = "ewc"
    stores = "per-weight importances (Fisher diagonal) and anchor weights θ*"

    def __init__(
        self,
        lambda_: Annotated[float, Field(ge=0)] = 100.0,
        gamma: Annotated[float, Field(ge=0, le=1)] = 1.0,
        fisher: Literal["empirical", "true"] = "empirical",
        fisher_samples: Annotated[int, Field(ge=1)] = 1024,
        fisher_batch_size: Annotated[int, Field(ge=1)] = 16,
    ) -> None:
        super().__init__()
        self.lambda_, self.gamma = lambda_, gamma
        self.fisher, self.fisher_samples = fisher, fisher_samples
        self.fisher_batch_size = fisher_batch_size

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if not self._sqrt_weights or self.lambda_ == 0:
            return None
        terms, _ = self.terms()
        return 0.5 * self.lambda_ * terms.sum()

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.consolidate(model, data, across_ranks=True)

    def consolidate(
        self, model: nn.Module, data: Iterable[Batch] | None, across_ranks: bool
    ) -> None:
        """F ← γ·F + F_task (the Fisher of ``data`` at the current weights), θ* ← θ.
        ``across_ranks``: with several processes ``data`` is this rank's shard of the task, and
        F_task is the mean over every rank's examples (``fisher_samples`` in all), the same on
        every rank and equal to one process's on the whole task."""
        if data is None:
            raise ValueError("ewc: after_task needs the task's data to estimate the Fisher")
        names = self.bind(model)
        args = (data, self.fisher, self.fisher_samples, self.fisher_batch_size, across_ranks)
        if self._lora:
            fisher = lora_fisher(model, self._lora, *args)
        else:
            fisher = diagonal_fisher(model, self._params, *args)
        self.accumulate(names, [fisher[n] for n in names], self.gamma)
        self.snapshot_anchor()
        self._weights, self._sqrt_weights, self._anchors = [], [], []
        self.tasks += 1

    def estimate_importance(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Consolidate general knowledge before the first task: the Fisher of ``batches`` (general
        data, e.g. the model's own answers to general prompts) at the current weights, which
        become θ*. The same as ``after_task`` on that data, except with several processes: the
        general data is the same on every rank (greedy answers of the same model to the same
        prompts), so each rank computes the same Fisher from all of it, on purpose, unreduced."""
        self.consolidate(model, batches, across_ranks=False)


def diagonal_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    data: Iterable[Batch],
    kind: str = "empirical",
    max_samples: int = 1024,
    chunk: int = 16,
    across_ranks: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean over at most ``max_samples`` examples of the squared per-example gradient of
    ``−log p(y|x)`` for each of ``params`` (float32), with the model in eval mode.
    ``across_ranks`` (several processes, ``data`` a rank's shard): the mean over the examples of
    every rank, each taking its share of ``max_samples`` (``reduce_mean``).

    Per-example gradients come from the cheapest exact method that applies: a closed form when
    every parameter belongs to an ``nn.Linear`` fed one vector per example (an MLP: Σ_n g_n²·x_n²
    is one matrix product per layer); else torch.func's vmap of grad, ``chunk`` examples at a time
    (transformers models); else a loop over examples (a model vmap cannot run)."""
    names, plist = list(params), list(params.values())
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
    causal = is_causal_lm(model)
    linear = _linear_owners(model, params)
    method = "linear" if linear else "vmap"
    budget = rank_share(max_samples) if across_ranks else max_samples
    chunks = _examples(model, data, plist[0].device, kind, budget, causal)
    seen = 0
    for a, kw, y in chunks(lambda n: n if method == "linear" else chunk):  # noqa: B023 (follows the method)
        squares = None
        if method == "linear":
            try:
                squares = _linear_squared_grads(model, linear, a, kw, y, causal)
            except NotImplementedError:  # e.g. a sequence per example: vmap instead
                method = "vmap"
        if squares is None and method == "vmap":
            try:
                squares = _vmap_squared_grads(model, params, a, kw, y, causal)
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(
                    f"ewc: per-example gradients with vmap failed ({str(err)[:120]}...); "
                    "using a per-example loop (slower, same result)",
                    stacklevel=2,
                )
                method = "loop"
        if squares is None:
            squares = _loop_squared_grads(model, plist, a, kw, y, causal)
        torch._foreach_add_(sums, squares)
        seen += len(y)
    reduce_mean(sums, seen, across_ranks)
    return dict(zip(names, sums, strict=True))


def lora_fisher(
    model: nn.Module,
    sites: dict[str, LoraSite],
    data: Iterable[Batch],
    kind: str = "empirical",
    max_samples: int = 1024,
    chunk: int = 16,
    across_ranks: bool = False,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of each LoRA target matrix W (not of the adapter's A and B): the
    mean over at most ``max_samples`` examples of (∂ log p(y_n|x_n)/∂W)², with ∂/∂W of example n
    = Σ_t δ_{n,t} x_{n,t}ᵀ from the layer's input and output gradient (exact for any padding:
    padded positions get no gradient). Model in eval mode, ``chunk`` examples per backward;
    ``across_ranks`` as in ``diagonal_fisher``."""
    causal, seen = is_causal_lm(model), 0
    factors = [p for s in sites.values() for p in (s.A, s.B)]
    budget = rank_share(max_samples) if across_ranks else max_samples
    chunks = _examples(model, data, factors[0].device, kind, budget, causal)
    recorder = WeightGradients(sites, per_example=True).attach()
    try:
        for a, kw, y in chunks(lambda n: chunk):
            with torch.enable_grad():
                nll = example_nll(logits_of(model(*a, **kw)), y, causal).sum()
                torch.autograd.grad(nll, factors, allow_unused=True)  # runs the hooks
            seen += len(y)
    finally:
        recorder.detach()
    reduce_mean(list(recorder.sums.values()), seen, across_ranks)
    return dict(recorder.sums)


def reduce_mean(sums: list[torch.Tensor], seen: int, across_ranks: bool) -> None:
    """Sums over ``seen`` examples → their mean, in place: over this process's examples, or
    with ``across_ranks`` over every rank's (Σ sums / Σ seen, ``distributed.reduce_mean_``).
    Raises when there was no example at all (on every rank alike)."""
    if across_ranks:
        seen = reduce_mean_(sums, seen)
    elif seen:
        torch._foreach_div_(sums, float(seen))
    if seen == 0:
        raise ValueError("ewc: no examples to estimate the Fisher from")


def _examples(model, data, device, kind: str, max_samples: int, causal: bool):
    """``chunks(size_of)`` yields ``(args, kwargs, labels)`` of at most ``size_of(batch size)``
    examples at a time, ``max_samples`` in all, with the model in eval mode; labels are drawn
    from the model for the true Fisher."""

    def chunks(size_of: Callable[[int], int]) -> Iterator[tuple]:
        seen, was_training = 0, model.training
        model.eval()
        try:
            for batch in data:
                args, kwargs, labels = split_batch(move_batch(batch, device))
                if labels is None:
                    raise ValueError("ewc: the Fisher needs batches with labels")
                n, start = labels.shape[0], 0
                while start < n and seen < max_samples:
                    take = min(size_of(n), n - start, max_samples - seen)
                    part = slice(start, start + take)
                    a = tuple(x[part] for x in args)
                    kw = {k: v[part] if _batched(v, n) else v for k, v in kwargs.items()}
                    y = labels[part]
                    if kind == "true":
                        y = _sample_labels(model, a, kw, y, causal)
                    yield a, kw, y
                    start, seen = start + take, seen + take
                if seen >= max_samples:
                    break
        finally:
            model.train(was_training)

    return chunks


def _batched(v: Any, n: int) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n


def _sample_labels(model, args, kwargs, labels, causal: bool) -> torch.Tensor:
    """Labels drawn from the model's own prediction, where the data has a label (true Fisher)."""
    with torch.no_grad():
        logits = logits_of(model(*args, **kwargs)).float()
    sampled = torch.distributions.Categorical(logits=logits).sample()
    if sampled.dim() == 1:
        return sampled
    if causal:  # the prediction at position t is the label of position t + 1
        sampled = torch.cat([torch.full_like(sampled[:, :1], -100), sampled[:, :-1]], dim=1)
    return torch.where(labels == -100, labels, sampled)


def _linear_owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict | None:
    """``{name: (module, "weight" | "bias")}`` when every parameter belongs to an ``nn.Linear``."""
    owners = {}
    for module_name, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if name in params:
                if type(module) is not nn.Linear:
                    return None
                owners[name] = (module, attr)
    return owners if set(owners) == set(params) else None


def _linear_squared_grads(model, owners, args, kwargs, labels, causal: bool) -> list[torch.Tensor]:
    """Σ_n (∂ℓ_n/∂W)² = (G²)ᵀ·X² for a linear layer y = W·x + b applied once to one vector x_n
    per example (G: the per-example gradients at its outputs, exact because ℓ_n depends on
    example n alone); Σ_n (∂ℓ_n/∂b)² = Σ_n g_n². Raises NotImplementedError otherwise."""
    modules = {id(m): m for m, _ in owners.values()}
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def record(module, inp, out):
        if id(module) in outputs or inp[0].dim() != 2:  # reused, or a sequence per example
            raise NotImplementedError("not one vector per example")
        inputs[id(module)], outputs[id(module)] = inp[0].detach(), out

    handles = [m.register_forward_hook(record) for m in modules.values()]
    try:
        with torch.enable_grad():
            nll = example_nll(logits_of(model(*args, **kwargs)), labels, causal).sum()
            keys = list(outputs)
            grads = torch.autograd.grad(nll, [outputs[k] for k in keys], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out_grads = dict(zip(keys, grads, strict=True))
    squares = []
    for module, attr in owners.values():
        g = out_grads.get(id(module))
        p = getattr(module, attr)
        if g is None:
            squares.append(torch.zeros_like(p, dtype=torch.float32))
            continue
        g2 = g.float().square()
        squares.append(
            g2.T @ inputs[id(module)].float().square() if attr == "weight" else g2.sum(0)
        )
    return squares


def _vmap_squared_grads(model, params, args, kwargs, labels, causal: bool) -> list[torch.Tensor]:
    """Σ over the chunk of squared per-example gradients, with one vmapped backward."""
    n = labels.shape[0]
    mask = kwargs.get("attention_mask")
    if mask is not None and _batched(mask, n):
        # The mask cannot enter vmap (transformers inspects it with data-dependent control flow).
        # Dropping it is exact when it is all ones or, for a causal LM, right padding: a causal
        # model never attends forward, and the padded positions are given no label here.
        if not bool(mask.all()):
            right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
            if not (causal and right_padded):
                raise NotImplementedError("left or inner padding")
            labels = labels.masked_fill(mask == 0, -100)
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    batched = {k: v for k, v in kwargs.items() if _batched(v, n)}
    fixed = {k: v for k, v in kwargs.items() if k not in batched}
    if causal:
        fixed["use_cache"] = False

    def nll_one(p, a, kw, y):
        a1 = tuple(t.unsqueeze(0) for t in a)
        kw1 = {k: v.unsqueeze(0) for k, v in kw.items()}
        out = functional_call(model, p, a1, {**kw1, **fixed})
        return example_nll(logits_of(out), y.unsqueeze(0), causal)[0]

    detached = {k: p.detach() for k, p in params.items()}
    with warnings.catch_warnings():  # CPU attention has no batching rule: slower, not wrong
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per_example = vmap(grad(nll_one), in_dims=(None, 0, 0, 0))(detached, args, batched, labels)
    return [per_example[k].float().square().sum(0) for k in params]


def _loop_squared_grads(model, plist, args, kwargs, labels, causal: bool) -> list[torch.Tensor]:
    """The same sum, one example at a time (any model, any padding)."""
    n = labels.shape[0]
    out = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
    for i in range(n):
        a = tuple(t[i : i + 1] for t in args)
        kw = {k: v[i : i + 1] if _batched(v, n) else v for k, v in kwargs.items()}
        with torch.enable_grad():
            nll = example_nll(logits_of(model(*a, **kw)), labels[i : i + 1], causal)[0]
            grads = torch.autograd.grad(nll, plist, allow_unused=True)
        for o, g in zip(out, grads, strict=True):
            if g is not None:
                o.add_(g.float().square())
    return out
