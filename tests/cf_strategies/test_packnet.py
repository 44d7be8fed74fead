"""PackNet: owned weights never move, masks never overlap, each task answers exactly as it did
when it ended, capacity runs out with a clear error, and the state rebuilds every task."""

import pytest
import torch
from transformers import TrainingArguments

from cf_strategies import ContinualTrainer, build_strategies, train_task
from cf_strategies.base import BASE, TaskContext, using_task
from cf_strategies.packnet import FREE, PackNet, PackNetCapacityError
from cf_strategies.registry import StrategyOptionError
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    ce_loss,
    class_batches,
    lm_loss,
    mlp_batches,
    mlp_loss,
    tiny_llm,
    tiny_lora,
    tiny_mlp,
    token_batches,
)


def _task_data(t: int) -> list[dict[str, torch.Tensor]]:
    return class_batches(3, n=8, classes=(0, 1), task=t, seed=10 + t)


def _probe(t: int = 0) -> dict[str, torch.Tensor]:
    return class_batches(1, n=16, classes=(0, 1), task=t, seed=99)[0]


@torch.no_grad()
def _answer(model, batch) -> torch.Tensor:
    return model(batch["x"], batch["task"])


def _train_tasks(model, packnet, tasks: int, record=None):
    """Train ``tasks`` tasks with AdamW and weight decay (which would move every weight)."""
    for t in range(tasks):
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
        train_task(model, _task_data(t), [packnet], opt, ce_loss, epochs=2)
        if record is not None:
            record(t)


def test_earlier_tasks_answer_bit_identically_after_later_tasks():
    model, packnet = TinyClassifier(), PackNet(prune_ratio=0.5, prune_at=3)
    probes = [_probe(t) for t in range(3)]
    right_after: dict[int, torch.Tensor] = {}
    later: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def record(t):
        right_after[t] = _answer(model, probes[t])
        for k in range(t):
            with using_task([packnet], model, k):
                later[k].append(_answer(model, probes[k]))
        assert torch.equal(_answer(model, probes[t]), right_after[t])  # the latest restored

    _train_tasks(model, packnet, 3, record)
    assert len(later[0]) == 2 and len(later[1]) == 1
    for k, outs in later.items():
        for out in outs:
            assert torch.equal(out, right_after[k])
    # without the mask, task 0 would answer differently: later tasks did change the model
    assert not torch.equal(_answer(model, probes[0]), right_after[0])


def test_masks_never_overlap_owned_weights_never_move_and_free_weights_are_zero():
    model, packnet = TinyClassifier(), PackNet(prune_ratio=0.5, prune_at=4)
    owners, values = [], []

    def record(t):
        owners.append({n: o.clone() for n, o in packnet.owner.items()})
        values.append({n: p.detach().clone() for n, p in model.named_parameters()})

    _train_tasks(model, packnet, 3, record)
    masks = [packnet.masks(t) for t in range(3)]
    for name, p in model.named_parameters():
        stacked = torch.stack([m[name] for m in masks]).int()
        assert int(stacked.sum(0).max()) <= 1  # no weight owned by two tasks
        free = packnet.owner[name] == FREE
        assert torch.equal(stacked.sum(0) == 0, free)
        assert bool((p.detach()[free] == 0).all())  # free weights are zero
        for t in range(3):
            # a task claims only weights that were free before it, and they never move after
            before = owners[t - 1][name] if t else torch.full_like(packnet.owner[name], FREE)
            assert bool((before[masks[t][name]] == FREE).all())
            assert torch.equal(p.detach()[masks[t][name]], values[t][name][masks[t][name]])
    # each weight matrix: task 0 keeps half of the body's free weights, task 1 half of the rest
    body = "body.0.weight"
    assert [int(m[body].sum()) for m in masks] == [64, 32, 16]
    # the head: each task keeps half of the weights it trained, its own two rows
    assert [int(m["head.weight"].sum()) for m in masks] == [16, 16, 16]
    # a task never claims what it did not train: the head rows of tasks 1 and 2 after task 0
    assert not bool(masks[0]["head.weight"][2:].any())
    assert bool(masks[1]["head.weight"][2:4].any()) and not bool(masks[1]["head.weight"][4:].any())
    capacity = packnet.capacity()
    assert capacity["tasks"] == ["task-0", "task-1", "task-2"]
    assert capacity["free"] == pytest.approx(1 - sum(capacity["owned"]))


