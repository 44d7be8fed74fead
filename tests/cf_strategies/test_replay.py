"""Experience replay: the buffer fills after a task and replayed rows join the next batches."""

import torch

from cf_strategies import build_strategies, train_task
from cf_strategies.base import TaskContext
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    ce_loss,
    class_batches,
    lm_loss,
    tiny_llm,
    token_batch,
)


def test_replayed_token_rows_are_right_padded_into_the_batch():
    model = tiny_llm()
    replay = build_strategies("replay", {"replay": {"buffer_size": 6, "ratio": 0.5}})[0]
    empty = token_batch(4)
    assert replay.augment_batch(model, empty) is empty  # empty buffer: no-op
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
    # right padding changes nothing: the mixed loss is the token-weighted mean of each row's own
    with torch.no_grad():
        nll, count = 0.0, 0
        for row in range(6):
            length = int(mixed["attention_mask"][row].sum())
            ids, labels = mixed["input_ids"][row, :length], mixed["labels"][row, :length]
            n = int((labels[1:] != -100).sum())
            nll += model(input_ids=ids[None], labels=labels[None]).loss * n
            count += n
        torch.testing.assert_close(model(**mixed).loss, nll / count, atol=1e-5, rtol=1e-5)


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
    rows = []

    def loss_fn(m, batch):
        rows.append(batch["task"].tolist())
        return ce_loss(m, batch)

    train_task(model, class_batches(3, task=1, seed=1), [replay], opt, loss_fn)
    assert rows == [[1] * 8 + [0] * 8] * 3  # every step: 8 new rows, then 8 of the old task
    assert sorted(set(replay.buffer.tasks)) == [0, 1]


def test_saved_buffer_carries_to_the_next_release(tmp_path):
    model = tiny_llm()
    (replay,) = build_strategies("replay", {"replay": {"buffer_size": 5, "seed": 3}})
    replay.prepare(TaskContext(release="v1"))
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

    sizes = []

    def recorded(m, batch):
        sizes.append(len(batch[1]))
        return loss_fn(m, batch)

    for _ in range(2):
        train_task(model, pairs, [replay, der], opt, recorded)
    assert sizes == [8, 8, 13, 13]  # 8 new; then 8 + the 5 buffered (der replays in its own pass)
    mixed = replay.augment_batch(model, pairs[0])
    assert isinstance(mixed, tuple) and mixed[0].shape == (13, 8) and mixed[1].shape == (13,)
    assert der.extra_loss(model, pairs[0], None) > 0


def test_prepare_takes_the_release_and_the_pad_id_unless_the_option_is_set():
    context = TaskContext(release="2024-06", pad_token_id=7)
    for name in ("replay", "der"):
        auto, fixed = (
            build_strategies(name)[0],
            build_strategies(name, {name: {"pad_token_id": 3}})[0],
        )
        assert auto.pad_token_id == 0 and fixed.pad_token_id == 3  # before any context
        for s in (auto, fixed):
            s.prepare(context)
            assert s.data_version == "2024-06"
        assert auto.pad_token_id == 7 and fixed.pad_token_id == 3
        auto.prepare(TaskContext(release="next"))  # a tokenizer without a pad id: 0
        assert auto.pad_token_id == 0 and not auto.uses_rehearsal_prompts

    replay = build_strategies("replay", {"replay": {"buffer_size": 4}})[0]
    replay.prepare(context)
    replay.after_task(None, [token_batch(4, prompt=(8, 9), answer=(6, 7), seed=1)])
    mixed = replay.augment_batch(None, token_batch(2, prompt=(1, 1), answer=(1, 1), seed=2))
    assert (mixed["input_ids"][:2, 2:] == 7).all()  # the new rows padded with the context's id
    assert replay.buffer.versions == {0: "2024-06"}
