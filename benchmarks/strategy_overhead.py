"""Per-step overhead of the regularisation strategies against naive fine-tuning, side by side.

One process, one model, one fixed batch: a causal LM with peft LoRA adapters (only they train).
Every strategy runs the same training step (forward, task loss + its penalty, backward, its
after_backward, AdamW, its after_step); the strategies take turns, ``--steps`` timed steps each per
round, over ``--rounds`` rounds in a rotating order, after a warm-up, and the median step time of
each is divided by naive's. Each regulariser is measured twice, with the state of 1 and of
``--releases`` past releases (built by real tasks of a few steps: Fisher, importances), to show that
the cost does not grow with the number of past releases. The cost of ``after_task`` (the Fisher,
the importance update) is timed once per release and reported apart: it is paid once per release.

    .venv/bin/python benchmarks/strategy_overhead.py                       # the tiny LLM, CPU
    .venv/bin/python benchmarks/strategy_overhead.py --model .cache/models/smollm2-135m-instruct \\
        --rounds 10 --batch 8 --seq 128                                    # a local transformers folder
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cf_strategies import build_strategies  # noqa: E402
from cf_strategies.trainer import causal_lm_loss, train_step  # noqa: E402

REGULARISERS = ["l2", "ewc", "si", "hlr"]
LIMITS = {"l2": 1.10, "ewc": 1.10, "si": 1.15}  # the targets (hlr: none given)


def build_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        name = str(args.model)
    else:
        config = LlamaConfig(
            vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
        name = "tiny Llama (4 layers, hidden 128, vocab 1024), random weights"
    if not args.full:
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.targets)
        model = get_peft_model(model, lora)
    model = model.to(args.device)
    model.train()
    return model, name


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="a local transformers folder (default: a tiny Llama)"
    )
    parser.add_argument(
        "--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA target modules"
    )
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per strategy first")
    parser.add_argument(
        "--releases", type=int, default=5, help="past releases for the 'many' state"
    )
    parser.add_argument("--strategies", nargs="+", default=REGULARISERS)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "strategy_overhead.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, model_name = build_model(args)
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    task_data = [batch] * 2  # what before_task / after_task see (Fisher from 2 x batch examples)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    options = {"ewc": {"fisher_samples": 2 * args.batch, "fisher_batch_size": args.batch}}

    def step(strategies) -> None:
        train_step(model, batch, strategies, optimizer, causal_lm_loss)

    # Each contender: its strategies, after `past` releases of 2 training steps each.
    contenders: dict[str, list] = {"naive": build_strategies("naive")}
    after_task_s: dict[str, list[float]] = {}
    for name in args.strategies:
        for past in sorted({1, args.releases}):
            strategies = build_strategies(name, {name: options[name]} if name in options else None)
            key = f"{name}@{past}"
            after_task_s[key] = []
            for _ in range(past):
                for s in strategies:
                    s.before_task(model, task_data)
                for _ in range(2):
                    step(strategies)
                sync(args.device)
                start = time.perf_counter()
                for s in strategies:
                    s.after_task(model, task_data)
                sync(args.device)
                after_task_s[key].append(time.perf_counter() - start)
            for s in strategies:
                s.before_task(model, task_data)  # the release being trained now
            contenders[key] = strategies

    names = list(contenders)
    for name in names:  # warm-up
        for _ in range(args.warmup):
            step(contenders[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):  # one step each in turn, the order rotating every round
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(args.device)
            start = time.perf_counter()
            step(contenders[name])
            sync(args.device)
            times[name].append(time.perf_counter() - start)
        if (r + 1) % 10 == 0:
            print(f"round {r + 1}/{args.rounds}", flush=True)

    base = statistics.median(times["naive"])
    base_p10 = statistics.quantiles(times["naive"], n=10, method="inclusive")[0]
    results = {}
    for name in names:
        med = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=10, method="inclusive")
        results[name] = {
            "median_ms": 1e3 * med, "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1],
            "vs_naive": med / base, "p10_vs_naive": q[0] / base_p10,
            "after_task_s": after_task_s.get(name),
            "step_ms": [round(1e3 * t, 3) for t in times[name]],
        }  # fmt: skip
    record = {
        "model": model_name,
        "config": {
            "lora_r": None if args.full else args.lora_r, "targets": "all (full fine-tuning)" if args.full else args.targets,
            "batch": args.batch, "seq": args.seq,
            "rounds": args.rounds, "warmup": args.warmup,
            "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
            "trainable_tensors": len(trainable), "trainable_params": sum(p.numel() for p in trainable),
            "ewc_options": options["ewc"],
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
        "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    tuned = (
        "full fine-tuning" if args.full else f"LoRA r={args.lora_r} on {', '.join(args.targets)}"
    )
    print(f"\n{model_name}; {tuned}; batch {args.batch} x {args.seq}")
    print(
        f"{'strategy':10s} {'median ms':>10s} {'vs naive':>9s} {'p10 vs':>7s} {'limit':>6s}  after_task s"
    )
    for name, r in results.items():
        limit = LIMITS.get(name.split("@")[0])
        at = f"{statistics.mean(r['after_task_s']):.3f}" if r["after_task_s"] else ""
        print(f"{name:10s} {r['median_ms']:10.2f} {r['vs_naive']:8.3f}x {r['p10_vs_naive']:6.3f}x "
              f"{f'{limit:.2f}x' if limit else '':>6s}  {at}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
