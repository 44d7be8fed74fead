"""Replay and distillation strategies composed with each other and with the regularisers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from cf_strategies import (
    STRATEGIES,
    ContinualTrainer,
    build_strategies,
    load_strategies,
    save_strategies,
    train_task,
)
from cf_strategies.buffer import collate, unbatch
from cf_strategies.trainer import total_loss
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    class_batches,
    lm_loss,
    tiny_llm,
    token_batch,
)

SMALL = {
    "replay": {"buffer_size": 4, "ratio": 0.5},
    "der": {"buffer_size": 4, "ratio": 0.5, "top_k": 4},
    "self_rehearsal": {
        "buffer_size": 4,
        "ratio": 0.5,
        "max_new_tokens": 3,
        "prompts_from_data": True,
    },
    "lwf": {},
    "label_smoothing": {"epsilon": 0.1},
}


def _lora_lm():
    return get_peft_model(tiny_llm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(
    "spec", ["lwf+replay", "der+label_smoothing", "self_rehearsal+lwf", "replay+der+lwf"]
)
def test_combinations_train_a_lora_lm_over_two_tasks(spec, tmp_path):
    model = _lora_lm()
    strategies = build_strategies(spec, {n: SMALL[n] for n in spec.split("+")})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
    for task in range(2):
        data = [token_batch(4, seed=10 * task + s) for s in range(2)]
        train_task(model, data, strategies, opt, lm_loss)
    save_strategies(strategies, tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".safetensors"}  # never pickle
    fresh = build_strategies(spec, {n: SMALL[n] for n in spec.split("+")})
    load_strategies(fresh, tmp_path)
    assert [s.state_dict().keys() for s in fresh] == [s.state_dict().keys() for s in strategies]
    # the loaded state continues exactly as the saved one: same rehearsals, draws and terms
    batch = token_batch(4, seed=99)
    totals = []
    for group in (strategies, fresh):
        for s in group:
            s.before_task(model)
        with torch.no_grad():
            totals.append(total_loss(model, batch, group, lm_loss, 0)[0])
    task_loss = lm_loss(model, batch)[0].detach()
    assert torch.equal(totals[0], totals[1]) and not torch.equal(totals[0], task_loss), spec


def test_lwf_plus_replay_distils_on_the_replayed_rows_too():
    model = _lora_lm()
    lwf, replay = build_strategies("lwf+replay", {"replay": {"buffer_size": 4, "ratio": 1.0}})
    replay.after_task(model, [token_batch(4, seed=1)])
    lwf.before_task(model)
    batch = replay.augment_batch(model, token_batch(4, seed=2))
    assert batch["input_ids"].shape[0] == 8
    with torch.no_grad():  # a moved adapter: the teacher now disagrees on every row
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    outputs = model(**batch)
    loss = lwf.extra_loss(model, batch, outputs)
    new_only = {k: v[:4] for k, v in batch.items()}
    assert loss > 0 and not torch.isclose(loss, lwf.extra_loss(model, new_only, model(**new_only)))


@pytest.mark.skipif("ewc" not in STRATEGIES, reason="the regularisation family is not merged yet")
def test_ewc_plus_replay_trains_a_classifier_over_two_tasks():
    def pair_loss(m, batch):
        logits = m(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1]), logits

    model = TinyClassifier()
    ewc, replay = build_strategies("ewc+replay", {"replay": {"buffer_size": 8}})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sizes = []
    for task in range(2):
        data = class_batches(3, classes=(2 * task, 2 * task + 1), seed=task)
        pairs = [(b["x"], b["labels"]) for b in data]  # the regularisers' (x, y) convention
        train_task(model, pairs, [ewc, replay], opt, pair_loss)
        sizes.append(len(replay.augment_batch(model, pairs[0])[1]))
    assert sizes == [16, 16]  # 8 new rows + 8 replayed, after either task
    assert replay.task == 2
    assert len(replay.buffer) == 8


def _collate(rows):
    return collate([{k: torch.tensor(v) for k, v in row.items()} for row in rows])


def test_continual_trainer_runs_lwf_replay_and_label_smoothing(tmp_path):
    model = _lora_lm()
    spec = "lwf+replay+label_smoothing"
    strategies = build_strategies(spec, {"replay": {"buffer_size": 6, "ratio": 0.5}})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    for task in range(2):
        rows = [
            {k: v.tolist() for k, v in ex.items()}
            for s in range(2)
            for ex in unbatch(token_batch(4, seed=10 * task + s))
        ]
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=_collate,
            strategies=strategies,
        )
        trainer.train()
    replay = strategies[1]
    assert replay.task == 2 and len(replay.buffer) == 6
    save_strategies(strategies, tmp_path / "state")
    loaded = build_strategies(spec)
    load_strategies(loaded, tmp_path / "state")
    assert loaded[1].buffer.fingerprint() == replay.buffer.fingerprint()
    assert loaded[0].tasks_done == 2
