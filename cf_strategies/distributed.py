"""Multi-process training (DDP, FSDP) as a strategy sees it: which rank it runs on, and the few
collectives that keep a strategy's state the same on every rank. Every function is a no-op (or
the one-process answer) when ``torch.distributed`` is not initialised.

Under DDP each rank trains on its own shard of every global batch and the gradients are averaged,
so the weights stay identical. What a strategy measures from data must then be combined across
ranks to equal what one process would measure on the whole batch:

* a mean over examples (EWC's Fisher): sums and example counts are added over ranks
  (``reduce_mean_``), so the result is the single-process mean over the union of the shards;
* a quantity built from gradients (SI/HLR's path integral): the plain mean over ranks
  (``all_reduce_mean_``), as DDP's own gradient is the plain mean of the ranks' gradients;
* examples kept for later (replay/DER buffers): every rank's examples are gathered, in the
  order one process would have seen them (``in_global_order``), and offered to the buffer on
  every rank, which then makes the same (seeded) choices everywhere; rank 0 saves it.

``state_fingerprints`` checks the outcome: one SHA-256 per strategy of its saved state, gathered
from every rank, so that a state that drifted apart is caught before rank 0 saves it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU for NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Σ over ranks of each tensor, in place (every rank gets the same sum)."""
    if not is_distributed() or not tensors:
        return
    device = _comm_device()
    for t in tensors:
        moved = t if t.device == device else t.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """The plain mean over ranks of each tensor, in place."""
    if not is_distributed():
        return
    all_reduce_sum_(tensors)
    torch._foreach_div_(list(tensors), float(world_size()))


def reduce_mean_(sums: Sequence[torch.Tensor], count: int) -> int:
    """Turn this rank's per-example ``sums`` over ``count`` examples into the mean over the
    examples of every rank, Σ_ranks sums / Σ_ranks count, in place; returns that total count
    (0: no rank had an example, the sums are left as they are)."""
    total = torch.tensor([float(count)], dtype=torch.float64)
    all_reduce_sum_([total])
    all_reduce_sum_(sums)
    seen = int(total.item())
    if seen:
        torch._foreach_div_(list(sums), float(seen))
    return seen


def all_gather_objects(items: Any) -> list[Any]:
    """Every rank's ``items`` (any picklable value), indexed by rank; ``[items]`` in one process.
    Used for examples headed for a replay buffer, which is then saved as safetensors + JSON."""
    if not is_distributed():
        return [items]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, items)
    return out


def in_global_order(per_rank: Sequence[Sequence[Any]], total: int | None = None) -> list[Any]:
    """The batches of every rank in the order one process would have read them: accelerate
    hands rank r the batches r, r + W, r + 2W, ... of one shared (seeded) order, so batch k of
    rank r is global batch k·W + r. ``total`` (the dataset's size, when known) drops the items
    accelerate repeats at the end to give every rank as many batches.

    ``per_rank[r]`` is rank r's list of batches, each a list of items; returns the items."""
    rounds = max((len(batches) for batches in per_rank), default=0)
    items = [
        item
        for k in range(rounds)
        for batches in per_rank
        if k < len(batches)
        for item in batches[k]
    ]
    return items if total is None else items[:total]


def gather_batches(batches: list[list[Any]], data: Iterable | None = None) -> list[Any]:
    """Every rank's ``batches`` (lists of examples, one per batch of this rank's shard of
    ``data``), as one list of examples in the global order (``in_global_order``), the same on
    every rank. One process: the examples of ``batches`` as they are."""
    if not is_distributed():
        return [item for batch in batches for item in batch]
    return in_global_order(all_gather_objects(batches), dataset_size(data))


def dataset_size(data: Iterable | None) -> int | None:
    """The number of examples of a DataLoader's dataset, or None when it is not known."""
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def rank_share(budget: int) -> int:
    """This rank's part of a budget split evenly over the ranks (the first ranks get the
    remainder), so that the parts add up to ``budget``."""
    share, rest = divmod(budget, world_size())
    return share + (rank() < rest)


def state_fingerprint(state: dict[str, Any]) -> str:
    """SHA-256 of a strategy's ``state_dict()``: its tensors' bytes and its other values."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


class RanksDisagreeError(RuntimeError):
    """Strategies ended a task with different state on different ranks."""


def state_fingerprints(strategies: Sequence[Any]) -> list[dict[str, str]]:
    """Every rank's ``{strategy name: fingerprint of its state}``, indexed by rank. Raises
    :class:`RanksDisagreeError` (on every rank) naming the strategies whose state differs."""
    mine = {s.name: state_fingerprint(s.state_dict()) for s in strategies}
    everyone = all_gather_objects(mine)
    differ = sorted(name for name in mine if len({f[name] for f in everyone}) > 1)
    if differ:
        raise RanksDisagreeError(
            f"the state of {differ} differs between ranks after training, so saving rank 0's "
            "would lose what the other ranks measured; train with one process "
            "(train.num_processes: 1) and report this"
        )
    return everyone
