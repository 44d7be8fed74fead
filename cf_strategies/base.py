"""The Strategy API: a forgetting-prevention method as a handful of hooks.

A strategy sees one training task (one data release) at a time:

    before_task(model, data)          snapshot old weights, open buffers, build a teacher
    augment_batch(model, batch)       mix replayed examples into the batch (replay, DER)
    extra_loss(model, batch, outputs) penalties and distillation terms added to the task loss
    after_backward(model)             gradients of the total loss are in .grad (after clipping)
    after_step(model)                 parameters were just updated (SI path integral, masks)
    after_task(model, data)           Fisher, importances, buffer updates for the next release
    reanchor(model)                   the old weights were merged: anchor penalties to the new ones

Before a task a pipeline hands every strategy a :class:`TaskContext` through ``prepare`` (the
release's name, the tokenizer's ids, old-task rehearsal prompts): what only the pipeline knows is
given through this one declared record, never set on attributes the pipeline discovers.

State that must survive to the next release (Fisher diagonals, importances, buffers) is
returned by ``state_dict()`` and saved with ``save(folder)`` as safetensors + JSON, never pickle.
A checkpoint taken during a task also holds ``task_state_dict()``, the running state the steps
advance (SI's path integral), which ``load_task_state_dict`` puts back when training resumes
(``cf_strategies.trainer``).
Every hook is a no-op here, so a strategy overrides only what it needs.

Parameter-isolation strategies (packnet, progressive) keep parameters of each task apart and
answer for one task at a time: ``use_task(model, task)`` selects it (a no-op for every other
strategy, whose parameters are shared by all tasks) and ``using_task(strategies, model, task)``
does so for a block and restores the latest task after it.

Helpers shared by strategies: ``trainable_parameters`` / ``snapshot`` / ``align_to`` (per-parameter
state by name), ``quadratic_terms`` (a vectorised Σ w·(θ − θ*)² with an exact, cheap backward) and
``split_batch`` / ``move_batch`` / ``logits_of`` / ``is_causal_lm`` / ``example_nll`` (the log-likelihood of a batch,
for a causal LM, a classifier or an ``(x, y)`` pair).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

Batch = dict[str, Any]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a strategy acts on: those with ``requires_grad`` (only the LoRA weights
    of a peft model, every weight of a fully fine-tuned one)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of parameters, e.g. θ* at the start of a task."""
    return {name: p.detach().clone() for name, p in params.items()}


def align_to(
    params: Mapping[str, torch.Tensor],
    stored: Mapping[str, torch.Tensor],
    what: str,
    missing: Callable[[torch.Tensor], torch.Tensor] = torch.zeros_like,
) -> list[torch.Tensor]:
    """Per-parameter state saved by name (``stored``) as a list in the order of ``params``, each on
    its parameter's device and dtype. A parameter without stored state gets ``missing(param)`` (a
    new parameter is not protected yet); stored state for a parameter the model does not have, or
    of another shape, raises ``ValueError``: the state belongs to another model."""
    unknown = sorted(set(stored) - set(params))
    if unknown:
        raise ValueError(
            f"saved {what} is for parameters this model does not train: {unknown[:3]}"
            f"{' ...' if len(unknown) > 3 else ''} ({len(unknown)} in all); "
            "was the state saved with another model or adapter?"
        )
    out = []
    for name, p in params.items():
        if name not in stored:
            out.append(missing(p.detach()))
            continue
        t = stored[name]
        if t.shape != p.shape:
            raise ValueError(
                f"saved {what} for {name} has shape {tuple(t.shape)}, not {tuple(p.shape)}"
            )
        out.append(t.to(device=p.device, dtype=p.dtype))
    return out


