"""Strategies on the embedded demo: SmolLM2-135M-Instruct learns release ``wiki-topics-1``.

For each strategy, the same probe set and baseline (the champion's scores, computed once), the
same 30 LoRA steps, then the candidate's new-task score and per-probe retention. Writes
``results/smollm2_demo.json`` and a trade-off plot ``results/smollm2_demo.png``.

    python benchmarks/smollm2_demo.py --strategies naive,self_rehearsal,lwf,l2
    python benchmarks/smollm2_demo.py --strategies lwf --options '{"lwf": {"alpha": 0.3}}' --label alpha0.3

``--release 2``: first a champion learns release 1 with ``--champion-strategy`` (by default
``lwf+replay+der``: LwF protects general knowledge while the replay and DER buffers fill with
release 1, and that state is saved with the champion), then each strategy learns ``wiki-topics-2``
from it; the probes then hold release 1's held-out items too. Results go to
``results/smollm2_demo_release2.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from flows.core.config import load_params
from flows.core.records import ChampionRef, ProbeSet
from flows.demo.build import build_demo, demo_releases, general_knowledge_source
from flows.registry.model_source import resolve_model
from flows.steps.evaluate import EvaluateStep, evaluate_candidate, score_model
from flows.steps.finetune import FinetuneStep, finetune
from flows.steps.probes import ProbesStep, build_probe_set

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="naive,self_rehearsal,lwf,l2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--options", default="{}", help='strategy options, e.g. {"lwf": {"alpha": 0.3}}'
    )
    ap.add_argument("--label", default="", help="suffix for the result names, e.g. alpha0.3")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-smollm2"))
    ap.add_argument("--release", type=int, choices=(1, 2), default=1)
    ap.add_argument("--champion-strategy", default="lwf+replay+der")
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
    base = resolve_model(params.model.base, params.path(params.model.cache_dir))
    champion = ChampionRef(version=None, model_dir=Path(base), releases=[])
    release, out = releases[0], RESULTS / "smollm2_demo.json"
    if args.release == 2:
        champion = release_1_champion(params, args.champion_strategy, champion, releases[0], work)
        release, out = releases[1], RESULTS / "smollm2_demo_release2.json"
    probe_path, tasks = build_probe_set(
        ProbesStep.from_params(params), champion, work / "probe_set.jsonl"
    )
    base_scores = score_model(
        EvaluateStep.from_params(params), champion.model_dir, probe_path, release, work / "baseline"
    )
    probe_set = ProbeSet(
        path=probe_path,
        dvc_hash="-",
        n_items=len(probe_path.read_text().splitlines()),
        tasks=tasks,
        baseline=base_scores.probe_scores,
        new_task_baseline=base_scores.new_task_score,
        champion=champion,
    )
    print("baseline", base_scores)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["baseline"] = {
        "probes": base_scores.probe_scores,
        "new_task": base_scores.new_task_score,
    }
    for name in args.strategies.split(","):
        options = json.loads(args.options)
        run = params.with_overrides({"train.strategy": name, "train.strategy_params": options})
        start = time.perf_counter()
        trained = finetune(FinetuneStep.from_params(run), champion, release, work / name)
        report = evaluate_candidate(
            EvaluateStep.from_params(run), trained.model_dir, probe_set, release, work / name
        )
        key = f"{name} {args.label}".strip()
        results[key] = {
            "champion": str(champion.version or "base"),
            "new_task": report.new_task_score,
            "retention": report.retention,
            "probe_scores": report.scores,
            "train_seconds": trained.train_seconds,
            "seconds_per_step": trained.train_seconds / trained.steps,
            "wall_seconds": time.perf_counter() - start,
            "steps": trained.steps,
        }
        results[key]["options"] = options
        print(key, json.dumps(results[key]))
        RESULTS.mkdir(parents=True, exist_ok=True)
        # re-read before writing: other runs (other --work folders) may have added rows
        on_disk = json.loads(out.read_text()) if out.exists() else {}
        results = {**on_disk, "baseline": results["baseline"], key: results[key]}
        out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"), release.name)


def release_1_champion(
    params, spec: str, base: ChampionRef, release: Path, work: Path
) -> ChampionRef:
    """The model that learned ``release`` from ``base`` with ``spec`` (trained once, then reused),
    its strategy state beside it; the release is copied into the workspace, where the probes look
    for it."""
    shutil.copytree(release, params.workspace_dir / "releases" / release.name, dirs_exist_ok=True)
    folder = work / f"champion-{spec}"
    if not (folder / "candidate_model").is_dir():
        step = FinetuneStep.from_params(params.with_overrides({"train.strategy": spec}))
        finetune(step, base, release, folder)
    return ChampionRef(version="1", model_dir=folder / "candidate_model", releases=[release.name])


def plot(results: dict, path: Path, release: str) -> None:
    """New-task score against the worst probe retention, one numbered point per run; with a
    naive row, the region the issue asks for (retention ≥ 0.95, ≥ 90% of naive's gain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]["new_task"]
    runs = [(name, r) for name, r in results.items() if name != "baseline"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, r) in enumerate(runs, 1):
        x, y = min(r["retention"].values()), r["new_task"]
        ax.scatter(x, y, s=50, label=f"{i}  {name}", color=plt.cm.tab20(i % 20))
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    if "naive" in results:
        bar = base + 0.9 * (results["naive"]["new_task"] - base)
        ax.fill_between([0.95, 1.1], bar, 1.0, color="green", alpha=0.08,
                        label="retention ≥ 0.95 and ≥ 90% of naive's gain")  # fmt: skip
    ax.axhline(base, color="grey", ls=":", label=f"champion before training ({base:.2f})")
    ax.axvline(0.95, color="red", ls="--", lw=1)
    ax.set_xlabel("worst probe retention (candidate / champion)")
    ax.set_ylabel(f"new-task score ({release})")
    ax.set_title("SmolLM2-135M, 30 LoRA steps: learning vs forgetting")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
