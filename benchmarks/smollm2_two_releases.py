"""Strategies over two releases of the embedded demo, each strategy on its own chain.

SmolLM2-135M-Instruct learns ``wiki-topics-1`` from the base model, then ``wiki-topics-2`` from
the model it made: what a pipeline that promoted every release would hold. Each stage is scored
as the gate scores it, paired item by item against the model it started from: general
knowledge and (at release 2) release 1's held-out items, through each task's own mask or
column for packnet and progressive (``flows.steps.evaluate.Scorer``). Probes are the benchmarks' fixed
stratified sample (``build_probe_set``), the same for every strategy at release 1; at release 2
the same general-knowledge items plus release 1's items, each strategy's own champion scored on
them. Results go to ``results/smollm2_two_releases.json`` (one row per strategy, rewritten as
each finishes), a plot to ``results/smollm2_two_releases.png``.

    python benchmarks/smollm2_two_releases.py --strategies naive,lwf,ilora
    python benchmarks/smollm2_two_releases.py --inference     # cost per answer, from the models

``--inference`` times a forward pass (8 prompts of 96 tokens, the median of 5 after a warm-up)
of the models the chains left behind: the base, merged models (naive, ilora: the slow learner
merged, one LoRA model's cost), packnet (served unmerged: the base plus a LoRA adapter) and
progressive with 0, 1 and 2 columns answering (``streams="own"``: one more pass per column).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from flows.core.config import load_params
from flows.core.records import ChampionRef, EvalReport, ProbeSet
from flows.demo.build import build_demo, demo_releases, general_knowledge_source
from flows.registry.model_source import resolve_model
from flows.registry.serving import BASE_TASK, load, load_for_serving
from flows.steps.evaluate import EvaluateStep, evaluate_candidate, score_model
from flows.steps.finetune import FinetuneStep, finetune
from flows.steps.probes import ProbesStep, build_probe_set

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "smollm2_two_releases.json"
OPTIONS = {  # 30 steps a release: packnet prunes at 24 and retrains the kept half for 6
    "packnet": {"packnet": {"prune_ratio": 0.5, "prune_at": 24}},
}


def probe_set_for(params, champion: ChampionRef, release: Path, folder: Path) -> ProbeSet:
    """The fixed probe sample for ``champion`` and its per-item results (the pairing baseline)."""
    path, tasks = build_probe_set(ProbesStep.from_params(params), champion, folder / "probes.jsonl")
    scores = score_model(
        EvaluateStep.from_params(params), champion.model_dir, path, release, folder / "baseline"
    )
    return ProbeSet(
        path=path,
        dvc_hash="-",
        n_items=len(path.read_text().splitlines()),
        tasks=tasks,
        baseline=scores.probe_scores,
        new_task_baseline=scores.new_task_score,
        champion=champion,
        champion_results=folder / "baseline",
    )


def stage(report: EvalReport, seconds: float) -> dict:
    """A stage's numbers: new task, retention per task with its interval, known/lost/gained."""
    return {
        "new_task": report.new_task_score,
        "new_task_baseline": report.new_task_baseline,
        "new_task_interval": report.new_task_interval,
        "retention": report.retention,
        "tasks": {t: s.model_dump(mode="json") for t, s in report.tasks.items()},
        "train_seconds": seconds,
    }


def chain(params, name: str, base: ChampionRef, releases: list[Path], work: Path) -> dict:
    run = params.with_overrides(
        {"train.strategy": name, "train.strategy_params": OPTIONS.get(name, {})}
    )
    row: dict = {"options": OPTIONS.get(name, {})}
    champion = base
    for i, release in enumerate(releases[:2], 1):
        folder = work / name / f"release{i}"
        # release 1: the base's probe set, the same for every strategy (its answers scored once,
        # then read from the score cache)
        probe_set = probe_set_for(
            params, champion, release, work / "base-probes" if i == 1 else folder
        )
        if i == 1:
            base_gk = probe_set.baseline["general-knowledge"]
        trained = finetune(FinetuneStep.from_params(run), champion, release, folder)
        report = evaluate_candidate(
            EvaluateStep.from_params(run), trained.model_dir, probe_set, release, folder
        )
        row[f"release{i}"] = stage(report, trained.train_seconds)
        row[f"release{i}"]["seconds_per_step"] = trained.train_seconds / trained.steps
        print(name, f"release {i}", json.dumps(row[f"release{i}"]["retention"]),
              f"new task {report.new_task_score:.3f}", flush=True)  # fmt: skip
        champion = ChampionRef(
            version=str(i), model_dir=trained.model_dir, releases=[r.name for r in releases[:i]]
        )
    # the same general-knowledge items at both releases (the same seeded sample)
    row["general_knowledge_vs_base"] = report.scores["general-knowledge"] / base_gk
    return row


