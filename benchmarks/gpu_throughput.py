"""Tokens per second, peak memory and model FLOPs utilisation (MFU) of the fine-tune step.

Prepared for a GPU machine; no GPU figures exist yet (benchmarks/README.md). One command:

    .venv/bin/python benchmarks/gpu_throughput.py            # SmolLM2 and the ~1B Llama, bf16
    .venv/bin/python benchmarks/gpu_throughput.py --smoke    # a tiny Llama on the CPU: a check
                                                             # that it runs, not a benchmark

Models: SmolLM2-135M-Instruct (``params.model.base``, the embedded model, converted offline) and
a ~1B Llama built from a ``LlamaConfig`` with random weights (hidden 2048, 16 layers, MLP 8192,
32 query and 8 key/value heads, SmolLM2's tokenizer and vocabulary of 49,152, tied embeddings:
1.07 B parameters), saved once under ``--work`` (safetensors, bf16, with SmolLM2's tokenizer) so
that ``load_model`` reads it like any champion. Random weights cost what trained ones do. Nothing
is downloaded. ``--smoke`` puts a 2-layer, hidden-64 Llama in its place.

The step is the pipeline's (``step_timing.step_trainer``): every knob from ``params.yaml`` (LoRA
r=16 on all seven projections, batch 8, max_length 192; ``--set train.batch_size=32`` overrides
one), bf16 mixed precision on a GPU that has it (fp32 master weights, as ``flows.steps.finetune``),
fp32 on the CPU. A release-2 setup, so that each strategy does its real work: the strategies
first carry the state of the demo release ``wiki-topics-1``, built by their own hooks
(``step_timing.carry_over``: EWC's Fisher of general knowledge and of release 1, its penalty on
every step; replay's buffer of release 1's 240 rows, ratio 1: one replayed row per new one),
then the step learns ``wiki-topics-2``. LwF distils from the champion (the adapter off): one
teacher forward per step. The strategies' options are those of ``params.yaml`` (defaults).

Per model and strategy, ``--warmup`` steps not counted, then ``--steps`` timed steps
(``step_timing.StepTimer``: ``on_step_begin`` to ``on_step_end``, ``torch.cuda.synchronize()`` at
both ends). Reported:

* tokens/s: the release's real tokens (no padding) of the timed steps over their wall seconds;
  label tokens/s likewise for the tokens the loss is on. Replayed rows are not counted as tokens:
  they are replay's cost of keeping the old release, as the teacher pass is LwF's; their tokens
  are reported apart (``replayed_tokens_per_s``);
* the median step time (and every step's);
* peak memory: on a GPU the largest ``torch.cuda.max_memory_allocated()`` of a timed step (reset
  at each step's start: weights, optimizer and strategies' state, and the step's activations);
  on the CPU the process's peak RSS (``resource.getrusage``; it cannot be reset, so it also
  covers every model and strategy the process ran before);
* MFU = model FLOPs of the timed steps / their wall seconds / the GPU's peak FLOP/s.

Model FLOPs of a step, on the batch's own examples (real lengths s_i, no padding):

    FLOPs = Σ_i [ (4·N + 6·N_lora) · s_i  +  6 · L · d · s_i² ]

N: the weights of every matrix multiply a token goes through, the decoder layers' linear layers
and the LM head (d_model × V; the input embedding is a lookup, norms are left out): forward 2·N
per token, backward 2·N (gradients of the inputs only: the base is frozen). N_lora: the LoRA
adapter's parameters, forward 2, input and weight gradients 4 per token. Attention (no weights):
QKᵀ and AV are 4·d·s² FLOPs per layer forward over all query-key pairs (d = query heads × head
dim), backward twice that: 12·L·d·s² in all; counted is the causal half, 6·L·d·s² (the pairs a
causal kernel needs). Not counted: the strategies' own passes (LwF's teacher forward, replay's
replayed rows, EWC's penalty with its B·A products per target matrix), padding and the
optimizer: they lower MFU, so a strategy's MFU next to naive's is the share of the GPU left to
learning the release.

Peak FLOP/s, dense bf16 (no sparsity), by GPU name: H100 / H200 SXM 989e12, H100 PCIe 756e12,
A100 312e12, L40S 362e12, L4 121e12; ``--peak-tflops`` for any other GPU. MFU is null on the
CPU, on a GPU without bf16, and on a GPU the table does not know.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
from pathlib import Path

import peft
import torch
import transformers
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_timing import step_trainer  # noqa: E402

import cf_strategies  # noqa: E402
from flows.core.config import load_params  # noqa: E402
from flows.demo.build import build_demo, demo_releases  # noqa: E402
from flows.registry.model_source import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2 = "smollm2-135m"
RANDOM_LLAMAS = {  # LlamaConfig fields; vocabulary and special tokens from the tokenizer
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-tiny": dict(  # --smoke
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
# --smoke: the strategies' one-off state on fewer examples (EWC: no importance of general
# knowledge, whose greedy answers take a minute on the CPU, and a Fisher of 16 examples); the
# step's cost does not depend on how many examples the state was measured on
SMOKE_OVERRIDES = {
    "train.general_importance_prompts": 0,
    "train.strategy_params.ewc": {"fisher_samples": 16},
}
PEAK_FLOPS = [  # (pattern in torch.cuda.get_device_name(), dense bf16 FLOP/s); the first match
    (r"H100.*PCIe", 756e12),
    (r"H100|H200", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
]


def peak_flops(override_tflops: float | None) -> float | None:
    """The GPU's peak dense bf16 FLOP/s: ``--peak-tflops``, else the table by name; None on
    the CPU, without bf16 support or for a GPU the table does not know."""
    if not torch.cuda.is_available():
        return None
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_bf16_supported():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def random_llama(name: str, tokenizer_dir: Path, work: Path) -> Path:
    """``RANDOM_LLAMAS[name]`` with random weights (seed 0) and the tokenizer of
    ``tokenizer_dir``, saved once into ``work/name`` (written as ``.partial`` and renamed);
    a folder built from the same spec is reused."""
    spec = {**RANDOM_LLAMAS[name], "tokenizer": str(tokenizer_dir)}
    folder = work / name
    marker = folder / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = transformers.LlamaConfig(
        **RANDOM_LLAMAS[name],
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init where it is fast
        model = transformers.LlamaForCausalLM(config)
    print(f"{name}: {model.num_parameters():,} parameters (random weights), saving to {folder}")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)  # load_model reads it back in fp32 to train
    tokenizer.save_pretrained(tmp)
    (tmp / "built.json").write_text(json.dumps(spec, indent=1))
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def flop_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(N, N_lora) of the FLOP count (module doc): every weight matrix of the peft model but
    the input embedding (the LM head counted, tied or not), and the LoRA factors."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    base = lora = 0
    for name, p in model.named_parameters():  # a tied head appears once, as the embedding
        if p.dim() < 2 or (p is embedding and p is not head):
            continue
        if "lora_" in name:
            lora += p.numel()
        else:
            base += p.numel()
    return base, lora


def step_flops(lengths: list[int], n: int, n_lora: int, layers: int, width: int) -> float:
    """Σ_i (4·N + 6·N_lora)·s_i + 6·L·d·s_i² over the examples of one batch (module doc)."""
    return sum((4 * n + 6 * n_lora) * s + 6 * layers * width * s * s for s in lengths)


def count_replayed(trainer) -> list[tuple[int, torch.Tensor]]:
    """Record, per micro-batch, the step and the real tokens of the rows the strategies add
    (``augment_batch``: replay's replayed rows), by wrapping the strategies' own method on
    these instances; the tensors are read after training (no host sync in the step)."""
    added: list[tuple[int, torch.Tensor]] = []
    for s in trainer.strategies:
        if type(s).augment_batch is cf_strategies.Strategy.augment_batch:
            continue

        def augment(model, batch, inner=s.augment_batch):
            out = inner(model, batch)
            rows = batch["input_ids"].shape[0]
            added.append((trainer.state.global_step, out["attention_mask"][rows:].sum()))
            return out

        s.augment_batch = augment
    return added


def carried(strategies) -> dict:
    """What the strategies carry from the previous release into the timed steps: replay's
    buffered rows; EWC's tasks consolidated and Fisher values."""
    out: dict[str, dict] = {}
    for s in strategies:
        if hasattr(s, "buffer"):
            out[s.name] = {"buffered_rows": len(s.buffer)}
        elif hasattr(s, "importance"):
            values = sum(v.numel() for v in s.importance.values())
            out[s.name] = {"tasks": s.tasks, "importance_values": values}
    return out


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(params, model_dir: Path, releases: list[Path], strategy: str, args, peak) -> dict:
    """Warm-up and timed steps of one model and strategy; the figures of the timed steps."""
    total = args.warmup + args.steps
    trainer, counting, timer = step_trainer(
        params,
        model_dir,
        releases[1],
        strategy,
        Path(args.work),
        total,
        params.train.padding_free,
        previous_release=releases[0],
    )
    replayed = count_replayed(trainer)
    state = carried(trainer.strategies)
    n, n_lora = flop_parameters(trainer.model)
    config = trainer.model.config
    layers = config.num_hidden_layers
    width = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    trainer.train()
    timed = range(args.warmup, len(timer.times))
    seconds = [timer.times[i][0] for i in timed]
    batches = [timer.batch_of[i] for i in timed]
    real = sum(counting.batches[b][0] for b in batches)
    labels = sum(counting.batches[b][1] for b in batches)
    flops = sum(step_flops(counting.lengths[b], n, n_lora, layers, width) for b in batches)
    extra = sum(int(t) for step, t in replayed if step >= args.warmup)
    wall = sum(seconds)
    figures = {
        "steps": len(seconds),
        "seconds": round(wall, 4),
        "tokens_per_s": round(real / wall, 1),
        "label_tokens_per_s": round(labels / wall, 1),
        "replayed_tokens_per_s": round(extra / wall, 1),
        "median_step_s": round(statistics.median(seconds), 4),
        "step_s": [round(s, 4) for s in seconds],
        "real_tokens": real,
        "label_tokens": labels,
        "replayed_tokens": extra,
        "computed_positions": sum(counting.batches[b][2] for b in batches),
        "model_tflops_per_s": round(flops / wall / 1e12, 4),
        "mfu": None if peak is None else round(flops / wall / peak, 4),
        "peak_memory_bytes": max(timer.peaks[i] for i in timed)
        if timer.peaks
        else peak_rss_bytes(),
        "carried": state,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "flop_parameters": n,
        "lora_parameters": n_lora,
        "layers": layers,
        "attention_width": width,
        "parameters": trainer.model.get_base_model().num_parameters() - n_lora,  # the base
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "dtype": "bf16 mixed precision (fp32 master weights)" if trainer.args.bf16 else "fp32",
    }
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return figures


def table(results: dict) -> str:
    """The figures as a markdown table."""
    memory = "peak GPU memory GiB" if results["cuda"] else "peak RSS GiB (process)"
    lines = [
        f"| model | strategy | tokens/s | label tokens/s | replayed tokens/s | median step s "
        f"| {memory} | model TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in results["models"].items():
        for strategy, f in entry["strategies"].items():
            mfu = "–" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
            lines.append(
                f"| {model} | {strategy} | {f['tokens_per_s']:,.0f} | "
                f"{f['label_tokens_per_s']:,.0f} | {f['replayed_tokens_per_s']:,.0f} | "
                f"{f['median_step_s']:.4f} | {f['peak_memory_bytes'] / 2**30:.2f} | "
                f"{f['model_tflops_per_s']:.3f} | {mfu} |"
            )
    return "\n".join(lines)


def overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs as params overrides, the values read as YAML."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value, e.g. train.batch_size=32")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny Llama, 1 + 2 steps: a check")
    ap.add_argument("--models", help=f"default {SMOLLM2},llama-1b (--smoke: llama-tiny)")
    ap.add_argument("--strategies", default="naive,ewc,lwf,replay")
    ap.add_argument("--warmup", type=int, help="steps not timed (default 3; --smoke: 1)")
    ap.add_argument("--steps", type=int, help="timed steps (default 20; --smoke: 2)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml override, e.g. train.batch_size=32")  # fmt: skip
    ap.add_argument("--tokenizer", help="the random Llamas' tokenizer (default SmolLM2's)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-gpu-throughput"))
    ap.add_argument("--out", help="JSON (default results/gpu_throughput.json; --smoke: _smoke)")
    args = ap.parse_args()
    smoke = args.smoke
    args.models = args.models or ("llama-tiny" if smoke else f"{SMOLLM2},llama-1b")
    args.warmup = (1 if smoke else 3) if args.warmup is None else args.warmup
    args.steps = (2 if smoke else 20) if args.steps is None else args.steps
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    out = Path(args.out or RESULTS / f"gpu_throughput{'_smoke' if smoke else ''}.json")
    work = Path(args.work)
    changes = {**(SMOKE_OVERRIDES if smoke else {}), **overrides(args.set)}
    params = load_params(ROOT / "params.yaml", {"workspace": str(work / "ws"), **changes})
    releases = demo_releases(build_demo(params.path(params.data.demo_dir)))[:2]
    models = args.models.split(",")
    unknown = [m for m in models if m != SMOLLM2 and m not in RANDOM_LLAMAS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: {SMOLLM2}, {', '.join(RANDOM_LLAMAS)}")
    smollm2 = None
    if SMOLLM2 in models or not args.tokenizer:
        smollm2 = Path(resolve_model(params.model.base, params.path(params.model.cache_dir)))
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else smollm2
    peak = peak_flops(args.peak_tflops)
    cfg = params.train
    results = {
        "device": device_name(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "smoke": smoke,
        "dtype": "bf16 mixed precision (fp32 master weights)"
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else "fp32",
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "lora_r": cfg.lora.r,
        "lora_targets": list(cfg.lora.target_modules),
        "padding_free": cfg.padding_free,
        "previous_release": releases[0].name,
        "release": releases[1].name,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "peak_flops": peak,
        "peak_memory": "torch.cuda.max_memory_allocated per step"
        if torch.cuda.is_available()
        else "process peak RSS (ru_maxrss), since the process began",
        "overrides": changes,
        "models": {},
    }
    for model in models:
        folder = smollm2 if model == SMOLLM2 else random_llama(model, tokenizer_dir, work)
        entry = results["models"][model] = {"path": str(folder), "strategies": {}}
        for strategy in args.strategies.split(","):
            figures = measure(params, folder, releases, strategy, args, peak)
            entry["parameters"] = figures.pop("parameters")
            for k in ("flop_parameters", "lora_parameters", "layers", "attention_width"):
                entry[k] = figures.pop(k)
            entry["strategies"][strategy] = figures
            print(
                f"{model} ({entry['parameters']:,} parameters) {strategy}:",
                json.dumps({k: v for k, v in figures.items() if k != "step_s"}),
                flush=True,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))  # after every strategy
    print(f"\n{results['device']}, {results['dtype']}, batch {cfg.batch_size}, max_length "
          f"{cfg.max_length}, LoRA r={cfg.lora.r}{' (smoke: not a benchmark)' if smoke else ''}")  # fmt: skip
    print(table(results))
    print("wrote", out)


if __name__ == "__main__":
    main()
