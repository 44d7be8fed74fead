"""The Strategy API: a forgetting-prevention method as a handful of hooks.

A strategy sees one training task (one data release) at a time:

    before_task(model, data)          snapshot old weights, open buffers, build a teacher
    augment_batch(model, batch)       mix replayed examples into the batch (replay, DER)
    extra_loss(model, batch, outputs) penalties and distillation terms added to the task loss
    after_backward(model)             gradients of the total loss are in .grad (SI reads them)
    after_step(model)                 parameters were just updated (SI path integral, masks)
    after_task(model, data)           Fisher, importances, buffer updates for the next release

State that must survive to the next release (Fisher diagonals, importances, buffers) is
returned by ``state_dict()`` and saved with ``save(folder)`` as safetensors + JSON, never pickle.
Every hook is a no-op here, so a strategy overrides only what it needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
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


class Strategy:
    """Base class: hooks that do nothing and state that saves to a folder."""

    name: ClassVar[str] = ""

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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
        other = {k: v for k, v in state.items() if not torch.is_tensor(v)}
        if tensors:
            save_file(tensors, str(folder / f"{self.name}.safetensors"))
        (folder / f"{self.name}.json").write_text(json.dumps(other, indent=1, sort_keys=True))

    def load(self, folder: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Read what ``save`` wrote; a folder without this strategy's files leaves it fresh."""
        folder = Path(folder)
        meta_file = folder / f"{self.name}.json"
        if not meta_file.exists():
            return
        state: dict[str, Any] = json.loads(meta_file.read_text())
        tensor_file = folder / f"{self.name}.safetensors"
        if tensor_file.exists():
            state.update(load_file(str(tensor_file), device=str(map_location)))
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
