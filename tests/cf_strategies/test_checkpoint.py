"""ContinualTrainer checkpoints: a task resumed from a checkpoint ends exactly as the same task
trained without a stop, for every strategy that keeps state while it trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from cf_strategies import ContinualTrainer, Strategy, build_strategies
from tests.cf_strategies.tiny_models import tiny_lora, token_batches

# spec -> options: running sums (si, hlr), buffers drawn from with their random state (replay,
# der, ilora), a slow learner (ilora), masks and a prune step (packnet: its checkpoint before the
# prune, and right after it), a column that is no peft adapter (progressive), a teacher and
# anchors taken at the task's start (lwf, l2), a Fisher (ewc)
SPECS = {
    "si+replay": {"replay": {"buffer_size": 6, "ratio": 0.5}},
    "hlr": {},
    "ewc+der": {"ewc": {"lambda_": 10.0}, "der": {"buffer_size": 6, "top_k": 4}},
    "ilora": {"ilora": {"buffer_size": 6}},
    "packnet": {"packnet": {"prune_ratio": 0.5, "prune_at": 3}},
    "packnet-pruned": {"packnet": {"prune_ratio": 0.5, "prune_at": 2}},
    "progressive": {"progressive": {"rank": 4}},
    "lwf+l2": {},
}
# The same operations in the same order in one process: equal to the last bit; the tolerance only
# admits a change of reduction order. One step more or less moves the weights by about 1e-2.
TOLERANCE = 1e-6


def task_data(task: int) -> list[dict[str, torch.Tensor]]:
    rows = token_batches(n_batches=1, batch=8, length=10, seed=3 + task)[0]
    return [{k: v[i] for k, v in rows.items()} for i in range(8)]


def train(model, strategies, out: Path, task: int, resume: Path | None = None):
    """Task 0: 2 steps, no checkpoint; task 1: 5 steps (of 4 per epoch), a checkpoint every 2
    and one at the end."""
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=2 + 3 * task,
        learning_rate=0.05, weight_decay=0.1, max_grad_norm=1.0, report_to=[],
        save_strategy="steps" if task else "no", save_steps=2, logging_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = ContinualTrainer(
        model=model, args=args, train_dataset=task_data(task), strategies=strategies
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def at_second_task(name: str, tmp_path: Path):
    """A LoRA Llama and the strategies after a first task: the start of the second."""
    model = tiny_lora()
    strategies = build_strategies(name.removesuffix("-pruned"), SPECS[name])
    train(model, strategies, tmp_path / "first", task=0)
    return model, strategies


def assert_same_state(a: Strategy, b: Strategy) -> None:
    state, other = a.state_dict(), b.state_dict()
    assert state.keys() == other.keys()
    for key, value in state.items():
        if torch.is_tensor(value):
            gap = float((value.float() - other[key].float()).abs().max()) if value.numel() else 0
            assert gap <= TOLERANCE, (a.name, key, gap)
        else:
            assert value == other[key], (a.name, key)


# a checkpoint in the middle of the task for every spec; the last one (saved at the last step,
# a crash before the model was saved) for a few: resumed, it trains no further step
CASES = [(name, 2) for name in SPECS] + [("si+replay", 5), ("ilora", 5), ("packnet-pruned", 5)]


@pytest.mark.parametrize(("name", "step"), CASES)
def test_a_task_resumed_from_its_checkpoint_ends_as_the_uninterrupted_task(name, step, tmp_path):
    """The second task trained through (checkpoints at steps 2, 4 and 5), and the same task started
    afresh and resumed from a checkpoint, as after a crash: the same weights (the progressive
    column included) and the same saved state (buffers with their random state, importances,
    masks)."""
    model, strategies = at_second_task(name, tmp_path / "a")
    train(model, strategies, tmp_path / "through", task=1)
    resumed_model, resumed_strategies = at_second_task(name, tmp_path / "b")
    trainer = train(
        resumed_model,
        resumed_strategies,
        tmp_path / "resumed",
        task=1,
        resume=tmp_path / "through" / f"checkpoint-{step}",
    )

    assert trainer.resumed_from_step == step and trainer.state.global_step == 5
    weights = dict(model.named_parameters())
    resumed = dict(resumed_model.named_parameters())
    assert weights.keys() == resumed.keys()
    gap = max(float((weights[n] - resumed[n]).detach().abs().max()) for n in weights)
    assert gap <= TOLERANCE
    probe = {"input_ids": torch.stack([row["input_ids"] for row in task_data(1)])}
    start = at_second_task(name, tmp_path / "c")[0]
    with torch.no_grad():  # the second task changed the model's answers: it trained
        moved = (model.eval()(**probe).logits - start.eval()(**probe).logits).abs().max()
    assert float(moved) > 1e-3
    for s, r in zip(strategies, resumed_strategies, strict=True):
        assert_same_state(s, r)
