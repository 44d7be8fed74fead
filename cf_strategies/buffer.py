"""A reservoir replay buffer of past examples, and the batch plumbing the replay family shares.

Reservoir sampling (Vitter 1985, Algorithm R): the n-th example offered is kept with probability
M/n in a uniformly chosen slot, so after N offers every example seen so far is in the buffer with
the same probability M/N, whatever the order of the stream. With ``per_task_quota`` the budget is
split evenly between the tasks seen so far and each task keeps its own reservoir; when a new task
arrives the older ones give up uniformly chosen slots (a uniform sample of a uniform sample).

An example is one row of a batch, a dict of tensors without the batch dimension: ``input_ids``,
``attention_mask`` and ``labels`` of one sequence (padding cut off), or ``x``/``labels``/``task``
of one image. ``collate`` pads examples back into a batch (right padding, labels -100) and
``concat_batches`` appends replayed rows to a training batch, so causal-LM token batches, plain
tensor batches and ``(x, y)`` pairs go through the same code.

Several processes (DDP): ``extend_across_ranks`` offers every rank's examples in the order one
process would have, so every rank holds the same buffer (rank 0 saves it), and its random state
stays the same on every rank.

``state_dict()`` holds one flat tensor per key (safetensors) and JSON metadata: the shapes, the
task of every slot, the examples seen per task, the data version of every task, the random state
and a SHA-256 fingerprint of the content, checked on load. Never pickle.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cf_strategies.distributed import all_gather_objects, in_global_order, is_distributed, rank

Example = dict[str, torch.Tensor]
LABEL_KEYS = ("labels", "y")
IGNORE_INDEX = -100
FORMAT_VERSION = 1


# ---- batches --------------------------------------------------------------------------------
def as_dict(batch: Any) -> Mapping[str, Any]:
    """A dict batch as is; an ``(x, y)`` pair as ``{"x": x, "y": y}``."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"x": batch[0], "y": batch[1]}
    raise TypeError(f"a batch is a dict or an (x, y) pair, not {type(batch).__name__}")


def label_key(batch: Any) -> str:
    """The key holding the targets: ``labels`` (causal LMs, default) or ``y``."""
    batch = as_dict(batch)
    return "y" if "y" in batch and "labels" not in batch else "labels"


def call_model(model: nn.Module, batch: Any, **kwargs: Any) -> Any:
    """The model on a batch without its targets: ``model(x, task=...)`` when the batch has an
    ``x`` (plain modules), ``model(input_ids=..., attention_mask=...)`` otherwise."""
    inputs = {k: v for k, v in as_dict(batch).items() if k not in LABEL_KEYS}
    if "x" in inputs:
        return model(inputs.pop("x"), **inputs, **kwargs)
    return model(**inputs, **kwargs)


def logits_of(outputs: Any) -> torch.Tensor:
    """A model's logits, whether it returns a tensor or a transformers output."""
    return outputs if torch.is_tensor(outputs) else outputs.logits


def is_token_batch(batch: Any) -> bool:
    """A causal-LM batch: ``input_ids`` with one label per token."""
    batch = as_dict(batch)
    return "input_ids" in batch and batch[label_key(batch)].dim() == 2


