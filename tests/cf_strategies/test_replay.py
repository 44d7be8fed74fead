"""Experience replay: the buffer fills after a task and replayed rows join the next batches."""

import torch
from tiny_lm import TinyClassifier, ce_loss, class_batches, lm_loss, tiny_lm, token_batch

from cf_strategies import build_strategies, train_task


def test_replayed_token_rows_are_right_padded_into_the_batch():
    model = tiny_lm()
    replay = build_strategies("replay", {"replay": {"buffer_size": 6, "ratio": 0.5}})[0]
    assert replay.augment_batch(model, token_batch(4)) is not None  # empty buffer: no-op
    old = [token_batch(4, prompt=(6, 9), answer=(5, 8), seed=s) for s in range(3)]
    replay.after_task(model, old)
    assert len(replay.buffer) == 6 and replay.task == 1

    new = token_batch(4, prompt=(2, 3), answer=(1, 2), seed=9)  # shorter than the old rows
    mixed = replay.augment_batch(model, new)
    assert mixed["input_ids"].shape[0] == 6  # 4 new + round(0.5 * 4) replayed
    width = mixed["input_ids"].shape[1]
    assert width > new["input_ids"].shape[1]
    for key in new:  # new rows first, unchanged, padded on the right
        assert torch.equal(mixed[key][:4, : new[key].shape[1]], new[key])
    assert (mixed["labels"][:4, new["labels"].shape[1] :] == -100).all()
    assert (mixed["attention_mask"][:4, new["labels"].shape[1] :] == 0).all()
    stored = {tuple(ex["input_ids"].tolist()) for ex in replay.buffer.examples}
    for row in range(4, 6):  # replayed rows: a stored example, then padding
        length = int(mixed["attention_mask"][row].sum())
        assert tuple(mixed["input_ids"][row, :length].tolist()) in stored
        assert (mixed["labels"][row, length:] == -100).all()
    assert torch.isfinite(model(**mixed).loss)


def test_replay_without_old_data_leaves_the_batch_alone():
    replay = build_strategies("replay")[0]
    batch = class_batches(1)[0]
    assert replay.augment_batch(None, batch) is batch


def test_replay_mixes_classifier_batches_with_task_ids():
    model = TinyClassifier()
    (replay,) = build_strategies("replay", {"replay": {"buffer_size": 10}})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    train_task(model, class_batches(3, task=0), [replay], opt, ce_loss)
    assert len(replay.buffer) == 10 and set(replay.buffer.tasks) == {0}
    batch = class_batches(1, classes=(0, 1), task=1, seed=1)[0]
    mixed = replay.augment_batch(model, batch)
    assert mixed["x"].shape == (16, 8)
    assert mixed["task"].tolist() == [1] * 8 + [0] * 8  # replayed rows keep their own head
    losses = train_task(model, class_batches(3, task=1, seed=1), [replay], opt, ce_loss)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sorted(set(replay.buffer.tasks)) == [0, 1]


def test_saved_buffer_carries_to_the_next_release(tmp_path):
    model = tiny_lm()
    (replay,) = build_strategies("replay", {"replay": {"buffer_size": 5, "seed": 3}})
    replay.data_version = "v1"
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    train_task(model, [token_batch(4, seed=s) for s in range(2)], [replay], opt, lm_loss)
    replay.save(tmp_path / "release-1")

    (next_release,) = build_strategies("replay", {"replay": {"buffer_size": 5}})
    next_release.load(tmp_path / "release-1")
    assert next_release.buffer.fingerprint() == replay.buffer.fingerprint()
    assert next_release.buffer.versions == {0: "v1"}
    a = replay.augment_batch(model, token_batch(2, seed=7))
    b = next_release.augment_batch(model, token_batch(2, seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same rows, same order


def test_x_y_pairs_are_replayed_as_pairs():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))  # called as model(x)
    replay, der = build_strategies("replay+der", {"replay": {"buffer_size": 5}})
    pairs = [(b["x"], b["labels"]) for b in class_batches(2, classes=(0, 1, 2, 3))]
    opt = torch.optim.SGD(model.parameters(), 0.1)

    def loss_fn(m, batch):
        logits = m(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1]), logits

    for _ in range(2):
        losses = train_task(model, pairs, [replay, der], opt, loss_fn)
        assert all(torch.isfinite(torch.tensor(losses)))
    mixed = replay.augment_batch(model, pairs[0])
    assert isinstance(mixed, tuple) and mixed[0].shape == (13, 8) and mixed[1].shape == (13,)
    assert der.extra_loss(model, pairs[0], None) > 0
