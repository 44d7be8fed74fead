"""Checkpoint and resume of the fine-tune step: a crash (SIGKILL) after a checkpoint, then a retry
of the step on the same run folder, against an uninterrupted run; and checkpoints that were cut
short (killed while they were written) are passed over, not resumed and not a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from cf_strategies import (
    ContinualTrainer,
    TaskContext,
    build_strategies,
    checkpoint_problem,
    latest_checkpoint,
)
from cf_strategies.buffer import collate
from cf_strategies.replay import Replay
from flows.core.config import load_params
from flows.core.data import load_release
from flows.core.records import ChampionRef
from flows.registry.serving import STRATEGY_STATE
from flows.steps.finetune import (
    CHECKPOINT_DIR,
    FinetuneStep,
    checkpoint_tag,
    checkpoint_to_resume,
    finetune,
)
from flows.steps.modeling import tokenize_for_training
from tests.cf_strategies.tiny_models import tiny_lora, token_batches
from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 64
# The two runs do the same fp32 operations in the same order on the same CPU with the same number
# of threads, so they agree to the last bit (measured difference: 0.0); the tolerance leaves room
# only for a change of reduction order in a multi-threaded kernel, about 1e-7 per operation. A
# resume that lost SI's path integral was off by 6.8 in Ω, one that measured SI's general
# importance again by 0.62 in a step's loss; Adam moves each LoRA weight by about the learning
# rate, 0.02, per step.
TOLERANCE = 1e-5


def champion_with_buffer(tiny_model_dir: Path, demo_dir: Path, folder: Path) -> ChampionRef:
    """The tiny model as a champion that learned wiki-topics-1 with replay: its buffer holds 8
    of that release's examples (a reservoir of 24), so replay draws from it while training."""
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    release = demo_dir / "releases" / "wiki-topics-1"
    rows = [
        {
            k: torch.tensor(v)
            for k, v in tokenize_for_training(tokenizer, ex, False, MAX_LENGTH).items()
        }
        for ex in load_release(release, "train")[:24]
    ]
    replay = Replay(buffer_size=8, ratio=0.5)
    replay.prepare(TaskContext(release=release.name, pad_token_id=tokenizer.pad_token_id))
    replay.after_task(None, [collate(rows, tokenizer.pad_token_id)])
    replay.save(folder / STRATEGY_STATE)
    return ChampionRef(version="1", model_dir=folder, releases=[release.name])


