"""Permuted-digits: the regularisation family of cf_strategies against naive fine-tuning.

Protocol (as in benchmarks/README.md): scikit-learn's bundled ``load_digits()`` (1,797 8×8 images,
pixels scaled to [0, 1]); a stratified 70/30 train/test split; 10 experiences, each a fixed random
permutation of the 64 pixels (the first the identity), all 10 classes each time, one shared head;
an MLP 64-256-256-10 (ReLU), Adam at 1e-3 (a fresh optimizer per experience), batch 32, 5 epochs
per experience; 3 seeds (the seed sets the split, the permutations, the initial weights and the
batch order). Strengths are chosen on a validation split: 20% of the training data (stratified),
training on the other 80%; the test split is used only for the final runs, with the chosen
strengths, trained on the whole training split. Training time is the wall time of ``train_task``
over the 10 experiences (Fisher and importances included, evaluation excluded), the shortest of 3
identical runs, the strategies interleaved seed by seed so that machine load falls on all alike.

    .venv/bin/python benchmarks/permuted_digits.py            # selection + final runs, ~16 min on 1 core
    .venv/bin/python benchmarks/permuted_digits.py --quick    # a smoke run: 1 seed, 2 experiences
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cf_strategies import build_strategies, train_task  # noqa: E402
from cf_strategies.metrics import average_accuracy, backward_transfer, forgetting  # noqa: E402

# Strengths tried on the validation split (selection by mean final average accuracy over seeds).
GRID: dict[str, tuple[str, list[float]]] = {
    "naive": ("", [0.0]),
    "l2": ("lambda_", [0.03, 0.1, 0.3, 1.0]),
    "ewc": ("lambda_", [10.0, 30.0, 100.0, 300.0, 1e3]),
    "si": ("c", [0.03, 0.1, 0.3, 1.0, 3.0]),
    "hlr": ("lambda_", [0.03, 0.1, 0.3, 1.0, 3.0]),
}
# Fixed options (not tuned): the Fisher from every training example, 256 per vmapped chunk.
FIXED = {"ewc": {"fisher_samples": 2048, "fisher_batch_size": 256}}


class Shuffled:
    """Mini-batches of ``(x, y)`` in a new random order at every pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.g)
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            yield self.x[idx], self.y[idx]


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cross_entropy(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits, batch[1]), logits


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def experiences(seed: int, validation: bool, n_exp: int):
    """(train, eval) tensors of each experience: eval is the test split, or the validation split."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed
    )
    if validation:
        idx_train, idx_test = train_test_split(
            idx_train, test_size=0.2, stratify=y[idx_train], random_state=seed
        )
    g = torch.Generator().manual_seed(10_000 + seed)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n_exp - 1)]
    xtr, ytr, xte, yte = x[idx_train], y[idx_train], x[idx_test], y[idx_test]
    return [((xtr[:, p], ytr), (xte[:, p], yte)) for p in perms]


def run(name: str, options: dict, seed: int, validation: bool, n_exp: int, epochs: int) -> dict:
    """Train one strategy through the experiences; the accuracy matrix, ACC, BWT and time."""
    exps = experiences(seed, validation, n_exp)
    torch.manual_seed(seed)
    model = mlp()
    strategies = build_strategies(name, {name: options} if options else None)
    R = np.zeros((n_exp, n_exp))
    train_time = 0.0
    for i, ((xtr, ytr), _) in enumerate(exps):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = Shuffled(xtr, ytr, batch=32, seed=seed * 100 + i)
        start = time.perf_counter()
        train_task(model, data, strategies, optimizer, cross_entropy, epochs=epochs)
        train_time += time.perf_counter() - start
        for j, (_, (xte, yte)) in enumerate(exps):
            R[i, j] = accuracy(model, xte, yte)
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "train_time_s": train_time,
        "R": R.round(4).tolist(),
    }


def options_for(name: str, strength: float) -> dict:
    key, _ = GRID[name]
    return {**FIXED.get(name, {}), **({key: strength} if key else {})}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiences", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)"
    )
    parser.add_argument("--strategies", nargs="+", default=list(GRID))
    parser.add_argument("--time-repeats", type=int, default=3, help="final runs repeated, min time")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 experiences, 1 epoch")
    parser.add_argument(
        "--strengths-from", type=Path, default=None,
        help="skip the validation step: take the chosen strengths from this results file "
        "(a timing re-run on an idle machine)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "permuted_digits.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.experiences, args.epochs, args.time_repeats = [0], 2, 1, 1
        args.out = args.out.with_name("permuted_digits_quick.json")
    torch.set_num_threads(args.threads)
    common = dict(n_exp=args.experiences, epochs=args.epochs)

    # 1. strengths on the validation split
    selection: dict[str, dict] = {}
    if args.strengths_from:
        selection = json.loads(args.strengths_from.read_text())["selection"]
    for name in [] if args.strengths_from else args.strategies:
        key, grid = GRID[name]
        scores = {}
        for strength in grid:
            accs = [
                run(name, options_for(name, strength), s, True, **common)["acc"] for s in args.seeds
            ]
            scores[strength] = statistics.mean(accs)
            print(
                f"validation {name:5s} {key or '-'}={strength:<8g} acc={scores[strength]:.4f}",
                flush=True,
            )
        best = max(scores, key=scores.get)
        selection[name] = {"option": key, "grid": scores, "chosen": best}

    # 2. final runs on the test split: each run repeated (deterministic, same accuracies), the
    # repeats interleaved across strategies in a rotating order; the shortest time is kept.
    final: dict[str, list[dict]] = {name: [] for name in args.strategies}
    for seed in args.seeds:
        repeats: dict[str, list[dict]] = {name: [] for name in args.strategies}
        for r in range(args.time_repeats):
            k = r % len(args.strategies)
            for name in args.strategies[k:] + args.strategies[:k]:
                options = options_for(name, selection[name]["chosen"])
                repeats[name].append(run(name, options, seed, False, **common))
        for name, results in repeats.items():
            if any(x["R"] != results[0]["R"] for x in results):
                raise RuntimeError(f"{name} seed {seed}: repeated runs differ")
            times = [x["train_time_s"] for x in results]
            result = {**results[0], "train_time_s": min(times), "train_times_s": times}
            final[name].append({"seed": seed, **result})
            print(f"test seed={seed} {name:5s} acc={result['acc']:.4f} bwt={result['bwt']:+.4f} "
                  f"time={result['train_time_s']:.2f}s", flush=True)  # fmt: skip

    summary = {}
    for name, runs in final.items():
        acc, bwt = mean_std([r["acc"] for r in runs]), mean_std([r["bwt"] for r in runs])
        t = mean_std([r["train_time_s"] for r in runs])
        rel = None
        if "naive" in final:
            rel = statistics.mean(
                r["train_time_s"] / n["train_time_s"]
                for r, n in zip(runs, final["naive"], strict=True)
            )
        summary[name] = {
            "option": selection[name]["option"],
            "chosen": selection[name]["chosen"],
            "acc_mean": acc[0], "acc_std": acc[1], "bwt_mean": bwt[0], "bwt_std": bwt[1],
            "train_time_s_mean": t[0], "train_time_s_std": t[1], "time_vs_naive": rel,
        }  # fmt: skip
    record = {
        "protocol": {
            "dataset": "sklearn load_digits, pixels / 16", "split": "stratified 70/30 (validation: 20% of train)",
            "experiences": args.experiences, "epochs": args.epochs, "batch_size": 32,
            "model": "MLP 64-256-256-10 ReLU, one shared head", "optimizer": "Adam lr=1e-3, new per experience",
            "seeds": args.seeds, "fixed_options": FIXED, "torch_threads": args.threads,
            "time": f"training wall time (evaluation excluded), shortest of {args.time_repeats} identical runs",
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
        "selection": selection,
        "summary": summary,
        "runs": final,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\n{'strategy':9s} {'strength':>14s} {'ACC %':>13s} {'BWT %':>14s} {'time':>7s}")
    for name, s in summary.items():
        strength = f"{s['option']}={s['chosen']:g}" if s["option"] else "-"
        rel = f"{s['time_vs_naive']:.2f}x" if s["time_vs_naive"] else ""
        print(f"{name:9s} {strength:>14s} {100 * s['acc_mean']:6.1f} ± {100 * s['acc_std']:3.1f} "
              f"{100 * s['bwt_mean']:+7.1f} ± {100 * s['bwt_std']:3.1f} {rel:>7s}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
