"""One rank of the two-process checks in tests/flows/test_distributed.py (``torch.multiprocessing``
spawns it): the collectives of ``cf_strategies.distributed`` and the replay buffer over gloo,
without a model, so that a rank imports little."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from cf_strategies import distributed
from cf_strategies.buffer import ReservoirBuffer
from cf_strategies.replay import Replay


def examples(indices) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": torch.tensor([i, i + 1]), "labels": torch.tensor([i, -100])} for i in indices
    ]


def rank_checks(rank: int, port: int, out: str) -> None:
    """One rank: the reservoir over both shards, the sample-weighted mean, the draw split and the
    disagreement check; writes what it saw to ``out/rank<r>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    facts: dict = {}
    # 22 examples in batches of 3: global batches 0..7, the last one padded by accelerate with
    # the first two examples again (even batches); rank r gets batches r, r + 2, ...
    stream = list(range(22))
    batches = [stream[i : i + 3] for i in range(0, 22, 3)]
    batches[-1] = batches[-1] + [0, 1]
    mine = [examples(b) for b in batches[rank::2]]
    for quota in (False, True):
        buffer = ReservoirBuffer(5, per_task_quota=quota, seed=3)
        buffer.extend(examples(range(100, 110)), task=0)  # an earlier task's examples
        buffer.extend_across_ranks(mine, task=1, total=22)
        facts[f"buffer_{quota}"] = [int(ex["input_ids"][0]) for ex in buffer.examples]
        facts[f"tasks_{quota}"] = buffer.tasks
        facts[f"rng_{quota}"] = list(buffer.rng.getstate()[1])
    # the mean over 3 + 5 examples, not the mean of the two ranks' means
    count = 3 if rank == 0 else 5
    sums = [torch.full((2,), float(count * (rank + 1)))]  # rank 0: 3 × 1, rank 1: 5 × 2
    facts["seen"] = distributed.reduce_mean_(sums, count)
    facts["mean"] = sums[0].tolist()
    # replay: each rank keeps its share of one draw for the global batch
    replay = Replay(buffer_size=10, ratio=1.0, seed=5)
    replay.buffer.extend(examples(range(10)))
    facts["drawn"] = [int(ex["input_ids"][0]) for ex in replay.draw({"labels": torch.zeros(2, 2)})]
    # a state that differs between ranks is caught on every rank
    replay.buffer.examples[0] = examples([50 + rank])[0]  # as a rank-local fill would
    try:
        distributed.state_fingerprints([replay])
        facts["disagreement"] = None
    except distributed.RanksDisagreeError as err:
        facts["disagreement"] = str(err)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