def eval_loss(model_dir: Path, release: Path, n: int = 16) -> float:
    """The candidate's mean loss on the answers of the release's first ``n`` eval examples."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = [
        {
            k: torch.tensor(v)
            for k, v in tokenize_for_training(tokenizer, ex, False, MAX_LENGTH).items()
        }
        for ex in load_release(release, "eval")[:n]
    ]
    with torch.no_grad():
        return float(model(**collate(rows, tokenizer.pad_token_id)).loss)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_step_killed_after_a_checkpoint_resumes_there_and_ends_as_an_uninterrupted_run(
    tmp_path, tiny_model_dir, demo_dir
):
    """si+replay, 10 steps, a checkpoint every 2. The step is SIGKILLed in its own process right
    after its first complete checkpoint, then run again on the same run folder. The retry starts
    at the checkpoint's step (not 0) with the strategies' state of that moment: the replay buffer
    of the champion with its random state advanced by the draws made so far, SI's path integral,
    and SI's importance of general knowledge (measured once, in the killed run: measured again, it
    would count twice). It ends with the weights, eval loss, SI importances and replay buffer of
    an uninterrupted run (within ``TOLERANCE``), and leaves no checkpoint behind."""
    train = {
        "strategy": "si+replay",
        "strategy_params": {"replay": {"buffer_size": 8, "ratio": 0.5}},
        "general_importance_prompts": 4,
        "max_steps": 10,
        "checkpoint_steps": 2,
        "batch_size": 4,
        "max_length": MAX_LENGTH,
    }
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir, train=train)
    params = load_params(params_file)
    champion = champion_with_buffer(tiny_model_dir, demo_dir, tmp_path / "champion")
    champion_file = champion.write(tmp_path / "champion.json")
    release = demo_dir / "releases" / "wiki-topics-2"
    crashed = tmp_path / "crashed"
    checkpoints = crashed / CHECKPOINT_DIR
    tag = checkpoint_tag(FinetuneStep.from_params(params), champion, release)

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tests.flows.finetune_child"]
    command += [str(params_file), str(champion_file), str(release), str(crashed)]
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(checkpoints, tag)[0] is None:
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        returncode = child.wait()
    assert returncode == -signal.SIGKILL
    assert not (crashed / "candidate_model").exists()
    checkpoint, _ = latest_checkpoint(checkpoints, tag)
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert 2 <= step < 10 and step % 2 == 0
    saved_log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    saved_replay = json.loads((checkpoint / STRATEGY_STATE / "replay.json").read_text())
    saved_si = json.loads((checkpoint / STRATEGY_STATE / "si.json").read_text())
    saved_seconds = json.loads((checkpoint / "checkpoint.json").read_text())["train_seconds"]
    champion_replay = json.loads((champion.model_dir / STRATEGY_STATE / "replay.json").read_text())

    reference = finetune(
        FinetuneStep.from_params(params), champion, release, tmp_path / "uninterrupted"
    )
    resumed = finetune(FinetuneStep.from_params(params), champion, release, crashed)

    # it resumed: the Trainer's step counter started at the checkpoint's, its log up to there
    # is the killed run's; SI's general importance was measured once (tasks: general, release)
    assert reference.resumed_from_step is None
    assert resumed.resumed_from_step == step and resumed.steps == reference.steps == 10
    assert resumed.log_history[:step] == [h for h in saved_log if "loss" in h]
    assert saved_si["tasks"] == 1
    assert 0 < saved_seconds < resumed.train_seconds  # the killed run's seconds counted too
    # the buffer in the checkpoint: the champion's examples, its random state moved by the draws
    assert saved_replay["buffer"]["fingerprint"] == champion_replay["buffer"]["fingerprint"]
    assert saved_replay["buffer"]["rng"] != champion_replay["buffer"]["rng"]

    # the same result as the uninterrupted run
    assert [h["step"] for h in resumed.log_history] == [h["step"] for h in reference.log_history]
    loss_gap = max(
        abs(h["loss"] - r["loss"])
        for h, r in zip(resumed.log_history, reference.log_history, strict=True)
    )
    assert loss_gap <= TOLERANCE
    weights = load_file(str(resumed.model_dir / "model.safetensors"))
    reference_weights = load_file(str(reference.model_dir / "model.safetensors"))
    champion_weights = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max_difference(weights, reference_weights) <= TOLERANCE
    assert max_difference(reference_weights, champion_weights) > 100 * TOLERANCE  # it trained
    state, reference_state = (r.model_dir / STRATEGY_STATE for r in (resumed, reference))
    si = load_file(str(state / "si.safetensors"))
    assert max_difference(si, load_file(str(reference_state / "si.safetensors"))) <= TOLERANCE
    assert json.loads((state / "si.json").read_text())["tasks"] == 2
    replay = json.loads((state / "replay.json").read_text())
    assert replay == json.loads((reference_state / "replay.json").read_text())
    assert replay["buffer"]["seen"] == {"0": 24, "1": 240}
    score, reference_score = (eval_loss(r.model_dir, release) for r in (resumed, reference))
    assert abs(score - reference_score) <= TOLERANCE
    assert score < eval_loss(tiny_model_dir, release) - 0.1  # the score moved with training

    assert not checkpoints.exists() and not (tmp_path / "uninterrupted" / CHECKPOINT_DIR).exists()


def small_trainer(out: Path, max_steps: int, tag: str = "") -> ContinualTrainer:
    """A ContinualTrainer of a tiny LoRA Llama with replay, a checkpoint every 2 steps."""
    rows = token_batches(n_batches=1, batch=8, length=10, seed=3)[0]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps,
        learning_rate=0.05, save_strategy="steps", save_steps=2, report_to=[],
        logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return ContinualTrainer(
        model=tiny_lora(),
        args=args,
        train_dataset=[{k: v[i] for k, v in rows.items()} for i in range(8)],
        strategies=build_strategies("si", {}),
        checkpoint_tag=tag,
    )


def test_checkpoints_cut_short_or_of_another_setup_are_passed_over_and_deleted(tmp_path):
    """Checkpoints 2, 4 and 6 of one setup. Checkpoint 6 lost its ``checkpoint.json`` (killed
    before the strategies' state was written) and checkpoint 4 has a truncated adapter file: the
    step resumes from checkpoint 2, deletes the other two, and trains on to the end. Named
    explicitly, a truncated checkpoint is refused with the reason; another setup's tag is
    passed over."""
    out = tmp_path / "trainer"
    small_trainer(out, max_steps=6, tag="setup-a").train()
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert checkpoint_problem(out / "checkpoint-6", "setup-b").startswith("written for another")
    (out / "checkpoint-6" / "checkpoint.json").unlink()
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(adapter.read_bytes()[: size // 2])

    chosen, skipped = latest_checkpoint(out, "setup-a")
    assert chosen == out / "checkpoint-2"
    assert skipped == {
        out / "checkpoint-6": "no checkpoint.json: the save did not finish",
        out / "checkpoint-4": (
            f"adapter_model.safetensors has {size // 2} bytes, not {size}: truncated"
        ),
    }
    assert latest_checkpoint(out, "setup-b") == (
        None,
        {
            out / "checkpoint-6": "no checkpoint.json: the save did not finish",
            out / "checkpoint-4": "written for another training setup (tag 'setup-a', not "
            "'setup-b')",
            out / "checkpoint-2": "written for another training setup (tag 'setup-a', not "
            "'setup-b')",
        },
    )
    with pytest.raises(ValueError, match=r"checkpoint-4: adapter_model.safetensors has \d+ bytes"):
        small_trainer(out, max_steps=6, tag="setup-a").train(
            resume_from_checkpoint=out / "checkpoint-4"
        )

    assert checkpoint_to_resume(out, "setup-a") == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    # training time goes on from the checkpoint's (say the first run took 1000 s to it)
    manifest = out / "checkpoint-2" / "checkpoint.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"train_seconds": 1000.0}))
    trainer = small_trainer(out, max_steps=6, tag="setup-a")
    trainer.train(resume_from_checkpoint=out / "checkpoint-2")
    assert trainer.resumed_from_step == 2 and trainer.state.global_step == 6
    assert 1000 < trainer.train_seconds < 1000 + 120
    last = json.loads((out / "checkpoint-6" / "checkpoint.json").read_text())["train_seconds"]
    assert 1000 < last <= trainer.train_seconds
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert checkpoint_problem(out / "checkpoint-6", "setup-a") is None
