"""Where EWC, SI and HLR measure importance and apply their penalty: the weights that change.

An importance is only meaningful in the coordinates it was measured in. With LoRA the model's
weights are W = W₀ + ΔW, ΔW = s·B·A (s = lora_alpha / r) for each target matrix, and the
adapter's own coordinates (A, B) are not the model's weights: at a fresh adapter (B = 0)
∂L/∂A = 0 exactly, and the next release's random A shares no coordinates with this one's. So
for a peft LoRA model each *site* is a target matrix W, named like the base model's weight
(``model.layers.3.mlp.up_proj.weight``), its importance Ω a matrix of W's shape, and the penalty

    Σ_W Σ_ij Ω_ij (W_ij − W*_ij)²  =  Σ_W Σ_ij Ω_ij (ΔW_ij − ΔW*_ij)²      (W₀ is frozen)

is the paper's quadratic form on the model's weights. ΔW* is kept as its factors (s·B*, A*).
When a release's adapter is merged into W₀ and a fresh one put on (the pipeline does this every
release), W* is the merged weight, i.e. ΔW* = 0 (``reanchor``), and Ω, keyed by the weight's
name, carries over unchanged. Without LoRA each trainable parameter is a site and its value is
the parameter itself.

Gradients with respect to W come from hooks on each LoRA layer: its input x and the gradient δ at
its output give ∂L/∂W = Σ_tokens δ·xᵀ (per example for EWC's Fisher, summed for SI's path
integral). They are the gradient of the loss that went through the model's forward pass, before
any clipping, and never contain the penalty (computed from A and B directly).

Cost with LoRA: a rank-r product B·A per target matrix per step, and importances of the size of
the target matrices in float32 (SmolLM2-135M, all seven projections: 106 M values, 425 MB).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cf_strategies.base import (
    Batch,
    Strategy,
    TaskContext,
    align_to,
    greedy_answers,
    quadratic_terms,
    trainable_parameters,
)

PEFT_PREFIX = "base_model.model."


class LoraSite:
    """One LoRA target matrix: ``value() = s·B·A`` (ΔW, differentiable into A and B)."""

    def __init__(self, module: nn.Module, adapter: str) -> None:
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError("importance in weight space does not support fan_in_fan_out layers")
        self.module, self.adapter = module, adapter

    @property
    def A(self) -> nn.Parameter:  # noqa: N802  (the paper's name)
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # noqa: N802
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    def value(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())

    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))


def lora_sites(model: nn.Module) -> dict[str, LoraSite]:
    """The trained LoRA layers of a peft model by the name of the weight they change (empty for
    a model without trainable LoRA). Other trainable parameters beside LoRA are refused: their
    importance would live in other coordinates."""
    sites: dict[str, LoraSite] = {}
    lora_params: set[int] = set()
    for module_name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not hasattr(module, "base_layer"):
            continue
        for adapter in getattr(module, "active_adapters", []):
            if adapter in lora_a and lora_a[adapter].weight.requires_grad:
                site = LoraSite(module, adapter)
                name = module_name.removeprefix(PEFT_PREFIX) + ".weight"
                sites[name] = site
                lora_params |= {id(site.A), id(site.B)}
    if sites:
        other = [n for n, p in trainable_parameters(model).items() if id(p) not in lora_params]
        if other:
            raise ValueError(
                "EWC/SI/HLR with LoRA regularise the target matrices W = W0 + s·B·A; these "
                f"trainable parameters are not LoRA factors: {other[:3]} ({len(other)} in all)"
            )
    return sites


class WeightGradients:
    """∂L/∂W of every LoRA site, recorded by hooks while attached: ``per_example`` keeps the sum
    of squared per-example gradients Σ_n (δ_nᵀ x_n)² (EWC's Fisher), otherwise the plain sum
    Σ_n δ_nᵀ x_n over every backward pass since the last ``reset`` (SI's path integral)."""

    def __init__(self, sites: dict[str, LoraSite], per_example: bool = False) -> None:
        self.sites, self.per_example = sites, per_example
        self.sums = {n: torch.zeros(s.shape(), device=s.A.device) for n, s in sites.items()}
        self._handles: list[Any] = []

    def attach(self) -> WeightGradients:
        for name, site in self.sites.items():
            self._handles.append(site.module.register_forward_hook(self._forward_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        for s in self.sums.values():
            s.zero_()

    def _forward_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if not output.requires_grad or module.disable_adapters:
                return  # no backward will come (no_grad, a teacher pass under disable_adapter)
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._add(name, x, grad))

        return hook

    @torch.no_grad()
    def _add(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        x, grad = x.float(), grad.float()
        if x.dim() == 2:  # one vector per example
            x, grad = x.unsqueeze(1), grad.unsqueeze(1)
        if self.per_example:
            per_example = torch.einsum("nto,nti->noi", grad, x)
            self.sums[name].add_(per_example.square().sum(0))
        else:
            self.sums[name].add_(grad.flatten(0, -2).T @ x.flatten(0, -2))


class ImportanceRegulariser(Strategy):
    """What EWC, SI and HLR share: an importance and an anchor per site, kept across tasks and
    releases, the penalty ``Σ coef · Σ Ω (value − anchor)²``, re-anchoring after a merge, and the
    importance of general knowledge before the first task (from the champion's own answers to
    the context's rehearsal prompts). Subclasses measure the importance."""

    uses_rehearsal_prompts = True  # only when the context asks for general importance
    coordinates = "weights"  # saved with the state: importance of W, not of the adapter
    rank_safe = True  # importances reduced across ranks (EWC's Fisher, SI's path integral)

    def __init__(self) -> None:
        self.tasks = 0
        self.importance: dict[str, torch.Tensor] = {}  # Ω (or F) by site name, float32
        self.anchor: dict[str, torch.Tensor] = {}  # θ* by name (no LoRA)
        self.anchor_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (s·B*, A*)
        self.context = TaskContext()
        self._lora: dict[str, LoraSite] = {}  # this task's sites (LoRA) ...
        self._params: dict[str, nn.Parameter] = {}  # ... or parameters (no LoRA)
        self._weights: list[torch.Tensor] = []  # Ω aligned to the sites
        self._sqrt_weights: list[torch.Tensor] = []
        self._anchors: list[torch.Tensor | None] = []  # anchor values aligned to the sites

    # ---- sites ----------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> list[str]:
        """Find this task's sites; returns their names in penalty order."""
        self._lora = lora_sites(model)
        self._params = {} if self._lora else trainable_parameters(model)
        return list(self._lora or self._params)

    def values(self) -> list[torch.Tensor]:
        """The sites' current values (ΔW or θ), differentiable."""
        if self._lora:
            return [s.value() for s in self._lora.values()]
        return list(self._params.values())

    def shapes(self) -> dict[str, torch.Tensor]:
        """A stand-in per site with its shape and device (a broadcast view: no memory), for
        ``align_to``."""
        if self._lora:
            return {
                n: torch.zeros((), device=s.A.device).expand(s.shape())
                for n, s in self._lora.items()
            }
        return {n: p.detach() for n, p in self._params.items()}

    def snapshot_anchor(self) -> None:
        """θ* ← the sites' current values (after a task)."""
        if self._lora:
            self.anchor_factors = {
                n: (s.scaling * s.B.detach().float(), s.A.detach().float().clone())
                for n, s in self._lora.items()
            }
            self.anchor = {}
        else:
            self.anchor = {n: p.detach().clone() for n, p in self._params.items()}
            self.anchor_factors = {}

    def anchor_values(self) -> list[torch.Tensor | None]:
        """θ* per site (None: ΔW* = 0, a fresh adapter on merged weights)."""
        names = list(self._lora or self._params)
        if self._lora:
            out: list[torch.Tensor | None] = []
            for n in names:
                f = self.anchor_factors.get(n)
                dev = self._lora[n].A.device
                zero = f is None or not bool(f[0].any())  # B* = 0: a fresh adapter, ΔW* = 0
                out.append(None if zero else f[0].to(dev) @ f[1].to(dev))
            return out
        params = self._params
        return align_to(params, self.anchor, f"{self.name} anchor", missing=torch.clone)

    # ---- the task ---------------------------------------------------------------------------
    def prepare(self, context: TaskContext) -> None:
        self.context = context

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if self.tasks == 0 and self.context.general_importance_prompts:
            self.estimate_importance(model, self.general_batches(model))
        self.begin(model)

    def begin(self, model: nn.Module) -> None:
        """Bind the sites and align the stored importance and anchor to them."""
        self.bind(model)
        self._weights, self._sqrt_weights, self._anchors = [], [], []
        if self.importance:
            self._weights = align_to(self.shapes(), self.importance, f"{self.name} importance")
            self._weights = [w.float() for w in self._weights]
            self._sqrt_weights = torch._foreach_sqrt(self._weights)
            self._anchors = self.anchor_values()

    def terms(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``terms[k] = Σ Ω (value − anchor)²`` of site k, and the detached differences."""
        if self._lora:
            diffs = [
                v if a is None else v - a for v, a in zip(self.values(), self._anchors, strict=True)
            ]
            detached = [d.detach() for d in diffs]
            return quadratic_terms(diffs, None, self._sqrt_weights, diffs=detached), detached
        params = list(self._params.values())
        with torch.no_grad():
            detached = torch._foreach_sub(params, self._anchors)
        return quadratic_terms(params, None, self._sqrt_weights, diffs=detached), detached

    def reanchor(self, model: nn.Module) -> None:
        """The adapter was merged and a fresh one put on: θ* = the current weights (ΔW* = 0)."""
        self.bind(model)
        if self._lora:
            self.anchor_factors = {}
        else:
            self.anchor = {n: p.detach().clone() for n, p in self._params.items()}

    def general_batches(self, model: nn.Module, batch_size: int = 8) -> list[Batch]:
        """The champion's greedy answers to the first ``general_importance_prompts`` rehearsal
        prompts, as training batches (labels on the answer only); the same on every rank."""
        from cf_strategies.buffer import answer_example, collate

        ctx = self.context
        prompts = ctx.rehearsal_prompts[: ctx.general_importance_prompts]
        pad = 0 if ctx.pad_token_id is None else ctx.pad_token_id
        answers = greedy_answers(model, prompts, 48, pad, ctx.eos_token_id, 16)
        examples = [answer_example(p, a) for p, a in zip(prompts, answers, strict=True) if a]
        return [
            collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)
        ]

    def estimate_importance(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Consolidate general knowledge before the first task (importance of ``batches`` at
        the current weights, which become θ*). Subclasses implement it."""
        raise NotImplementedError

    def accumulate(self, names: list[str], importance: list[torch.Tensor], decay: float) -> None:
        """Ω ← decay·Ω + importance, by site name."""
        for name, new in zip(names, importance, strict=True):
            old = self.importance.get(name)
            new = new.float()
            self.importance[name] = new if old is None else decay * old.to(new.device) + new

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": self.tasks, "coordinates": self.coordinates}
        state.update({f"importance.{k}": v for k, v in self.importance.items()})
        state.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        for k, (b, a) in self.anchor_factors.items():
            state[f"anchor_lora_B.{k}"], state[f"anchor_lora_A.{k}"] = b, a
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("coordinates") != self.coordinates:
            warnings.warn(
                f"{self.name}: the saved state is in the coordinates of an earlier version's "
                "adapter, which do not carry across releases; it is not loaded, and the "
                "importance starts afresh (from general knowledge when the context asks for it)",
                stacklevel=2,
            )
            return
        self.tasks = int(state.get("tasks", 0))

        def strip(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.importance, self.anchor = strip("importance."), strip("anchor.")
        b, a = strip("anchor_lora_B."), strip("anchor_lora_A.")
        self.anchor_factors = {k: (b[k], a[k]) for k in b}
        anchored = set(self.anchor) | set(self.anchor_factors)
        if set(b) != set(a) or not anchored <= set(self.importance):
            raise ValueError(f"{self.name}: saved anchor and importance cover different weights")
        self._weights, self._sqrt_weights, self._anchors = [], [], []
