"""Experience replay (ER): train on every new batch mixed with old examples from a buffer.

    loss = CE(f([x; x_m]), [y; y_m]),   (x_m, y_m) ~ Uniform(M),   |x_m| = round(ratio · |x|)

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (ER with a reservoir
buffer); Rolnick et al. 2019, "Experience Replay for Continual Learning".

The buffer M is a reservoir of fixed budget (``buffer_size``, optionally split per task) filled in
``after_task`` with one pass over the task's data, so the next task replays it. Replayed token
rows are right-padded to the batch (labels -100) with ``pad_token_id``: the option if given, else
the tokenizer's from the :class:`~cf_strategies.base.TaskContext` handed to ``prepare``, else 0.
The buffer is saved with the model version (safetensors + JSON), every task tagged with the
release it came from (``TaskContext.release``).

Several processes (DDP): ``after_task`` fills the buffer from every rank's shard of the task, in
the order one process would have read it (``ReservoirBuffer.extend_across_ranks``), so every rank
holds the same buffer and rank 0 saves it; each step every rank draws for the global batch and
replays its share of that draw (``draw``).

The buffer handling (filling, drawing, release tags, saving) is :class:`BufferStrategy`, which DER
builds on too (overriding ``examples``: what one batch puts into the buffer); self-rehearsal is
a :class:`Replay` whose examples are the champion's answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import Field
from torch import nn

from cf_strategies.base import Batch, Strategy, TaskContext
from cf_strategies.buffer import (
    Example,
    ReservoirBuffer,
    batch_size,
    collate,
    concat_batches,
    unbatch,
)
from cf_strategies.distributed import dataset_size, is_distributed, rank, world_size
from cf_strategies.registry import register

NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class BufferStrategy(Strategy):
    """A reservoir buffer of the finished tasks' examples, ``ratio`` of them drawn per new one."""

    def __init__(
        self,
        buffer_size: NonNegativeInt = 500,
        ratio: NonNegativeFloat = 1.0,
        per_task_quota: bool = False,
        pad_token_id: NonNegativeInt | None = None,
        seed: int = 0,
    ):
        self.buffer = ReservoirBuffer(buffer_size, per_task_quota, seed)
        self.ratio = ratio
        self.pad_option = pad_token_id  # the user's choice; None: the context's
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.task = 0  # tasks finished so far: the id given to the next task's examples
        self.data_version: str | None = None

    def prepare(self, context: TaskContext) -> None:
        """Tag the coming task's examples with ``context.release``; pad with the context's pad
        id unless the ``pad_token_id`` option was given."""
        self.data_version = context.release
        if self.pad_option is None:
            self.pad_token_id = 0 if context.pad_token_id is None else context.pad_token_id

    def draw(self, batch: Batch) -> list[Example]:
        """``round(ratio · |batch|)`` distinct buffered examples (fewer if the buffer is smaller).
        Several processes: every rank draws for the whole global batch (W times as many, the
        same draw on every rank: same buffer, same random state) and keeps its own share, so
        the ranks replay different examples, as one process would with the global batch."""
        n = round(self.ratio * batch_size(batch))
        if not n or not len(self.buffer):
            return []
        ranks = world_size()
        drawn = self.buffer.sample(n * ranks)
        return drawn[rank() :: ranks][:n] if ranks > 1 else drawn

    def examples(self, model: nn.Module, batch: Batch) -> list[Example]:
        """What one batch of the finished task offers to the buffer: its rows."""
        return unbatch(batch)

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if is_distributed():  # every rank's shard, offered in one order on every rank
            batches = [self.examples(model, batch) for batch in data or ()]
            self.buffer.extend_across_ranks(batches, self.task, dataset_size(data))
        else:
            for batch in data or ():
                self.buffer.extend(self.examples(model, batch), self.task)
        self.buffer.versions[self.task] = self.data_version
        self.task += 1

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task = state["task"]
        self.buffer.load_state_dict(state)


@register
class Replay(BufferStrategy):
    """Experience replay with a reservoir buffer; ``ratio`` replayed examples per new one."""

    name = "replay"
    stores = "raw examples (a reservoir buffer of earlier releases' training rows)"
    rank_safe = shard_safe = True  # the buffer is filled from every rank (BufferStrategy)

    def augment_batch(self, model: nn.Module, batch: Batch) -> Batch:
        replayed = self.draw(batch)
        if not replayed:
            return batch
        return concat_batches(batch, collate(replayed, self.pad_token_id), self.pad_token_id)

    def __repr__(self) -> str:
        return f"Replay(buffer={len(self.buffer)}/{self.buffer.capacity}, ratio={self.ratio})"