def test_gradients_of_owned_weights_are_zeroed_and_pruned_weights_stay_zero_while_retraining():
    model, packnet = tiny_mlp(), PackNet(prune_ratio=0.5, prune_at=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    train_task(model, mlp_batches(seed=1), [packnet], opt, mlp_loss, epochs=2)
    owned = {n: o != FREE for n, o in packnet.owner.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    batches = mlp_batches(seed=2) * 2
    packnet.before_task(model, batches)
    for step, batch in enumerate(batches):
        loss, _ = mlp_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        packnet.after_backward(model)
        for name, p in model.named_parameters():
            assert bool((p.grad[owned[name]] == 0).all())
            if not owned[name].all():  # (the biases all belong to task 0)
                assert bool((p.grad[~owned[name]] != 0).any())
        opt.step()
        packnet.after_step(model)
        if step == 2:  # just pruned at prune_at=3: the task's kept weights and the rest
            kept = {n: (o == 1) for n, o in packnet.owner.items()}
            at_prune = {n: p.detach().clone() for n, p in model.named_parameters()}
    packnet.after_task(model, batches)
    for name, p in model.named_parameters():
        pruned = ~kept[name] & ~owned[name]
        assert bool((p.detach()[pruned] == 0).all())  # pruned weights stayed 0 while retraining
        if kept[name].any():
            assert not torch.equal(p.detach()[kept[name]], at_prune[name][kept[name]])  # retrained


def test_freed_weights_are_zero_in_the_model_and_restart_from_their_pruned_values():
    model, packnet = tiny_mlp(), PackNet(prune_ratio=0.5)
    train_task(model, mlp_batches(), [packnet], torch.optim.Adam(model.parameters()), mlp_loss)
    free = {n: o == FREE for n, o in packnet.owner.items()}
    for name, p in model.named_parameters():
        assert bool((p.detach()[free[name]] == 0).all())
        if p.dim() == 2:  # the weights pruned, kept in the state for the next task's start
            assert bool((packnet.weights[name][free[name]] != 0).all())
    packnet.use_task(model, None)  # the latest task's model: free weights 0
    assert all(bool((p.detach()[free[n]] == 0).all()) for n, p in model.named_parameters())
    packnet.before_task(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), packnet.weights[name])


def test_task_shorter_than_prune_at_is_pruned_at_its_end_with_a_warning():
    model, packnet = tiny_mlp(), PackNet(prune_ratio=0.5, prune_at=100)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="before prune_at=100: pruned at its end"):
        train_task(model, mlp_batches(), [packnet], opt, mlp_loss)
    assert packnet.capacity()["free"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(("retrain_fraction", "prune_step"), [(0.2, 8), (0.5, 5)])
def test_without_prune_at_the_task_length_sets_it(retrain_fraction, prune_step):
    model = tiny_mlp()
    packnet = PackNet(prune_ratio=0.5, retrain_fraction=retrain_fraction)
    pruned_at = []
    prune = packnet._prune
    packnet._prune = lambda: (pruned_at.append(packnet._step), prune())
    packnet.prepare(TaskContext(release="r1", max_steps=10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_task(model, mlp_batches(10), [packnet], opt, mlp_loss, epochs=1)  # 10 steps
    assert pruned_at == [prune_step]
    assert packnet.capacity()["free"] == pytest.approx(0.5, abs=0.01)


def test_no_capacity_left_is_a_clear_error_before_training():
    model, packnet = tiny_mlp(), PackNet(prune_ratio=0.0)  # each task keeps all it trained
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_task(model, mlp_batches(), [packnet], opt, mlp_loss)
    assert packnet.capacity()["free"] == 0.0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        PackNetCapacityError,
        match=r"no capacity left for a new task: 0 of the 192 weight-matrix elements are free "
        r"\(0\.0%\); the 1 tasks learned own them all \(task-0 100\.0%; prune_ratio=0\.0\)",
    ):
        train_task(model, mlp_batches(seed=1), [packnet], opt, mlp_loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), start[name])  # nothing was trained


def test_state_round_trip_rebuilds_every_task_of_a_lora_model_bit_identically(tmp_path):
    model, packnet = tiny_lora(), PackNet(prune_ratio=0.5, prune_at=2)
    probe = token_batches(1, seed=7)[0]
    probe = {k: v for k, v in probe.items() if k != "labels"}
    answers = []
    for t, release in enumerate(["r1", "r2", "r3"]):
        packnet.prepare(TaskContext(release=release))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 0.05)
        train_task(model, token_batches(2, seed=t), [packnet], opt, lm_loss, epochs=2)
        with torch.no_grad():
            answers.append(model(**probe).logits)
    packnet.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"packnet.json", "packnet.safetensors"}

    fresh = tiny_lora()  # the same base; its adapter's values do not matter
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_" in name:
                p.normal_()
    loaded = PackNet(prune_ratio=0.5, prune_at=2)
    loaded.load(tmp_path)
    assert loaded.tasks == ["r1", "r2", "r3"]
    for t, release in enumerate(["r1", "r2", "r3"]):
        for task in (t, release, t - 3):
            loaded.use_task(fresh, task)
            with torch.no_grad():
                assert torch.equal(fresh(**probe).logits, answers[t])
    loaded.use_task(fresh, None)
    with torch.no_grad():
        assert torch.equal(fresh(**probe).logits, answers[-1])
    # BASE: no task's weights, the adapter adds exactly nothing to the base model
    with using_task([loaded], fresh, BASE), torch.no_grad():
        assert torch.equal(fresh(**probe).logits, tiny_llm()(**probe).logits)  # the same base
    # the tasks are different models: the masks matter
    assert not torch.equal(answers[0], answers[2])
    with pytest.raises(ValueError, match=r"unknown task 'r9'; tasks learned: \['r1', 'r2', 'r3'\]"):
        loaded.use_task(fresh, "r9")
    with pytest.raises(ValueError, match="task 3 is out of range: 3 task"):
        loaded.use_task(fresh, 3)
    with pytest.raises(ValueError, match="parameters this model does not have.*lora_A"):
        loaded.use_task(tiny_lora(targets=("k_proj",)), 0)