class _QuadraticTerms(torch.autograd.Function):
    """Per-tensor ‖√w·(θ − a)‖² with torch._foreach ops; backward is 2·w·(θ − a) per tensor."""

    @staticmethod
    def forward(ctx, anchors, sqrt_weights, diffs, *params):
        owned = diffs is None  # our own buffers may be reused in place
        scaled = torch._foreach_sub(params, anchors) if owned else list(diffs)
        if sqrt_weights is not None:
            if owned:
                torch._foreach_mul_(scaled, sqrt_weights)
            else:
                scaled, owned = torch._foreach_mul(scaled, sqrt_weights), True
        ctx.scaled, ctx.sqrt_weights, ctx.owned = scaled, sqrt_weights, owned
        return torch.stack(torch._foreach_norm(scaled, 2)).square()

    @staticmethod
    def backward(ctx, grad_terms):
        grads, ctx.scaled = ctx.scaled, None  # this backward runs once
        if ctx.sqrt_weights is not None:
            torch._foreach_mul_(grads, ctx.sqrt_weights)  # w·(θ − a)
        if grad_terms.dim() == 1 and grad_terms.stride(0) == 0:  # terms.sum(): one coefficient
            scale = 2 * grad_terms[0]
        else:
            scale = list((2 * grad_terms).unbind(0))
        if ctx.owned:
            torch._foreach_mul_(grads, scale)
        else:
            grads = torch._foreach_mul(grads, scale)
        return (None, None, None, *grads)


def quadratic_terms(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor] | None,
    sqrt_weights: Sequence[torch.Tensor] | None = None,
    diffs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``terms[k] = Σ_i w_i (θ_i − a_i)²`` over the elements of the k-th tensor, as a vector with
    one entry per tensor (sum it for the total). The weights (Fisher, importances; ≥ 0) are given
    as their square roots, so that each term is one 2-norm; None means all ones. ``diffs``, if
    given, are θ − a already computed (then ``anchors`` is not read and ``diffs`` is not changed).
    Gradients flow into ``params`` only, computed in closed form, 2·w·(θ − a): a few
    torch._foreach kernels forward and backward, whatever the number of tensors."""
    if not params:
        return torch.zeros(0)
    sqrt_weights = None if sqrt_weights is None else list(sqrt_weights)
    return _QuadraticTerms.apply(
        None if anchors is None else list(anchors), sqrt_weights, diffs, *params
    )


# ---- the log-likelihood of a batch, for strategies that need one (Fisher, importances) ----------
def split_batch(batch: Any) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
    """``(args, kwargs, labels)`` to call ``model(*args, **kwargs)``: a dict batch is passed as
    keyword arguments without its ``"labels"``; an ``(x, y)`` pair as ``model(x)``."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    raise TypeError(
        f"a batch is a dict (with 'labels') or an (x, y) pair, not {type(batch).__name__}"
    )


def move_batch(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor in it on ``device`` (dicts, tuples and lists are walked)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: ``outputs.logits`` (transformers) or the tensor itself."""
    if torch.is_tensor(outputs):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None:
        raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}")
    return logits


def is_causal_lm(model: nn.Module) -> bool:
    """True for a transformers causal LM (peft-wrapped or not): its labels are shifted by one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def example_nll(
    logits: torch.Tensor, labels: torch.Tensor, causal: bool, ignore_index: int = -100
) -> torch.Tensor:
    """Negative log-likelihood of each example, shape ``(B,)``: cross-entropy for ``(B, C)`` logits;
    for ``(B, T, V)`` logits the mean over the example's labelled tokens (``ignore_index`` skipped),
    predicting ``labels[t + 1]`` from position ``t`` when ``causal`` (the transformers convention)."""
    if logits.dim() == labels.dim() + 1 == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none"
    ).view(labels.shape)
    return nll.sum(1) / (labels != ignore_index).sum(1).clamp_min(1)


@dataclass
class TaskContext:
    """What the pipeline knows about the coming task and gives every strategy (``prepare``).

    ``rehearsal_prompts`` are old-task prompts as token ids, formatted as the model sees a user
    turn (never probe items): self-rehearsal has the champion answer them, and EWC/SI/HLR estimate
    the importance of general knowledge from those answers (the first ``general_importance_prompts``
    of them) when they have no state yet."""

    release: str | None = None  # the data release being learned (tags buffered examples)
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    rehearsal_prompts: list[list[int]] = field(default_factory=list)
    general_importance_prompts: int = 0
    max_steps: int | None = None  # optimizer steps the task will take, when known (packnet)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """The model's greedy answer (token ids, up to and including the first end-of-sequence
    token) to each prompt, generated ``batch_size`` prompts at a time with left padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = set() if eos_token_id is None else set(token_ids(eos_token_id))
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            **({} if eos_token_id is None else {"eos_token_id": eos_token_id}),
        )
        for answer in out[:, width:].cpu().tolist():
            ends = [i for i, t in enumerate(answer) if t in stop]
            answers.append(answer[: ends[0] + 1] if ends else answer)
    model.train(was_training)
    return answers


