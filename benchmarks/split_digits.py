"""Split-digits: class- and task-incremental replay, distillation and (task-incremental only)
parameter isolation on scikit-learn's digits.

Protocol: ``load_digits()`` (1797 8x8 images, 10 classes), stratified 70/30 train/test split,
5 experiences of 2 classes (class order shuffled by the seed), MLP 64-256-256 with one 10-way
head (class-incremental) or one 2-way head per experience (task-incremental: the experience id
is given at training and test time), Adam lr 1e-3 (a fresh optimizer per experience), batch 32
new examples (+ replayed ones), 10 epochs per experience, seeds 0, 1, 2.

Hyper-parameters: a small grid per method, chosen on a stratified 20% validation split carved
from the training data (mean final accuracy of the three seeds), never on test; the chosen
setting is then trained on the whole training split and tested once per seed.

Reported: final average accuracy over all experiences' test sets, backward transfer
BWT = mean_{i<T} (R[T, i] − R[i, i]) (R[j, i]: accuracy on experience i after training on j),
and training time per run. Parameter-isolation methods (PackNet, progressive columns; task-
incremental only) answer each learnt experience with its own parameters (``using_task``). The
same machinery runs Permuted-digits (``replay_permuted_digits.py``).

    python benchmarks/split_digits.py                       # both scenarios, ~6 min on 1 core
    python benchmarks/split_digits.py --scenario class --quick
    python benchmarks/split_digits.py --methods "replay (buffer 100)"   # rerun one row, merged
    python benchmarks/split_digits.py --scenario task --methods "PackNet,PNN (progressive)"
    python benchmarks/split_digits.py --dropout 0.5        # a variant: separate results file
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cf_strategies  # noqa: E402
from cf_strategies import build_strategies, strategy_options, train_task  # noqa: E402
from cf_strategies import packnet as _packnet  # noqa: E402, F401  (registers "packnet")
from cf_strategies.base import using_task  # noqa: E402
from cf_strategies.progressive import Progressive  # noqa: E402  (registers "progressive")

RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1, 2)
Split = dict[str, torch.Tensor]  # "x", "labels" and, task-incremental, "task"


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Experience:
    train: Split
    test: Split


def digits(seed: int, validation: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 70/30 train/test split of the digits (pixels scaled to [0, 1]); with
    ``validation`` the "test" part is a stratified 20% of the training split instead."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    if validation:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x_tr, y_tr, test_size=0.2, stratify=y_tr, random_state=seed
        )
    return x_tr, y_tr, x_te, y_te


def _split(x: np.ndarray, labels: np.ndarray, task: int | None = None) -> Split:
    out = {"x": torch.from_numpy(x), "labels": torch.from_numpy(labels).long()}
    if task is not None:
        out["task"] = torch.full((len(x),), task)
    return out


def split_digits(seed: int, validation: bool, task_incremental: bool) -> list[Experience]:
    """5 experiences of 2 classes; task-incremental labels are 0/1 within the experience."""
    x_tr, y_tr, x_te, y_te = digits(seed, validation)
    order = np.random.default_rng(seed).permutation(10)
    experiences = []
    for t in range(5):
        classes = order[2 * t : 2 * t + 2]
        parts = []
        for x, y in ((x_tr, y_tr), (x_te, y_te)):
            keep = np.isin(y, classes)
            labels = (y[keep] == classes[1]).astype(np.int64) if task_incremental else y[keep]
            parts.append(_split(x[keep], labels, t if task_incremental else None))
        experiences.append(Experience(*parts))
    return experiences


# ---- model, loader, loss ------------------------------------------------------------------------
class MLP(nn.Module):
    """64-256-256 ReLU trunk; ``heads`` heads of ``classes // heads`` logits each. With ``task``
    the logits of that task's head only. ``dropout`` after each hidden layer (0: none, the
    protocol; 0.5 is the default of Avalanche's ``SimpleMLP``)."""

    def __init__(self, classes: int = 10, heads: int = 1, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, classes)
        self.per_head = classes // heads

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.trunk(x))
        if task is None:
            return logits
        columns = task[:, None] * self.per_head + torch.arange(self.per_head, device=x.device)
        return logits.gather(1, columns)