def target_positions(batch: Any, positions: str = "labels") -> torch.Tensor:
    """Bool (B, L): the positions whose logits are trained, in a token batch.

    ``"labels"``: position t when token t+1 is supervised (labels[t+1] != -100), the positions
    the causal-LM loss reads. ``"all"``: every non-padding position."""
    batch = as_dict(batch)
    if positions == "all":
        return batch["attention_mask"].bool()
    labels = batch[label_key(batch)]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_rows(model: nn.Module, batch: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that matter, one row per prediction: (B, C) for a classifier batch; for a
    token batch the rows at ``mask`` (default: supervised positions), (num_true, V), computed
    through ``logits_to_keep`` when the model takes it (the LM head then skips the rest)."""
    if not is_token_batch(batch):
        return logits_of(call_model(model, batch))
    mask = target_positions(batch) if mask is None else mask
    if _accepts_logits_to_keep(model):
        return logits_of(call_model(model, batch, logits_to_keep=mask))
    return logits_of(call_model(model, batch))[mask]


def output_rows(batch: Any, outputs: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Like ``forward_rows``, from outputs already computed on ``batch`` (full logits)."""
    logits = logits_of(outputs)
    if not is_token_batch(batch):
        return logits
    return logits[target_positions(batch) if mask is None else mask]


def target_rows(batch: Any) -> torch.Tensor:
    """The targets matching ``forward_rows``: (B,) labels, or the supervised next tokens."""
    labels = as_dict(batch)[label_key(batch)]
    return labels[:, 1:][labels[:, 1:] != IGNORE_INDEX] if is_token_batch(batch) else labels


def batch_size(batch: Any) -> int:
    return len(as_dict(batch)[label_key(batch)])


def pad_value(key: str, pad_token_id: int = 0) -> int:
    return {"labels": IGNORE_INDEX, "attention_mask": 0, "input_ids": pad_token_id}.get(key, 0)


def unbatch(batch: Any) -> list[Example]:
    """Split a batch into examples on the CPU; token rows lose their padding."""
    tensors = {k: v for k, v in as_dict(batch).items() if torch.is_tensor(v)}
    mask = tensors.get("attention_mask")
    seq_len = mask.shape[1] if mask is not None and mask.dim() == 2 else None
    examples = []
    for i in range(len(next(iter(tensors.values())))):
        row = {k: v[i].detach().cpu().clone() for k, v in tensors.items()}
        if seq_len is not None:
            kept = mask[i].nonzero().flatten()
            start, end = (int(kept[0]), int(kept[-1]) + 1) if len(kept) else (0, 0)
            row = {
                k: v[start:end].clone() if v.dim() >= 1 and len(v) == seq_len else v
                for k, v in row.items()
            }
        examples.append(row)
    return examples


def answer_example(prompt: Sequence[int], answer: Sequence[int]) -> Example:
    """A training example of a prompt and its answer: the loss on the answer tokens only."""
    ids = torch.tensor(list(prompt) + list(answer))
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + list(answer))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def collate(examples: Sequence[Example], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padding the first dimension where lengths differ."""
    batch = {}
    for key in examples[0]:
        rows = [ex[key] for ex in examples]
        if all(r.shape == rows[0].shape for r in rows):
            batch[key] = torch.stack(rows)
        else:
            longest = max(len(r) for r in rows)
            out = rows[0].new_full(
                (len(rows), longest, *rows[0].shape[1:]), pad_value(key, pad_token_id)
            )
            for i, r in enumerate(rows):
                out[i, : len(r)] = r
            batch[key] = out
    return batch


def concat_batches(batch: Any, extra: Mapping[str, torch.Tensor], pad_token_id: int = 0) -> Any:
    """``batch`` with the rows of ``extra`` appended (same keys); token tensors are right-padded
    to the longer of the two sequence lengths. An ``(x, y)`` pair stays a pair."""
    if not isinstance(batch, Mapping):
        mixed = concat_batches(as_dict(batch), extra, pad_token_id)
        return type(batch)((mixed["x"], mixed["y"]))
    if set(extra) != {k for k, v in batch.items() if torch.is_tensor(v)}:
        raise KeyError(f"replayed keys {sorted(extra)} differ from the batch's {sorted(batch)}")
    out = dict(batch)
    for key, new in extra.items():
        old = batch[key]
        new = new.to(device=old.device, dtype=old.dtype)
        if old.dim() >= 2 and old.shape[1] != new.shape[1] and "attention_mask" in batch:
            length = max(old.shape[1], new.shape[1])
            old, new = (_pad_to(t, length, pad_value(key, pad_token_id)) for t in (old, new))
        out[key] = torch.cat([old, new])
    return out


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- the buffer -----------------------------------------------------------------------------
class ReservoirBuffer:
    """At most ``capacity`` examples, a uniform sample of all examples offered (per task with
    ``per_task_quota``). ``add`` offers one example, ``sample`` draws without replacement."""

    def __init__(self, capacity: int, per_task_quota: bool = False, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"buffer capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.per_task_quota = per_task_quota
        self.examples: list[Example] = []
        self.tasks: list[int] = []  # the task of every slot
        self.seen: dict[int, int] = {}  # examples offered, per task
        self.versions: dict[int, str | None] = {}  # the data version each task came from
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, example: Example, task: int = 0) -> None:
        """Offer one example (reservoir step)."""
        if task not in self.seen:
            self.seen[task] = 0
            if self.per_task_quota:
                self._shrink_to_quotas()
        self.seen[task] += 1
        if self.per_task_quota:
            slots = [i for i, t in enumerate(self.tasks) if t == task]
            n, budget = self.seen[task], self.quota(task)
        else:
            slots = range(len(self.examples))
            n, budget = sum(self.seen.values()), self.capacity
        if len(slots) < budget:
            self.examples.append(example)
            self.tasks.append(task)
            return
        j = self.rng.randrange(n)
        if j < budget:
            self.examples[slots[j]] = example
            self.tasks[slots[j]] = task

    def extend(self, examples: Iterable[Example], task: int = 0) -> None:
        for ex in examples:
            self.add(ex, task)

    def extend_across_ranks(
        self, batches: Sequence[Sequence[Example]], task: int = 0, total: int | None = None
    ) -> None:
        """Offer every rank's examples (several processes; each rank passes the batches of its
        shard) in the order one process would have offered them (``in_global_order``, the first
        ``total``), leaving the same buffer on every rank. Which offer lands in which slot
        depends only on the number of offers and the seeded random state, never on the
        examples, so every rank runs the reservoir on the offers' positions and the ranks then
        exchange only the examples that were kept. One process: ``extend``."""
        if not is_distributed():
            self.extend((ex for batch in batches for ex in batch), task)
            return
        me = rank()
        sizes = all_gather_objects([len(b) for b in batches])
        positions = [
            [[(r, k, i) for i in range(n)] for k, n in enumerate(per_batch)]
            for r, per_batch in enumerate(sizes)
        ]
        self.extend(in_global_order(positions, total), task)  # positions stand in for examples
        kept = [slot for slot in self.examples if isinstance(slot, tuple)]
        mine = {(r, k, i): batches[k][i] for r, k, i in kept if r == me}
        found: dict[tuple, Example] = {}
        for part in all_gather_objects(mine):
            found.update(part)
        self.examples = [found[s] if isinstance(s, tuple) else s for s in self.examples]

    def quota(self, task: int) -> int:
        """Slots of ``task`` under per-task quotas: capacity split evenly, remainder to the
        earliest tasks."""
        order = sorted(self.seen)
        share, rest = divmod(self.capacity, len(order))
        return share + (order.index(task) < rest)

    def _shrink_to_quotas(self) -> None:
        for task in sorted(set(self.tasks)):
            slots = [i for i, t in enumerate(self.tasks) if t == task]
            drop = set(self.rng.sample(slots, max(0, len(slots) - self.quota(task))))
            self.examples = [e for i, e in enumerate(self.examples) if i not in drop]
            self.tasks = [t for i, t in enumerate(self.tasks) if i not in drop]

    def sample(self, n: int) -> list[Example]:
        """``n`` distinct examples (all of them if fewer), uniformly."""
        idx = self.rng.sample(range(len(self.examples)), min(n, len(self.examples)))
        return [self.examples[i] for i in idx]

    # ---- saving: safetensors-ready tensors + JSON, never pickle -------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of the content (keys, dtypes, shapes, bytes, tasks): the buffer's version."""
        h = hashlib.sha256()
        for ex, task in zip(self.examples, self.tasks, strict=True):
            h.update(str(task).encode())
            for key in sorted(ex):
                t = ex[key].contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def state_dict(self, prefix: str = "buffer") -> dict[str, Any]:
        keys = sorted(self.examples[0]) if self.examples else []
        if any(sorted(ex) != keys for ex in self.examples):
            raise ValueError("buffer examples have different keys; cannot save them as one table")
        meta = {
            "format": FORMAT_VERSION,
            "capacity": self.capacity,
            "per_task_quota": self.per_task_quota,
            "keys": keys,
            "shapes": [[list(ex[k].shape) for k in keys] for ex in self.examples],
            "tasks": self.tasks,
            "seen": {str(t): n for t, n in self.seen.items()},
            "versions": {str(t): v for t, v in self.versions.items()},
            "rng": _rng_to_json(self.rng.getstate()),
            "fingerprint": self.fingerprint(),
        }
        state: dict[str, Any] = {prefix: meta}
        for key in keys:
            state[f"{prefix}.{key}"] = torch.cat([ex[key].reshape(-1) for ex in self.examples])
        return state

    def load_state_dict(self, state: Mapping[str, Any], prefix: str = "buffer") -> None:
        meta = state[prefix]
        if meta["format"] != FORMAT_VERSION:
            raise ValueError(f"buffer format {meta['format']} is not {FORMAT_VERSION}")
        self.capacity, self.per_task_quota = meta["capacity"], meta["per_task_quota"]
        self.examples = [{} for _ in meta["shapes"]]
        for k, key in enumerate(meta["keys"]):
            flat, offset = state[f"{prefix}.{key}"], 0
            for ex, shapes in zip(self.examples, meta["shapes"], strict=True):
                n = int(torch.Size(shapes[k]).numel())
                ex[key] = flat[offset : offset + n].reshape(shapes[k]).clone()
                offset += n
        self.tasks = list(meta["tasks"])
        self.seen = {int(t): n for t, n in meta["seen"].items()}
        self.versions = {int(t): v for t, v in meta["versions"].items()}
        self.rng.setstate(_rng_from_json(meta["rng"]))
        if self.fingerprint() != meta["fingerprint"]:
            raise ValueError("replay buffer content does not match its saved fingerprint")


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
