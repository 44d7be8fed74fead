"""Progressive Neural Networks with low-rank columns (Rusu et al., 2016, "Progressive Neural
Networks", arXiv:1606.04671).

PNN adds a column for each task and freezes the earlier ones; the new column reads the earlier
columns' activations through learned lateral connections, so nothing learnt can be forgotten and
earlier features can be reused. Here a column is a low-rank module (the LoRA form) on each target
linear layer ``y = W x + b`` of a frozen base model. Column t at a target layer:

    z_t = A_t x_t + Σ_{k<t} U_{t,k} · relu(z_k)          (column t's adapter output, r values)
    y_t = W x_t + b + (α / r) · B_t z_t

A_t (r × d_in), B_t (d_out × r) and the laterals U_{t,k} (r × r each, kept side by side as one
r × t·r matrix) are column t's parameters. The lateral is the paper's adapter U·σ(V·h) with V = A_k,
the frozen reduction column k learnt: column t adds U_{t,k} applied to column k's adapter output
z_k at the same layer. A new column starts at B = 0, U = 0 (A as LoRA initialises it), i.e. as
the base model. ``before_task`` freezes every parameter of the model (base weights, earlier
columns, a peft adapter too) and trains only the new column: earlier columns get no gradient.

What x_k, the input column k reads at a layer, is depends on ``streams``:

  * ``"own"`` (exact PNN, the default): each column runs on its own hidden states. Answering for
    task t runs t + 1 forward passes: those of columns 0..t−1 first, without gradient, each
    keeping its z_k at every target layer for the later columns' laterals, then column t's pass,
    whose output is the answer. A KV cache cannot be shared by the passes: generation needs
    ``use_cache=False`` (an error says so otherwise; ``attach`` sets the model's
    ``generation_config.use_cache`` to False and ``detach`` restores it, so ``generate`` works
    as it is); gradient checkpointing is not supported.
  * ``"shared"`` (cheaper approximation): one pass; the earlier columns read the current column's
    hidden states, x_k = x_t, so their z_k are frozen nonlinear features of the current stream
    rather than their own computation. Generation with a KV cache works.

Either way task t's model involves columns 0..t only, so its outputs are bit-identical after any
number of later tasks (answered with the same ``streams``; the state records it).

Cost of column t: Σ_layers (r·(d_in + d_out) + t·r²) parameters (the laterals grow with the
number of tasks). Inference for task t, per target layer: ``"shared"``, (t + 1) low-rank projections
A_k x plus the laterals, about (t + 1)·r·(d_in + t·r/2) + r·d_out multiply-adds beside W x's
d_in·d_out; ``"own"``, t extra full forward passes.

Task selection: ``use_task(model, t)`` makes column t answer (``cf_strategies.base.using_task``
for a block). The columns live in the strategy's state (safetensors: ``<layer>.A.<t>``,
``<layer>.B.<t>``, ``<layer>.U.<t>``; JSON: task names, rank, alpha, streams), keyed by the target
layers' names in the base model (a peft wrapper's prefix dropped), so any task's model is rebuilt
from the base weights: build the base model (peft-wrapped or not), ``load`` the state and
``use_task(model, t)``, which attaches the columns as submodules (``<layer>.progressive``) with
forward hooks; ``detach(model)`` takes them off again (before ``save_pretrained`` of the base).
The base itself is never changed, so a pipeline keeps it unmerged (``isolates_tasks``). Train with
``ContinualTrainer`` (its optimizer is built after ``before_task`` adds the column) or, in a plain
loop, call ``add_column(model)`` before building the optimizer: optimizer steps that never move
the new column's parameters although they have gradients (``UNMOVED_STEPS`` in a row; not one,
since a learning-rate warm-up starts at 0) are an error.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache

from cf_strategies.base import Batch, Strategy, TaskContext, task_index
from cf_strategies.registry import register

MODULE = "progressive"  # the columns' submodule on each target layer
UNMOVED_STEPS = 3  # steps with gradients that never move a new column: it is not being trained


class LayerColumns(nn.Module):
    """The columns of one target layer: ``A[t]`` (r × d_in), ``B[t]`` (d_out × r) and the
    laterals ``U[str(t)]`` (r × t·r, t ≥ 1), float32."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank, self.scale = d_in, d_out, rank, scale
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.U = nn.ParameterDict()

    def __len__(self) -> int:
        return len(self.A)

    def add(self, device: torch.device | None = None) -> list[nn.Parameter]:
        """A new trainable column: A as LoRA (Kaiming-uniform), B = 0, U = 0."""
        t, r = len(self), self.rank
        a = torch.empty(r, self.d_in, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.d_out, r, device=device)))
        new = [self.A[t], self.B[t]]
        if t:
            self.U[str(t)] = nn.Parameter(torch.zeros(r, t * r, device=device))
            new.append(self.U[str(t)])
        return new

    def bottleneck(self, t: int, x: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
        """z_t = A_t x + U_t · relu([z_0, ..., z_{t−1}])."""
        z = F.linear(x.to(self.A[t].dtype), self.A[t])
        if t:
            z = z + F.linear(torch.relu(torch.cat(earlier[:t], dim=-1)), self.U[str(t)])
        return z

    def delta(self, t: int, z: torch.Tensor) -> torch.Tensor:
        """(α / r) · B_t z_t."""
        return self.scale * F.linear(z, self.B[t])

    def column_parameters(self, t: int) -> list[nn.Parameter]:
        return [self.A[t], self.B[t]] + ([self.U[str(t)]] if t else [])


def base_of(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (whose forward and generate both go through it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@register
class Progressive(Strategy):
    """A new low-rank column per task, earlier columns frozen, lateral connections into the new."""

    name = "progressive"
    isolates_tasks = True
    stores = "columns: low-rank A, B and laterals U per task and target layer"
    flattening_safe = True  # columns act per token; the batch is never read

    def __init__(
        self,
        rank: Annotated[int, Field(ge=1)] = 8,
        alpha: Annotated[float, Field(gt=0)] = 16.0,
        target_modules: list[str] | None = None,
        streams: Literal["own", "shared"] = "own",
    ) -> None:
        self.rank, self.alpha = rank, alpha
        self.target_modules = target_modules
        self.streams = streams
        self.tasks: list[str] = []
        self.columns: dict[str, LayerColumns] = {}  # by target layer name in the base model
        self.active = 0  # the column that answers
        self._release: str | None = None
        self._model: nn.Module | None = None  # the model the columns are attached to
        self._layers: dict[str, nn.Module] = {}  # the target layers of that model
        self._handles: list[RemovableHandle] = []
        self._use_cache: bool | None = (
            None  # the model's generation_config.use_cache, while attached
        )
        self._training = False
        self._before_step: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._unmoved = 0  # steps with gradients that left the new column where it was
        # one forward with streams="own"
        self._pass: int | None = None  # the column whose stream this pass computes
        self._nested = False
        self._calls: dict[str, int] = defaultdict(int)
        self._cache: list[dict[str, list[torch.Tensor]]] = []

    # ---- columns on a model -----------------------------------------------------------------
    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The target linear layers by name in the base model: ``target_modules`` (last name
        part) if given; else the layers a peft adapter wraps; else every ``nn.Linear``."""
        found: dict[str, nn.Module] = {}
        modules = dict(base_of(model).named_modules())
        wrapped = {n for n, m in modules.items() if hasattr(m, "lora_A")}
        for name, module in modules.items():
            if any(name.startswith(w + ".") for w in wrapped):
                continue  # a peft wrapper's own base_layer, lora_A, lora_B
            if self.target_modules is not None:
                if name.rsplit(".", 1)[-1] in self.target_modules and (
                    name in wrapped or isinstance(module, nn.Linear)
                ):
                    found[name] = module
            elif (name in wrapped) if wrapped else isinstance(module, nn.Linear):
                found[name] = module
        if not found:
            raise ValueError(
                f"progressive: no target layer found (target_modules={self.target_modules})"
            )
        return found

    def attach(self, model: nn.Module) -> None:
        """Put the columns of the state on ``model``'s target layers (submodule ``progressive``
        and a forward hook each); a model they were on before is detached first."""
        if self._model is model:
            return
        if self._model is not None:
            self.detach(self._model)
        root = base_of(model)
        if self.columns:  # the layers the saved columns were trained on
            modules = dict(root.named_modules())
            missing = [n for n in self.columns if n not in modules]
            if missing:
                raise ValueError(
                    f"progressive: the saved columns are for layers this model does not have: "
                    f"{missing[:3]}{' ...' if len(missing) > 3 else ''}; build the model as it "
                    "was trained (the same base)"
                )
            layers = {n: modules[n] for n in self.columns}
        else:
            layers = self.target_layers(model)
        for name, layer in layers.items():
            if MODULE in layer._modules:
                raise ValueError(
                    f"progressive: {name} already carries columns of another progressive "
                    "strategy; detach them first"
                )
        scale = self.alpha / self.rank
        for name, layer in layers.items():
            if name not in self.columns:
                self.columns[name] = LayerColumns(
                    layer.in_features, layer.out_features, self.rank, scale
                )
            cols = self.columns[name]
            if (cols.d_in, cols.d_out) != (layer.in_features, layer.out_features):
                raise ValueError(
                    f"progressive: the saved columns of {name} are {cols.d_in} -> {cols.d_out}, "
                    f"the layer is {layer.in_features} -> {layer.out_features}"
                )
            layer.add_module(MODULE, cols.to(layer.weight.device))
            self._handles.append(layer.register_forward_hook(self._layer_hook(name, cols)))
        self._layers = layers
        self._handles.append(root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._root_hook))
        self._model = model
        config = getattr(root, "generation_config", None)
        if self.streams == "own" and config is not None:  # every column runs its own pass
            self._use_cache, config.use_cache = config.use_cache, False

    def detach(self, model: nn.Module) -> None:
        """Take the columns and hooks off ``model`` (the state keeps the columns)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers.values():
            if MODULE in layer._modules:
                del layer._modules[MODULE]
        config = getattr(base_of(model), "generation_config", None)
        if self._use_cache is not None and config is not None:
            config.use_cache, self._use_cache = self._use_cache, None
        self._model, self._layers = None, {}

    def add_column(self, model: nn.Module) -> list[nn.Parameter]:
        """Attach, freeze every parameter of the model and add the next task's trainable column
        (once: a column not trained yet is reused). Returns its parameters; in a plain loop
        build the optimizer after this call."""
        self.attach(model)
        t = len(self.tasks)
        for p in model.parameters():
            p.requires_grad_(False)
        new = []
        for name, cols in self.columns.items():
            if len(cols) == t:
                cols.add(self._layers[name].weight.device)
            new += cols.column_parameters(t)
        for p in new:
            p.requires_grad_(True)
        self.active = t
        return new

    # ---- the task ---------------------------------------------------------------------------
    def prepare(self, context: TaskContext) -> None:
        self._release = context.release

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        new = self.add_column(model)
        self._before_step = [(p, p.detach().clone()) for p in new]
        self._unmoved = 0
        self._training = True

    def after_step(self, model: nn.Module) -> None:
        """Until the new column first moves: steps with gradients that leave it where it was
        mean its parameters are not in the optimizer."""
        if not self._before_step:
            return
        if any(not torch.equal(p.detach(), old) for p, old in self._before_step):
            self._before_step, self._unmoved = [], 0  # it trains: nothing more to check
            return
        if any(p.grad is not None and bool(p.grad.any()) for p, _ in self._before_step):
            self._unmoved += 1
        if self._unmoved >= UNMOVED_STEPS:
            raise RuntimeError(
                f"progressive: {UNMOVED_STEPS} optimizer steps did not move the new column "
                "although it has gradients: its parameters are not in the optimizer. In a "
                "plain loop call add_column(model) before building the optimizer"
            )

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if not self._training:
            return
        t = len(self.tasks)
        for cols in self.columns.values():
            for p in cols.column_parameters(t):
                p.requires_grad_(False)
        self.tasks.append(self._release or f"task-{t}")
        self._release, self._training, self._before_step = None, False, []
        self.active = t

    # ---- in the middle of a task (checkpoints) ----------------------------------------------
    def task_state_dict(self) -> dict[str, Any]:
        """The column being trained (A, B and laterals of every target layer). peft 0.21 saves it
        with the adapter, since it hangs under the LoRA layers, but that is no contract of
        peft's: the checkpoint keeps it here too."""
        if not self._training:
            return {}
        t = len(self.tasks)
        return {
            f"{name}.{i}": p.detach()
            for name, cols in self.columns.items()
            for i, p in enumerate(cols.column_parameters(t))
        }

    @torch.no_grad()
    def load_task_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        if not state:
            return
        t = len(self.tasks)
        for name, cols in self.columns.items():
            for i, p in enumerate(cols.column_parameters(t)):
                p.copy_(state[f"{name}.{i}"])
        self._before_step = []  # it has trained: the check that it moves is done

    # ---- answering for one task -------------------------------------------------------------
    def use_task(self, model: nn.Module, task: int | str | None) -> None:
        """Column ``task`` answers (None: the latest), with the columns before it laterally;
        ``BASE``: no column, the columns are detached and the base model answers."""
        if self._training:
            raise RuntimeError("progressive: use_task is for between tasks, not during one")
        if task is None and not self.tasks:
            return
        t = task_index(task, self.tasks, self.name)
        if t < 0:
            self.detach(model)
            return
        self.attach(model)
        self.active = t

    def parameter_counts(self) -> list[int]:
        """Parameters of each column, laterals included."""
        if not self.columns:
            return []
        n = len(next(iter(self.columns.values())))
        return [
            sum(p.numel() for c in self.columns.values() for p in c.column_parameters(t))
            for t in range(n)
        ]

    # ---- the forward pass -------------------------------------------------------------------
    def _layer_hook(self, name: str, cols: LayerColumns):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self.streams == "shared":
                zs: list[torch.Tensor] = []
                for k in range(self.active + 1):
                    zs.append(cols.bottleneck(k, x, zs))
                return output + cols.delta(self.active, zs[-1]).to(output.dtype)
            t = self.active if self._pass is None else self._pass
            if t and self._pass is None:
                raise RuntimeError(
                    "progressive: with streams='own' a forward must go through the model the "
                    "columns are attached to (its earlier columns run their own passes there)"
                )
            call = self._calls[name]
            self._calls[name] = call + 1
            try:
                earlier = [self._cache[k][name][call] for k in range(t)]
            except IndexError:
                raise RuntimeError(
                    "progressive: a layer ran more often than in the earlier columns' passes "
                    "(gradient checkpointing?); use streams='shared'"
                ) from None
            z = cols.bottleneck(t, x, earlier)
            if t < self.active:
                self._cache[t][name].append(z)
            return output + cols.delta(t, z).to(output.dtype)

        return hook

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._nested:
            return None
        self._pass, self._calls, self._cache = self.active, defaultdict(int), []
        if self.streams == "shared" or self.active == 0:
            return None
        if any(isinstance(v, Cache) for v in kwargs.values()):
            raise ValueError(
                "progressive: with streams='own' every column runs its own pass and a KV cache "
                "cannot be shared: generate with use_cache=False, or use streams='shared'"
            )
        earlier_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        if hasattr(getattr(module, "config", None), "use_cache"):
            earlier_kwargs["use_cache"] = False
        self._nested = True
        try:
            with torch.no_grad():
                for k in range(self.active):
                    self._pass, self._calls = k, defaultdict(int)
                    self._cache.append(defaultdict(list))
                    module(*args, **earlier_kwargs)
        finally:
            self._nested = False
        self._pass, self._calls = self.active, defaultdict(int)
        return None

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._nested:
            self._pass, self._cache = None, []

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "tasks": list(self.tasks),
            "rank": self.rank,
            "alpha": self.alpha,
            "streams": self.streams,
            "layers": {n: [c.d_in, c.d_out] for n, c in self.columns.items()},
        }
        for name, cols in self.columns.items():
            for t in range(len(self.tasks)):
                state[f"{name}.A.{t}"] = cols.A[t].detach()
                state[f"{name}.B.{t}"] = cols.B[t].detach()
                if t:
                    state[f"{name}.U.{t}"] = cols.U[str(t)].detach()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for option in ("rank", "alpha", "streams"):
            if option in state and state[option] != getattr(self, option):
                raise ValueError(
                    f"progressive: the saved columns were trained with {option}="
                    f"{state[option]!r}, not {getattr(self, option)!r}; their outputs would change"
                )
        if self._model is not None:
            self.detach(self._model)
        tasks = list(state.get("tasks", []))
        scale = self.alpha / self.rank
        columns = {}
        for name, (d_in, d_out) in dict(state.get("layers", {})).items():
            cols = LayerColumns(d_in, d_out, self.rank, scale)
            for t in range(len(tasks)):
                cols.A.append(nn.Parameter(state[f"{name}.A.{t}"].float(), requires_grad=False))
                cols.B.append(nn.Parameter(state[f"{name}.B.{t}"].float(), requires_grad=False))
                if t:
                    u = state[f"{name}.U.{t}"].float()
                    cols.U[str(t)] = nn.Parameter(u, requires_grad=False)
            columns[name] = cols
        self.tasks, self.columns = tasks, columns
        self.active = max(len(tasks) - 1, 0)