class Loader:
    """Shuffled minibatches of one experience, in a new order on every pass."""

    def __init__(self, data: Split, batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator

    def __iter__(self) -> Iterator[Split]:
        n = len(self.data["labels"])
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {k: v[idx] for k, v in self.data.items()}


def ce_loss(model: nn.Module, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["x"], batch.get("task"))
    return F.cross_entropy(logits, batch["labels"]), logits


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    logits = model(data["x"], data.get("task"))
    model.train()
    return float((logits.argmax(1) == data["labels"]).float().mean())


# ---- one run, selection, testing ----------------------------------------------------------------
@dataclass
class Method:
    label: str
    spec: str
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # "strategy.option" -> values

    def settings(self) -> list[dict[str, dict[str, Any]]]:
        """Every point of the grid, as build_strategies params."""
        out = []
        for values in itertools.product(*self.grid.values()):
            params = {name: dict(opts) for name, opts in self.fixed.items()}
            for key, value in zip(self.grid, values, strict=True):
                name, option = key.split(".")
                params.setdefault(name, {})[option] = value
            out.append(params)
        return out


def run_stream(
    experiences: list[Experience],
    method: Method,
    params: dict[str, dict[str, Any]],
    seed: int,
    epochs: int,
    model_factory: Callable[[], nn.Module],
) -> dict[str, Any]:
    """Train on the experiences in order; R[j][i] = accuracy on i after training on j."""
    torch.manual_seed(seed)
    model = model_factory()
    params = {name: dict(opts) for name, opts in params.items()}
    for name in cf_strategies.split_spec(method.spec):
        if "seed" in strategy_options(name):
            params.setdefault(name, {}).setdefault("seed", seed)
    if "post_prune_epochs" in params.get("packnet", {}):  # PackNet prunes, then retrains
        dense = epochs - params["packnet"].pop("post_prune_epochs")
        if dense > 0:  # (else it prunes at the end of the experience: --quick)
            steps = min(math.ceil(len(e.train["labels"]) / 32) for e in experiences)
            params["packnet"]["prune_at"] = dense * steps
    strategies = build_strategies(method.spec, params)
    isolating = [s for s in strategies if s.isolates_tasks]
    generator = torch.Generator().manual_seed(seed)
    matrix, seconds = [], 0.0
    for j, exp in enumerate(experiences):
        for s in strategies:
            if isinstance(s, Progressive):  # the new column, before the optimizer is built
                s.add_column(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        train_task(model, Loader(exp.train, 32, generator), strategies, optimizer, ce_loss, epochs)
        seconds += time.perf_counter() - start
        row = []
        for i, e in enumerate(experiences):  # a learnt experience answered with its parameters
            with using_task(isolating if i <= j else [], model, i):
                row.append(accuracy(model, e.test))
        matrix.append(row)
    final = matrix[-1]
    bwt = statistics.mean(final[i] - matrix[i][i] for i in range(len(experiences) - 1))
    return {"final_acc": statistics.mean(final), "bwt": bwt, "train_s": seconds, "matrix": matrix}


def evaluate_method(
    method: Method,
    make_experiences: Callable[[int, bool], list[Experience]],
    model_factory: Callable[[], nn.Module],
    epochs: int,
    seeds: tuple[int, ...] = SEEDS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Grid search on validation (mean over seeds), then the chosen setting on test."""
    validation = []
    settings = method.settings()
    if len(settings) > 1:
        for params in settings:
            runs = [
                run_stream(make_experiences(s, True), method, params, s, epochs, model_factory)
                for s in seeds
            ]
            score = statistics.mean(r["final_acc"] for r in runs)
            validation.append({"params": params, "val_final_acc": score})
            log(f"  {method.label} val {params}: {score:.4f}")
        chosen = max(validation, key=lambda v: v["val_final_acc"])["params"]
    else:
        chosen = settings[0]
    runs = [
        run_stream(make_experiences(s, False), method, chosen, s, epochs, model_factory)
        for s in seeds
    ]
    summary = {
        "method": method.label,
        "spec": method.spec,
        "chosen": chosen,
        "validation": validation,
        "runs": runs,
    }
    for metric in ("final_acc", "bwt", "train_s"):
        values = [r[metric] for r in runs]
        summary[metric] = {"mean": statistics.mean(values), "std": statistics.stdev(values)}
    log(
        f"{method.label}: final acc {summary['final_acc']['mean']:.4f} "
        f"± {summary['final_acc']['std']:.4f}, BWT {summary['bwt']['mean']:+.4f}, "
        f"{summary['train_s']['mean']:.1f} s/run, chosen {chosen}"
    )
    return summary


def markdown(results: list[dict[str, Any]], reference: dict[str, float]) -> str:
    rows = [
        "| method | final avg. accuracy | BWT | train time / run | chosen | Avalanche 0.6.0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        acc, bwt = r["final_acc"], r["bwt"]
        chosen = ", ".join(
            f"{k}={v}" for opts in r["chosen"].values() for k, v in opts.items() if k != "seed"
        )
        ref = reference.get(r["method"])
        rows.append(
            f"| {r['method']} | {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}% "
            f"| {100 * bwt['mean']:+.1f} ± {100 * bwt['std']:.1f} "
            f"| {r['train_s']['mean']:.1f} s | {chosen or '—'} "
            f"| {'—' if ref is None else f'{ref:.1f}%'} |"
        )
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def write_results(
    name: str,
    protocol: str,
    results: list[dict[str, Any]],
    reference: dict[str, float],
    order: list[str],
    merge: bool,
) -> tuple[Path, str]:
    """Save the results and their table; with ``merge`` (a rerun of some methods) the other
    methods' results already in the file are kept."""
    path = RESULTS / f"{name}.json"
    if merge and path.exists():
        by_label = {r["method"]: r for r in json.loads(path.read_text())["results"]}
        by_label.update({r["method"]: r for r in results})
        results = [by_label[label] for label in order if label in by_label]
    table = markdown(results, reference)
    payload = {
        "protocol": protocol,
        "environment": environment(),
        "reference_avalanche_0.6.0": reference,
        "results": results,
        "table": table,
    }
    return save(name, payload), table


# ---- Split-digits -------------------------------------------------------------------------------
BUFFER = {"buffer_size": 100}
ALPHAS, BETAS = [0.03, 0.1, 0.3, 1.0, 3.0], [0.5, 1.0, 2.0]  # DER++
DER_ALPHAS = [0.3, 1.0, 3.0, 10.0]  # DER (beta = 0): the logit term is all it has
REPLAY_GRID = {  # replayed examples per new one; one reservoir, or one per task
    "replay.ratio": [0.5, 1, 2, 4],
    "replay.per_task_quota": [False, True],
}
LWF_GRID = {"lwf.alpha": [0.1, 0.25, 0.5, 1.0, 2.0], "lwf.temperature": [1.0, 2.0]}
# PackNet: the share of the free weights each experience releases, and the epochs (of 10) that
# retrain the kept weights after pruning (post_prune_epochs, translated into prune_at)
PACKNET_GRID = {"packnet.prune_ratio": [0.5, 0.65, 0.8, 0.9], "packnet.post_prune_epochs": [1, 2]}
PNN_GRID = {
    "progressive.rank": [8, 32],
    "progressive.alpha": [16, 64, 256, 1024],
}  # columns on every Linear


def split_methods(task_incremental: bool) -> list[Method]:
    lwf = {"skip_first_task": True}
    lwf.update({"multi_head": True} if task_incremental else {"classes": "seen"})
    return [
        Method("naive", "naive"),
        Method("LwF", "lwf", {"lwf": lwf}, LWF_GRID),
        Method("replay (buffer 100)", "replay", {"replay": BUFFER}, REPLAY_GRID),
        Method(
            "DER (buffer 100)", "der", {"der": {**BUFFER, "beta": 0.0}}, {"der.alpha": DER_ALPHAS}
        ),
        Method(
            "DER++ (buffer 100)",
            "der",
            {"der": BUFFER},
            {"der.alpha": ALPHAS, "der.beta": BETAS},
        ),
    ] + (isolation_methods() if task_incremental else [])


def isolation_methods() -> list[Method]:
    """Parameter isolation needs the experience id at test time: task-incremental only."""
    return [
        Method("PackNet", "packnet", grid=PACKNET_GRID),
        Method("PNN (progressive)", "progressive", {"progressive": {"streams": "own"}}, PNN_GRID),
    ]


SPLIT_REFERENCE = {
    "class": {"naive": 19.4, "replay (buffer 100)": 88.5, "DER (buffer 100)": 91.2},
    "task": {"naive": 98.5, "LwF": 99.5, "PackNet": 96.8, "PNN (progressive)": 99.9},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["class", "task", "both"], default="both")
    parser.add_argument(
        "--quick", action="store_true", help="2 seeds, 1 epoch, no grid: a smoke run"
    )
    parser.add_argument("--methods", default="", help="comma-separated labels to (re)run")
    parser.add_argument("--dropout", type=float, default=0.0, help="MLP dropout (protocol: 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs = ((0, 1), 1) if args.quick else (SEEDS, 10)
    scenarios = ["class", "task"] if args.scenario == "both" else [args.scenario]
    for scenario in scenarios:
        task_il = scenario == "task"
        methods = split_methods(task_il)
        order = [m.label for m in methods]
        if args.methods:
            methods = [m for m in methods if m.label in args.methods.split(",")]
        if args.quick:  # the grid's first point only
            methods = [Method(m.label, m.spec, m.settings()[0]) for m in methods]
        print(f"== Split-digits, {scenario}-incremental, dropout {args.dropout} ==")

        def experiences(seed: int, validation: bool, task_il: bool = task_il) -> list[Experience]:
            return split_digits(seed, validation, task_il)

        def factory(task_il: bool = task_il) -> nn.Module:
            return MLP(classes=10, heads=5 if task_il else 1, dropout=args.dropout)

        results = [evaluate_method(m, experiences, factory, epochs, seeds) for m in methods]
        print(markdown(results, SPLIT_REFERENCE[scenario]))
        if args.quick:
            continue
        suffix = f"_dropout{args.dropout}" if args.dropout else ""
        protocol = (
            f"Split-digits {scenario}-incremental: 5x2 classes, stratified 70/30, MLP 64-256-256 "
            f"(dropout {args.dropout}), Adam 1e-3, batch 32, 10 epochs/experience, seeds 0-2; "
            "grid chosen on a 20% validation split of the training data"
        )
        path, table = write_results(
            f"split_digits_{scenario}_il{suffix}",
            protocol,
            results,
            SPLIT_REFERENCE[scenario],
            order,
            merge=bool(args.methods),
        )
        print(table)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