def token_ids(token: int | Sequence[int]) -> list[int]:
    """One token id or several, as a list."""
    return [int(token)] if isinstance(token, int) else [int(t) for t in token]


class Strategy:
    """Base class: hooks that do nothing and state that saves to a folder."""

    name: ClassVar[str] = ""
    #: True when the strategy may train on ``TaskContext.rehearsal_prompts`` (validation then
    #: checks that no rehearsal prompt is a probe prompt).
    uses_rehearsal_prompts: ClassVar[bool] = False
    #: True for parameter isolation (packnet, progressive): every task keeps parameters of its own
    #: and is answered through ``use_task``. A merged model cannot hold several tasks, so such a
    #: model is kept unmerged: each task's model is rebuilt from the base weights and ``save``'s state.
    isolates_tasks: ClassVar[bool] = False
    #: True when the saved state is per parameter of the LoRA adapter trained (packnet): to
    #: rebuild the model, put an adapter of the same shape on the base before ``load``.
    state_on_adapter: ClassVar[bool] = False
    #: What the strategy keeps from one release to the next (its saved state), in a few words:
    #: each strategy declares it, ``forgetless strategies`` lists it.
    stores: ClassVar[str] = "nothing"
    #: True when the strategy stays correct with several training processes (DDP): what it
    #: measures from data is combined across ranks (``cf_strategies.distributed``) or computed
    #: identically on every rank, so that every rank ends a task with the same state.
    rank_safe: ClassVar[bool] = False
    #: True when it also works on sharded parameters (FSDP): it reaches the weights only through
    #: the model's forward pass and never reads, keeps or changes a parameter itself.
    shard_safe: ClassVar[bool] = False
    #: True when it stays correct on a padding-free batch (``DataCollatorWithFlattening``: the
    #: examples concatenated into one row, ``position_ids`` restarting at each, no attention
    #: mask): it reads the batch only through the model's outputs at the label positions or not
    #: at all. False for what needs one row per example: rows added to the batch (replay, DER,
    #: iLoRA, self-rehearsal), per-example passes over the task's batches (EWC's Fisher).
    #: ``train.padding_free`` refuses a strategy without it; an instance may narrow it (LwF).
    flattening_safe: bool = False
    #: True when the strategy's ``extra_loss`` is the whole loss (SDFT's distillation on the
    #: student's own answers): the task loss on the rows ``augment_batch`` returns is dropped.
    #: Such a strategy cannot be combined with another that adds rows (their rows would not
    #: be trained).
    replaces_task_loss: ClassVar[bool] = False

    def prepare(self, context: TaskContext) -> None:
        """Called before ``before_task`` by a pipeline, with what it knows about the task."""

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        """Called once before training on a new task."""

    def augment_batch(self, model: nn.Module, batch: Batch) -> Batch:
        """Return the batch to train on (replay strategies add old examples)."""
        return batch

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        """A term added to the task loss for this batch, or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after backward, before the optimizer step: ``.grad`` holds this step's
        gradients (after clipping)."""

    def after_step(self, model: nn.Module) -> None:
        """Called right after the optimizer updated the parameters."""

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        """Called once after training on a task; ``data`` iterates over that task's batches."""

    def use_task(self, model: nn.Module, task: int | str | None) -> None:
        """Make ``model`` answer with the parameters of ``task``: its index in the order the tasks
        were learned (negative from the end), the release name it was learned under
        (``TaskContext.release``), None for the latest, i.e. the model as trained, or
        :data:`BASE` for the base model without any task's parameters. Call it between tasks.
        A no-op here: without parameter isolation every task shares the weights."""

    def reanchor(self, model: nn.Module) -> None:
        """The model's trainable weights now stand where the last task ended, under other values:
        e.g. its LoRA adapter was merged into the base weights and a fresh adapter (ΔW = 0) put
        on. Strategies that anchor to old weights (EWC, SI, HLR) move θ* to the current values;
        their importances stay. Call it after ``load`` and before ``before_task``."""

    # ---- state that survives across releases -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-serialisable values; the default has none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state but got keys {sorted(state)}")

    def save(self, folder: str | Path) -> None:
        """Write ``state_dict()`` to ``<folder>/<name>.safetensors`` (tensors, keys with dots
        kept) and ``<folder>/<name>.json`` (everything else)."""
        write_state(folder, self.name, self.state_dict())

    def load(self, folder: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Read what ``save`` wrote; a folder without this strategy's files leaves it fresh."""
        state = read_state(folder, self.name, map_location)
        if state is not None:
            self.load_state_dict(state)

    # ---- state in the middle of a task (checkpoints) ------------------------------------------
    def task_state_dict(self) -> dict[str, Any]:
        """What a checkpoint taken during a task holds beside ``state_dict()``: the running state
        that ``before_task`` starts afresh and the steps advance (SI's path integral, iLoRA's slow
        learner, PackNet's masks). Empty here: the hooks keep nothing between steps."""
        return {}

    def agree_task_state(self) -> None:
        """Several processes: make the running state (``task_state_dict``) the same on every
        rank before a checkpoint, which saves rank 0's. A collective, called on every rank at
        every save. Nothing to do when the running state does not depend on the rank's data."""

    def load_task_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Continue a task from a checkpoint: called after ``before_task``, once ``model`` holds
        the checkpoint's weights, with what ``task_state_dict`` returned."""
        if state:
            raise ValueError(
                f"strategy {self.name!r} keeps no state during a task but got keys {sorted(state)}"
            )

    def __repr__(self) -> str:
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        options = ", ".join(f"{k}={getattr(self, k)!r}" for k in names if hasattr(self, k))
        return f"{type(self).__name__}({options})"


def write_state(folder: str | Path, stem: str, state: Mapping[str, Any]) -> None:
    """Write a state dict as ``<folder>/<stem>.safetensors`` (its tensors, keys with dots kept)
    and ``<folder>/<stem>.json`` (everything else); never pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    other = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    tensor_file = folder / f"{stem}.safetensors"
    if tensors:
        save_file(tensors, str(tensor_file))
    elif tensor_file.exists():  # a stale file from an earlier save would be loaded back
        tensor_file.unlink()
    (folder / f"{stem}.json").write_text(json.dumps(other, indent=1, sort_keys=True))


def read_state(
    folder: str | Path, stem: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any] | None:
    """What ``write_state`` wrote, or None when ``<folder>/<stem>.json`` does not exist."""
    folder = Path(folder)
    meta_file = folder / f"{stem}.json"
    if not meta_file.exists():
        return None
    state: dict[str, Any] = json.loads(meta_file.read_text())
    tensor_file = folder / f"{stem}.safetensors"
    if tensor_file.exists():
        state.update(load_file(str(tensor_file), device=str(map_location)))
    return state


@contextmanager
def using_task(
    strategies: Iterable[Strategy], model: nn.Module, task: int | str | None
) -> Iterator[nn.Module]:
    """``with using_task(strategies, model, task): ...`` answers with ``task``'s parameters inside
    the block (``use_task``) and with the latest task's after it."""
    strategies = list(strategies)
    for s in strategies:
        s.use_task(model, task)
    try:
        yield model
    finally:
        for s in strategies:
            s.use_task(model, None)


#: ``use_task(model, BASE)`` answers with none of the tasks' own parameters: the base model, i.e.
#: what the model knew before its first task (pre-training knowledge, in a pipeline).
BASE = "<base>"


def task_index(task: int | str | None, names: Sequence[str], strategy: str) -> int:
    """The index of ``task`` among the tasks learned, ``names`` in learning order: an index
    (negative from the end), a name (its latest use), None for the latest task, or -1 for
    :data:`BASE` (no task)."""
    if task == BASE:
        return -1
    if not names:
        raise ValueError(f"{strategy}: no task learned yet, so there is no task to answer with")
    if task is None:
        return len(names) - 1
    if isinstance(task, str):
        if task not in names:
            raise ValueError(f"{strategy}: unknown task {task!r}; tasks learned: {list(names)}")
        return len(names) - 1 - list(reversed(names)).index(task)
    index = int(task)
    if not -len(names) <= index < len(names):
        raise ValueError(
            f"{strategy}: task {index} is out of range: {len(names)} task(s) learned, {list(names)}"
        )
    return index % len(names)
