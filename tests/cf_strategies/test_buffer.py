"""The reservoir buffer: uniform retention, per-task quotas, exact round trip, batch plumbing."""

import json

import pytest
import torch
from scipy.stats import chisquare

from cf_strategies.base import TaskContext
from cf_strategies.buffer import (
    ReservoirBuffer,
    collate,
    concat_batches,
    unbatch,
)
from cf_strategies.replay import Replay


def _retention_counts(capacity, streams, trials, per_task_quota=False):
    """How often each item of the stream(s) is in the buffer at the end, over ``trials`` seeds."""
    counts = {}
    for seed in range(trials):
        buf = ReservoirBuffer(capacity, per_task_quota=per_task_quota, seed=seed)
        for task, n in enumerate(streams):
            for i in range(n):
                buf.add({"id": torch.tensor(task * 1000 + i)}, task)
        for ex, task in zip(buf.examples, buf.tasks, strict=True):
            assert int(ex["id"]) // 1000 == task  # every slot knows its task
            counts[int(ex["id"])] = counts.get(int(ex["id"]), 0) + 1
    return counts


def test_reservoir_keeps_every_seen_item_with_equal_probability():
    capacity, n, trials = 10, 50, 2000
    counts = _retention_counts(capacity, [n], trials)
    observed = [counts.get(i, 0) for i in range(n)]
    assert sum(observed) == capacity * trials  # the buffer is always full
    # Each item kept with probability M/N = 0.2: expected 400 each; chi-square at fixed seeds.
    assert chisquare(observed).pvalue > 0.01
    first, last = sum(observed[:10]), sum(observed[-10:])
    assert abs(first - last) / (capacity * trials / n * 10) < 0.1  # no early/late bias


def test_reservoir_is_uniform_across_tasks_without_quotas():
    counts = _retention_counts(12, [40, 20], 1500)
    observed = [counts.get(i, 0) for i in range(40)] + [counts.get(1000 + i, 0) for i in range(20)]
    assert chisquare(observed).pvalue > 0.01  # 60 items, each kept with probability 12/60


def test_per_task_quota_splits_the_budget_and_stays_uniform_within_a_task():
    counts = _retention_counts(10, [30, 20], 1500, per_task_quota=True)
    task0 = [counts.get(i, 0) for i in range(30)]
    task1 = [counts.get(1000 + i, 0) for i in range(20)]
    assert sum(task0) == sum(task1) == 5 * 1500  # 5 slots each
    assert chisquare(task0).pvalue > 0.01
    assert chisquare(task1).pvalue > 0.01


def test_quota_remainder_goes_to_the_earliest_tasks():
    buf = ReservoirBuffer(10, per_task_quota=True)
    for task in range(3):
        buf.extend(({"v": torch.tensor(i)} for i in range(20)), task)
    assert [buf.tasks.count(t) for t in range(3)] == [4, 3, 3]


def _mixed_examples():
    g = torch.Generator().manual_seed(0)
    examples = []
    for length in (3, 7, 5, 1):
        ids = torch.randint(0, 100, (length,), generator=g)
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(length, dtype=torch.long),
                "labels": torch.where(torch.arange(length) < 1, -100, ids),
                "logits16": torch.randn(length, 4, generator=g).to(torch.bfloat16),
                "logits32": torch.randn(length, 4, generator=g) * 1e-30,
                "task": torch.tensor(2),
            }
        )
    return examples


def test_buffer_round_trips_exactly_through_safetensors_and_json(tmp_path):
    strategy = Replay(buffer_size=3, seed=5)
    strategy.prepare(TaskContext(release="release-7"))
    for task in range(2):
        strategy.buffer.extend(_mixed_examples(), task)
        strategy.after_task(None, [])
    strategy.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.json", "replay.safetensors"]

    loaded = Replay(buffer_size=99)
    loaded.load(tmp_path)
    assert loaded.task == 2 and loaded.buffer.capacity == 3
    assert loaded.buffer.tasks == strategy.buffer.tasks
    assert loaded.buffer.seen == strategy.buffer.seen == {0: 4, 1: 4}
    assert loaded.buffer.versions == {0: "release-7", 1: "release-7"}
    for a, b in zip(strategy.buffer.examples, loaded.buffer.examples, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # the random state travels too: both draw the same examples next
    assert [ex["input_ids"].tolist() for ex in strategy.buffer.sample(2)] == [
        ex["input_ids"].tolist() for ex in loaded.buffer.sample(2)
    ]


def test_load_rejects_a_buffer_whose_content_changed(tmp_path):
    strategy = Replay(buffer_size=4)
    strategy.buffer.extend(_mixed_examples())
    strategy.save(tmp_path)
    meta = json.loads((tmp_path / "replay.json").read_text())
    meta["buffer"]["tasks"][0] = 9
    (tmp_path / "replay.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        Replay().load(tmp_path)


def test_collate_right_pads_with_ignore_labels():
    examples = _mixed_examples()[:3]
    batch = collate(examples, pad_token_id=7)
    assert batch["input_ids"].shape == (3, 7) and batch["task"].shape == (3,)
    assert batch["input_ids"][0, 3:].tolist() == [7] * 4
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [-100] * 4
    assert torch.equal(batch["labels"][1], examples[1]["labels"])


def test_unbatch_strips_padding_on_either_side():
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 6], [-100, 8, 9, -100]]),
    }
    a, b = unbatch(batch)
    assert a["input_ids"].tolist() == [5, 6] and a["labels"].tolist() == [-100, 6]
    assert b["input_ids"].tolist() == [7, 8, 9] and b["attention_mask"].tolist() == [1, 1, 1]


def test_concat_batches_pads_both_sides_to_the_longer_sequence():
    new = collate(_mixed_examples()[:2])  # length 7
    old = collate(_mixed_examples()[3:])  # length 1
    new.pop("logits16"), new.pop("logits32"), old.pop("logits16"), old.pop("logits32")
    mixed = concat_batches(old, new)
    assert mixed["input_ids"].shape == (3, 7)
    assert mixed["labels"][0, 1:].tolist() == [-100] * 6
    assert mixed["attention_mask"][0].tolist() == [1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(KeyError):
        concat_batches(old, {"x": torch.zeros(1, 2)})