def test_a_fresh_adapter_continues_from_the_saved_state(tmp_path):
    """The next release: a fresh adapter on the unmerged base, the state loaded; task 0 is kept."""
    model, packnet = tiny_lora(), PackNet(prune_ratio=0.5)
    probe = {"input_ids": token_batches(1, seed=7)[0]["input_ids"]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 0.05)
    train_task(model, token_batches(2, seed=0), [packnet], opt, lm_loss, epochs=2)
    with torch.no_grad():
        first = model(**probe).logits
    packnet.save(tmp_path)

    fresh, loaded = tiny_lora(seed=5), PackNet(prune_ratio=0.5)
    fresh.base_model.model.load_state_dict(model.base_model.model.state_dict())  # same base
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_" in name:
                p.normal_()  # a fresh adapter with other values
    loaded.load(tmp_path)
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], 0.05)
    train_task(fresh, token_batches(2, seed=1), [loaded], opt, lm_loss, epochs=2)
    with torch.no_grad():
        assert not torch.equal(fresh(**probe).logits, first)
        loaded.use_task(fresh, 0)
        assert torch.equal(fresh(**probe).logits, first)


def test_runs_inside_continual_trainer_on_a_lora_llama(tmp_path):
    model = tiny_lora()
    (packnet,) = build_strategies("packnet", {"packnet": {"prune_ratio": "0.5", "prune_at": 3}})
    probe = {"input_ids": token_batches(1, seed=7)[0]["input_ids"]}
    answers = []
    for t in range(2):
        rows = token_batches(n_batches=1, batch=8, length=10, seed=3 + t)[0]
        data = [{k: v[i] for k, v in rows.items()} for i in range(8)]
        args = TrainingArguments(
            output_dir=str(tmp_path / str(t)), per_device_train_batch_size=2, max_steps=5,
            learning_rate=0.05, weight_decay=0.1, max_grad_norm=1.0, report_to=[],
            save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        )  # fmt: skip
        ContinualTrainer(model=model, args=args, train_dataset=data, strategies=[packnet]).train()
        model.eval()
        with torch.no_grad():
            answers.append(model(**probe).logits)
    assert packnet.capacity()["owned"] == pytest.approx([0.5, 0.25])
    with using_task([packnet], model, 0), torch.no_grad():
        assert torch.equal(model(**probe).logits, answers[0])
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, answers[1])
    assert not torch.equal(answers[0], answers[1])


def test_options_are_typed_and_use_task_is_refused_during_a_task():
    with pytest.raises(StrategyOptionError, match="strategy 'packnet': option 'prune_ratio'"):
        PackNet(prune_ratio=1.0)
    with pytest.raises(StrategyOptionError, match="strategy 'packnet': option 'prune_at'"):
        build_strategies("packnet", {"packnet": {"prune_at": 0}})
    model, packnet = tiny_mlp(), PackNet()
    with pytest.raises(ValueError, match="no task learned yet"):
        packnet.use_task(model, 0)
    packnet.use_task(model, None)  # nothing learned: the model as it is
    packnet.before_task(model)
    with pytest.raises(RuntimeError, match="between tasks"):
        packnet.use_task(model, None)
