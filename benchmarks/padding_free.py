"""Tokens per second of the fine-tune step with and without padding-free batches.

SmolLM2-135M-Instruct (the embedded model, offline) learns the demo release ``wiki-topics-1``
with the fine-tune step's own pieces (``step_timing.step_trainer``: ``load_model``, the LoRA and
``TrainingArguments`` of ``params.yaml``, ``tokenize_for_training``, ``ContinualTrainer`` with
``collator``; on the GPU when there is one): padded rows (``DataCollatorForSeq2Seq``) against one
flattened row (``train.padding_free``, ``DataCollatorWithFlattening``). Each optimizer step is
timed (``step_timing.StepTimer``, ``on_step_begin`` to ``on_step_end``: forward, strategies'
terms, backward, AdamW, hooks); the first step of every run
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_timing import step_trainer  # noqa: E402

from flows.core.config import load_params  # noqa: E402
from flows.core.data import load_release  # noqa: E402
from flows.demo.build import build_demo, demo_releases  # noqa: E402
from flows.registry.model_source import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(params, base, release, strategy, padding_free, seed, steps, work):
    """``steps`` + 1 optimizer steps of the fine-tune step (``step_timing.step_trainer``, seeded
    with ``seed``: the same LoRA initialisation and batches in both modes): per step (wall s,
    CPU s, real tokens, label tokens, tokens computed), the warm-up step dropped, and the
    logged losses."""
    trainer, counting, timer = step_trainer(
        params, base, release, strategy, work, steps + 1, padding_free, seed=seed
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
    cfg = params.train
    results = {
        "model": params.model.base,
        "release": release.name,
        "examples": len(load_release(release, "train")),
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
                    params, base, release, strategy, mode == "padding_free", r, args.steps, work
                )
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
