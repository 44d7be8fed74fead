"""Tokens per second of the fine-tune step with and without padding-free batches.

SmolLM2-135M-Instruct (the embedded model, offline) learns the demo release ``wiki-topics-1``
with the fine-tune step's own pieces (``flows.finetune``: ``load_model``, the LoRA of
``params.yaml``, ``tokenize_for_training``, ``ContinualTrainer`` with ``collator``): padded rows
(``DataCollatorForSeq2Seq``) against one flattened row (``train.padding_free``,
``DataCollatorWithFlattening``). Each optimizer step is timed (a callback, ``on_step_begin`` to
``on_step_end``: forward, strategies' terms, backward, AdamW, hooks); the first step of every run
is a warm-up and not counted. The two modes take turns, ``--steps`` steps each per round, over
``--rounds`` rounds (round r trains on seed r's batches, the same for both modes). Tokens/s count
real tokens only (no padding): every input token, and the label tokens apart.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/padding_free.py --strategies naive,lwf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import TrainerCallback, TrainingArguments, set_seed  # noqa: E402

import cf_strategies  # noqa: E402
from flows.config import load_params  # noqa: E402
from flows.data import load_release  # noqa: E402
from flows.demo_data import build_demo, demo_releases  # noqa: E402
from flows.finetune import collator, task_context  # noqa: E402
from flows.model_source import resolve_model  # noqa: E402
from flows.modeling import load_model, tokenize_for_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class Counting:
    """A collator that records, per batch, its real tokens, label tokens and padded size."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        real = sum(len(f["input_ids"]) for f in features)
        labels = sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features)
        batch = self.inner(features)
        self.batches.append((real, labels, batch["input_ids"].numel()))
        return batch


class StepTimer(TrainerCallback):
    """Wall and CPU seconds (this process, every thread) of each optimizer step."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = self._start
        self.times.append((time.perf_counter() - wall, time.process_time() - cpu))


def run(params, base, tokenizer, train_set, release, strategy, padding_free, seed, steps, work):
    """``steps`` + 1 optimizer steps of the fine-tune step: per step (wall s, CPU s, real
    tokens, label tokens, tokens computed), the warm-up step dropped, and the logged losses."""
    cfg = params.train
    set_seed(seed)  # the same LoRA initialisation in both modes, as flows.finetune seeds it
    model, _ = load_model(base, for_training=True)
    lora = cfg.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    strategies = cf_strategies.build_strategies(strategy, cfg.strategy_params)
    context = task_context(params, tokenizer, release)
    for s in strategies:
        s.prepare(context)
    counting = Counting(collator(tokenizer, padding_free))
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=steps + 1,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = cf_strategies.ContinualTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=counting,
        strategies=strategies,
        callbacks=[timer],
    )
    trainer.train()
    # after_task iterates over the data again: only the first steps + 1 batches were trained on
    rows = [(*t, *counting.batches[i]) for i, t in enumerate(timer.times)]
    return rows[1:], [h["loss"] for h in trainer.state.log_history if "loss" in h]


def summary(rows: list[tuple]) -> dict:
    """Tokens/s over all steps (wall), the median of the steps' tokens/s (robust to a busy
    machine) and tokens per CPU-second; the padding share of the positions computed."""
    seconds, cpu = sum(r[0] for r in rows), sum(r[1] for r in rows)
    real, labels, computed = (sum(r[i] for r in rows) for i in (2, 3, 4))
    return {
        "steps": len(rows),
        "seconds": round(seconds, 3),
        "median_step_s": round(statistics.median(r[0] for r in rows), 4),
        "tokens_per_s": round(real / seconds, 1),
        "median_step_tokens_per_s": round(statistics.median(r[2] / r[0] for r in rows), 1),
        "tokens_per_cpu_s": round(real / cpu, 1),
        "label_tokens_per_s": round(labels / seconds, 1),
        "real_tokens": real,
        "label_tokens": labels,
        "computed_positions": computed,
        "padding_share": round(1 - real / computed, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="naive")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-padding-free"))
    ap.add_argument("--out", default=str(RESULTS / "padding_free.json"))
    args = ap.parse_args()
    work = Path(args.work)
    params = load_params(ROOT / "params.yaml", {"workspace": str(work / "ws")})
    release = demo_releases(build_demo(params.path(params.data.demo_dir)))[0]
    base = Path(resolve_model(params.model.base, params.path(params.model.cache_dir)))
    _, tokenizer = load_model(base, for_training=True)
    cfg = params.train
    train_set = [
        tokenize_for_training(tokenizer, ex, params.model.use_chat_template, cfg.max_length)
        for ex in load_release(release, "train")
    ]
    results = {
        "model": params.model.base,
        "release": release.name,
        "examples": len(train_set),
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "lora_r": cfg.lora.r,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "strategies": {},
    }
    for strategy in args.strategies.split(","):
        modes: dict[str, list] = {"padded": [], "padding_free": []}
        losses: dict[str, list] = {"padded": [], "padding_free": []}
        for r in range(args.rounds):
            order = ["padded", "padding_free"] if r % 2 == 0 else ["padding_free", "padded"]
            for mode in order:
                got, logged = run(
                    params, base, tokenizer, train_set, release, strategy,
                    mode == "padding_free", r, args.steps, work,
                )  # fmt: skip
                modes[mode] += got
                losses[mode].append(logged)
                print(strategy, mode, f"round {r}", summary(got), flush=True)
        padded, flat = summary(modes["padded"]), summary(modes["padding_free"])
        results["strategies"][strategy] = {
            "padded": padded,
            "padding_free": flat,
            "speedup": {
                k: round(flat[k] / padded[k], 3)
                for k in ("tokens_per_s", "median_step_tokens_per_s", "tokens_per_cpu_s")
            },
            "losses_per_round": losses,
            "steps": {k: [[round(x, 4) if isinstance(x, float) else x for x in r] for r in v]
                      for k, v in modes.items()},
        }  # fmt: skip
        results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(strategy, json.dumps(padded), json.dumps(flat), sep="\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after every strategy
        print("wrote", args.out)


if __name__ == "__main__":
    main()