def save_row(key: str, row: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}  # other runs may have added
    results[key] = row
    OUT.write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="naive,lwf,ilora,ilora+label_smoothing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-two-releases"))
    ap.add_argument("--inference", action="store_true", help="time answers of the chains' models")
    args = ap.parse_args()
    work = Path(args.work)
    params = load_params(
        ROOT / "params.yaml", {"workspace": str(work / "ws"), "train.max_steps": args.steps}
    )
    # the strategy tables were measured on the general-knowledge source alone: keep it so
    params = params.with_overrides(
        {"probes.sources": [str(general_knowledge_source(params.path(params.data.demo_dir)))]}
    )
    releases = demo_releases(build_demo(params.path(params.data.demo_dir)))
    for release in releases[:2]:  # the probes read learned releases from the workspace
        shutil.copytree(
            release, params.workspace_dir / "releases" / release.name, dirs_exist_ok=True
        )
    base = ChampionRef(
        version=None,
        model_dir=Path(resolve_model(params.model.base, params.path(params.model.cache_dir))),
    )
    if args.inference:
        save_row("inference", inference_cost(base.model_dir, work))
        return
    for name in args.strategies.split(","):
        start = time.perf_counter()
        row = chain(params, name, base, releases, work)
        row["wall_seconds"] = time.perf_counter() - start
        save_row(name, row)
    plot(json.loads(OUT.read_text()), OUT.with_suffix(".png"))


@torch.no_grad()
def forward_seconds(model, batch: dict, repeats: int = 5) -> float:
    """Median wall time of one forward pass over ``batch`` (after one warm-up pass)."""
    model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_cost(base_dir: Path, work: Path) -> dict:
    """Seconds per forward pass of the chains' release-2 models, and relative to the base."""
    model, tokenizer = load(base_dir)
    ids = torch.randint(100, 20000, (8, 96), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {"base": forward_seconds(model, batch)}
    for name in ("naive", "ilora", "packnet"):
        folder = work / name / "release2" / "candidate_model"
        if folder.is_dir():
            m, _, _ = load_for_serving(folder)
            rows[name] = forward_seconds(m, batch)
    folder = work / "progressive" / "release2" / "candidate_model"
    if folder.is_dir():
        m, _, router = load_for_serving(folder)
        for label, task in (("0 columns (base)", BASE_TASK), ("1 column", router.tasks[0])):
            with router.answering(task):
                rows[f"progressive, {label}"] = forward_seconds(m, batch)
        rows["progressive, 2 columns"] = forward_seconds(m, batch)
    rows = {k: {"seconds": v, "vs_base": v / rows["base"]} for k, v in rows.items()}
    for k, v in rows.items():
        print(f"{k:32s} {v['seconds'] * 1000:8.1f} ms  {v['vs_base']:.2f}× base")
    return {"batch": "8 × 96 tokens, fp32, CPU", "threads": torch.get_num_threads(), **rows}


def plot(results: dict, path: Path) -> None:
    """Per strategy, after both releases: general knowledge against the base, release 1 kept
    through release 2, and what each release taught."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["naive", "lwf", "ilora", "ilora+label_smoothing", "packnet", "progressive"]
    names = [n for n in results if n != "inference" and "release2" in results[n]]
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    series = {
        "general knowledge after both releases / base": [
            results[n]["general_knowledge_vs_base"] for n in names
        ],
        "wiki-topics-1 kept through release 2": [
            results[n]["release2"]["retention"].get("wiki-topics-1", 0) for n in names
        ],
        "wiki-topics-1 learned (release 1 score)": [
            results[n]["release1"]["new_task"] for n in names
        ],
        "wiki-topics-2 learned (release 2 score)": [
            results[n]["release2"]["new_task"] for n in names
        ],
    }
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, values, width, label=label)
    ax.axhline(0.9, color="red", ls="--", lw=1, label="gate: retention ≥ 0.90")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1.25)
    ax.set_title("SmolLM2-135M over two releases, each strategy on its own chain")
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
