"""Experience replay (ER): train on every new batch mixed with old examples from a buffer.

    loss = CE(f([x; x_m]), [y; y_m]),   (x_m, y_m) ~ Uniform(M),   |x_m| = round(ratio · |x|)

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (ER with a reservoir
buffer); Rolnick et al. 2019, "Experience Replay for Continual Learning".

The buffer M is a reservoir of fixed budget (``buffer_size``, optionally split per task) filled in
``after_task`` with one pass over the task's data, so the next task replays it. Replayed token
rows are right-padded to the batch (labels -100). The buffer is saved with the model version
(safetensors + JSON), tagged with ``data_version`` (set it to the release id before training).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from cf_strategies.base import Batch, Strategy
from cf_strategies.buffer import (
    ReservoirBuffer,
    batch_size,
    collate,
    concat_batches,
    unbatch,
)
from cf_strategies.registry import register


@register
class Replay(Strategy):
    """Experience replay with a reservoir buffer; ``ratio`` replayed examples per new one."""

    name = "replay"

    def __init__(
        self,
        buffer_size: int = 500,
        ratio: float = 1.0,
        per_task_quota: bool = False,
        pad_token_id: int = 0,
        seed: int = 0,
    ):
        self.buffer = ReservoirBuffer(buffer_size, per_task_quota, seed)
        self.ratio = ratio
        self.pad_token_id = pad_token_id
        self.task = 0  # tasks finished so far: the id given to the next task's examples
        self.data_version: str | None = None

    def augment_batch(self, model: nn.Module, batch: Batch) -> Batch:
        n = round(self.ratio * batch_size(batch))
        if n == 0 or len(self.buffer) == 0:
            return batch
        replayed = collate(self.buffer.sample(n), self.pad_token_id)
        return concat_batches(batch, replayed, self.pad_token_id)

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        for batch in data or ():
            self.buffer.extend(unbatch(batch), self.task)
        self.buffer.versions[self.task] = self.data_version
        self.task += 1

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task = state["task"]
        self.buffer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"Replay(buffer={len(self.buffer)}/{self.buffer.capacity}, ratio={self.ratio})"
