"""Per-step cost of the replay and distillation strategies against naive, side by side in one run.

A causal LM built from a config (random weights, nothing downloaded) with LoRA adapters on every
linear layer of the blocks (as the pipeline's ``params.yaml``), AdamW on the adapters, batches of
prompt + answer tokens (labels -100 on the prompt). Every strategy runs the same training step
(``train_step``: the step of ``train_task``); the strategies take turns
one step at a time, on the same batches, so that load on the machine hits them alike. Reported:
the median and the fastest step time of each, with their ratios to naive's (on a shared machine
the fastest step is the least disturbed estimate). Replay and DER++ are also reported per replayed example:
(step time − naive step time) / replayed sequences per step, next to naive's time per new
sequence. One-off costs are timed separately: DER's insertion pass (one forward per stored
example, top-k logits kept) and self-rehearsal's greedy generation (per answered prompt).

    python benchmarks/replay_overhead.py                    # small preset, ~2 minutes on 1 core
    python benchmarks/replay_overhead.py --preset smollm2-135m --batch 4 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from split_digits import environment, save  # noqa: E402

from cf_strategies import build_strategies  # noqa: E402
from cf_strategies.trainer import causal_lm_loss, train_step  # noqa: E402

PRESETS = {
    # a few-million-parameter LM: seconds per strategy on one CPU core
    "small": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    # SmolLM2-135M's architecture (random weights): the demo's model
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_lm(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        **PRESETS[preset],
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def batch(n: int, prompt: int, answer: int, vocab: int, g: torch.Generator) -> dict:
    """``n`` sequences of prompt+answer tokens, lengths varied by ±25%, right-padded."""
    lengths = [
        (
            int(prompt * (0.75 + 0.5 * torch.rand(1, generator=g))),
            int(answer * (0.75 + 0.5 * torch.rand(1, generator=g))),
        )
        for _ in range(n)
    ]
    width = max(p + a for p, a in lengths)
    out = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.zeros(n, width, dtype=torch.long),
        "labels": torch.full((n, width), -100),
    }
    for i, (p, a) in enumerate(lengths):
        ids = torch.randint(3, vocab, (p + a,), generator=g)
        out["input_ids"][i, : p + a] = ids
        out["attention_mask"][i, : p + a] = 1
        out["labels"][i, p : p + a] = ids[p:]
    return out


def step(model, optimizer, strategies, b) -> int:
    """One training step as ``train_task`` runs it; returns the rows trained on."""
    _, trained = train_step(model, b, strategies, optimizer, causal_lm_loss)
    return len(trained["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per strategy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = lora_lm(args.preset)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    old = [batch(args.batch, args.prompt, args.answer, vocab, g) for _ in range(4)]
    new = [batch(args.batch, args.prompt, args.answer, vocab, g) for _ in range(4)]
    buffer = {"buffer_size": 32, "ratio": 0.5}
    runs: dict[str, list] = {
        "naive": build_strategies("naive"),
        "label_smoothing": build_strategies("label_smoothing"),
        "lwf (LoRA teacher)": build_strategies("lwf"),
        "replay (ratio 0.5)": build_strategies("replay", {"replay": buffer}),
        "DER++ (ratio 0.5, top-32)": build_strategies("der", {"der": {**buffer, "top_k": 32}}),
        "lwf+replay": build_strategies("lwf+replay", {"replay": buffer}),
    }

    one_off: dict[str, Any] = {}
    for strategies in runs.values():  # fill the buffers: the task before this one
        for s in strategies:
            start = time.perf_counter()
            s.after_task(model, old)
            if s.name == "der":
                one_off["der_insertion_s_per_example"] = (time.perf_counter() - start) / (
                    4 * args.batch
                )
                ex = s.buffer.examples[0]
                stored = ("_der_logits", "_der_index", "_der_rest")  # values, ids, rest mass
                one_off["der_logit_bytes_per_supervised_token"] = sum(
                    ex[k].nbytes for k in stored if k in ex
                ) / len(ex["_der_logits"])
            s.before_task(model, new)
    ssr = build_strategies(
        "self_rehearsal", {"self_rehearsal": {"max_new_tokens": args.answer, "eos_token_id": 1}}
    )[0]
    prompts = [
        b["input_ids"][i, : args.prompt].tolist() for b in old[:1] for i in range(args.batch)
    ]
    ssr.add_prompts(prompts)
    start = time.perf_counter()
    ssr.before_task(model)
    one_off["self_rehearsal_generation_s_per_prompt"] = (time.perf_counter() - start) / len(prompts)

    times: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, int] = {}
    for strategies in runs.values():  # warm-up
        step(model, optimizer, strategies, new[0])
    for i in range(args.steps):
        for name, strategies in runs.items():
            start = time.perf_counter()
            rows[name] = step(model, optimizer, strategies, new[i % len(new)])
            times[name].append(time.perf_counter() - start)
        print(f"step {i + 1}/{args.steps} done", flush=True)

    naive, naive_min = statistics.median(times["naive"]), min(times["naive"])
    per_new = naive_min / args.batch
    results = []
    for name, ts in times.items():
        replayed = rows[name] - args.batch
        if name.startswith("DER"):  # DER++ draws two samples and runs them in its own forward
            replayed = 2 * round(buffer["ratio"] * args.batch)
        plain_replay = name.startswith(("replay", "DER"))  # lwf+replay mixes two costs
        extra = (min(ts) - naive_min) / replayed if replayed and plain_replay else None
        results.append(
            {
                "strategy": name,
                "median_step_s": statistics.median(ts),
                "fastest_step_s": min(ts),
                "median_ratio_to_naive": statistics.median(ts) / naive,
                "fastest_ratio_to_naive": min(ts) / naive_min,
                "replayed_per_step": replayed,
                "extra_s_per_replayed_example": extra,
                "step_s": ts,
            }
        )
    table = [
        "| strategy | median step (× naive) | fastest step (× naive) | replayed / step "
        "| extra per replayed example (fastest steps) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        extra = r["extra_s_per_replayed_example"]
        per_example = (
            "—" if extra is None else f"{1000 * extra:.1f} ms ({extra / per_new:.2f}× a new one)"
        )
        table.append(
            f"| {r['strategy']} | {1000 * r['median_step_s']:.0f} ms "
            f"({r['median_ratio_to_naive']:.2f}×) | {1000 * r['fastest_step_s']:.0f} ms "
            f"({r['fastest_ratio_to_naive']:.2f}×) | {r['replayed_per_step']} | {per_example} |"
        )
    table = "\n".join(table)
    print(table)
    print({k: round(v, 4) for k, v in one_off.items()})
    payload = {
        "setup": {**vars(args), **PRESETS[args.preset], "lora_r": 16, "lora_targets": TARGETS},
        "environment": environment(),
        "naive_s_per_new_example": per_new,
        "results": results,
        "one_off": one_off,
        "table": table,
    }
    print(f"wrote {save(f'replay_overhead_{args.preset}', payload)}")


if __name__ == "__main__":
    main()
