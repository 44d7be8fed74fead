"""The continual benchmark: every demo release in order, through ``forgetless run``, per strategy.

Each strategy gets its own workspace (its own registry, champion and probe sets) and learns the
embedded releases (``flows/demo/build.py``: two topic classifications, a short-answer extraction,
a free-text description task, a question-answering task and another free-text task) one after
the other, each through the command a user types, with the gate of the settings in use. The
probe tasks are what the flow builds: the general-knowledge sources plus the held-out items of
every release the chain promoted. After each release the script records, from the run's
``summary.json``:

- the gate's decision and reasons, the new-task score and its baseline (the champion's);
- retention against the base model per general-knowledge probe task (the share of the base
  model's known items kept, and its one-sided lower bound), and against the champion;
- training and wall time;
- the score of the champion after the release (the candidate when it was promoted, else the
  model before it) on every release learned so far, scored as the gate scores a new task: the
  accuracy matrix ``R[i][j]``, from which average accuracy (TRACE's overall performance, Wang
  et al., 2023: the mean of the last row) and backward transfer (the mean of ``R[T][j] - R[j][j]``)
  follow (``cf_strategies/metrics.py``).

Every (strategy, release) row is written to ``results/continual_<mode>.json`` as soon as it is
done; a rerun skips rows that are there (``--redo`` runs them again), so the table can be made
in parts. The plot is redrawn from the file at the end of each invocation.

    python benchmarks/continual.py --strategies naive,lwf           # SmolLM2, params.yaml
    python benchmarks/continual.py --quick                          # the tiny model, 3 releases
    python benchmarks/continual.py --report                         # table and plot only

The table in ``benchmarks/README.md`` (between its ``continual-table`` markers) is rewritten from
the results file at the end of every SmolLM2 invocation.

``--quick`` runs the machinery on a tiny model built here (a 2-layer Llama, a byte-level
tokenizer trained on the demo text) with the gate's thresholds at zero so that every release is
promoted and becomes a probe task of the next: it checks the plumbing, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model of --quick is the test suite's

from cf_strategies.metrics import average_accuracy, backward_transfer  # noqa: E402
from flows.core.config import load_params  # noqa: E402
from flows.core.data import load_release  # noqa: E402
from flows.core.records import GateCheck  # noqa: E402
from flows.demo.build import RELEASES, build_demo, demo_releases  # noqa: E402
from flows.registry.tracking import current_champion  # noqa: E402
from flows.steps.evaluate import EvaluateStep, Scorer, accuracy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"  # --results changes it
# options per strategy over params.yaml's (30 steps a release: packnet prunes at 24 and
# retrains the kept half for 6)
STRATEGIES: dict[str, dict] = {
    "naive": {},
    "lwf": {},
    "self_rehearsal": {},
    "replay": {},
    "der": {},
    "l2": {},
    "ewc": {},
    "si": {},
    "hlr": {},
    "ilora": {},
    "packnet": {"packnet": {"prune_ratio": 0.5, "prune_at": 24}},
    "progressive": {},
}
QUICK = {  # the tiny model: the test suite's settings (tests/conftest.py)
    "model": {"use_chat_template": False},
    "probes": {"per_category": 8},
    "train": {
        "max_steps": 40,
        "learning_rate": 0.02,
        "max_length": 160,
        "lora": {"r": 8, "alpha": 16},
        "general_importance_prompts": 8,
    },
    "evaluate": {"batch_size": 32, "max_new_tokens": 6},
    "gate": {
        "min_retention": 0.0,
        "min_retention_vs_anchor": 0.0,
        "min_new_task_score": 0.0,
        "beat_champion": False,
        "too_small": "decide",
    },
}


def results_file(mode: str) -> Path:
    return RESULTS / f"continual_{mode}.json"


def load_results(mode: str) -> dict:
    path = results_file(mode)
    return json.loads(path.read_text()) if path.exists() else {}


def save_row(mode: str, strategy: str, release: str, row: dict) -> None:
    """Add one (strategy, release) row to the results file (read again first: another
    invocation may have added rows)."""
    results = load_results(mode)
    results.setdefault(strategy, {})[release] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = results_file(mode).with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, results_file(mode))  # a crash leaves the old file whole


def tiny_model(work: Path, demo: Path) -> Path:
    """The test suite's tiny model, built once under ``work``."""
    from tests.tiny_llm import build_tiny_llm

    out = work / "tiny-llm"
    if not (out / "config.json").exists():
        corpus = [line for f in sorted(demo.rglob("*.jsonl")) for line in f.open()]
        build_tiny_llm(out, corpus)
    return out


def write_params(work: Path, strategy: str, quick: bool, demo: Path) -> Path:
    """The strategy's params file: params.yaml's settings (``QUICK``'s over them in quick mode),
    its workspace and the strategy with its options."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["workspace"] = str(work / strategy / "workspace")
    params["versioning"]["remote"] = str(work / strategy / "dvc-remote")
    params["model"]["cache_dir"] = str(ROOT / params["model"]["cache_dir"])
    params["data"]["demo_dir"] = str(demo)
    if quick:
        for section, values in QUICK.items():
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                    params[section][key] |= value
                else:
                    params[section][key] = value
        params["model"]["base"] = str(tiny_model(work, demo))
    params["train"]["strategy"] = strategy
    params["train"]["strategy_params"] = (params["train"].get("strategy_params") or {}) | (
        STRATEGIES.get(strategy, {})
    )
    path = work / strategy / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_release(params_file: Path, release: Path, log: Path) -> dict:
    """``forgetless run --release`` in a process of its own; its run's ``summary.json``."""
    workspace = Path(load_params(params_file).workspace_dir)
    before = set((workspace / "runs").glob(f"{release.name}-*/summary.json"))
    cmd = [sys.executable, "-m", "flows.cli", "--params", str(params_file), "run"]
    with log.open("a") as out:
        done = subprocess.run(
            [*cmd, "--release", str(release)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    new = set((workspace / "runs").glob(f"{release.name}-*/summary.json")) - before
    if done.returncode != 0 or len(new) != 1:
        raise RuntimeError(
            f"forgetless run on {release.name} failed (exit {done.returncode}): {log}"
        )
    return json.loads(new.pop().read_text())


def champion_scores(params_file: Path, learned: list[Path]) -> dict[str, float]:
    """The champion's score on each release's eval items, scored as the gate scores a new task."""
    params = load_params(params_file)
    champion = current_champion(params.model_store)
    scorer = Scorer(EvaluateStep.from_params(params), champion.model_dir)
    return {r.name: accuracy(scorer.score(load_release(r, "eval"), new_task=True)) for r in learned}


def reasons(summary: dict) -> list[str]:
    """The failed checks, as the gate words them (``GateCheck``), without their notes."""
    checks = [GateCheck.model_validate(c) for c in summary["gate"]["checks"]]
    return [str(c.model_copy(update={"note": ""})) for c in checks if not c.passed]


def row_of(summary: dict, seconds: float, scores: dict[str, float]) -> dict:
    """The numbers of one (strategy, release) from its run's summary."""
    report = summary["eval"]
    general = {t: r for t, r in report["anchored"].items() if r["against"] == "base"}
    return {
        "passed": summary["gate"]["passed"],
        "promoted": summary["promotion"]["promoted"],
        "reasons": reasons(summary),
        "new_task": report["new_task_score"],
        "new_task_baseline": report["new_task_baseline"],
        "new_task_interval": report["new_task_interval"],
        "kept_vs_base": {t: r["value"] for t, r in general.items()},
        "kept_vs_base_low": {t: r["low"] for t, r in general.items()},
        "known_by_base": {t: r["known"] for t, r in general.items()},
        "kept_vs_champion": {t: r["value"] for t, r in report["tasks"].items()},
        "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "benchmark_seconds": seconds,
        "champion_scores": scores,
        "run_dir": summary["run_dir"],
    }


def run_chain(strategy: str, releases: list[Path], args, demo: Path, mode: str) -> None:
    params_file = write_params(args.work, strategy, args.quick, demo)
    log = args.work / strategy / "runs.log"
    done = load_results(mode).get(strategy, {})
    for i, release in enumerate(releases):
        if release.name in done and not args.redo:
            continue
        if args.redo and i == 0 and (args.work / strategy / "workspace").exists():
            raise SystemExit(f"--redo starts over: remove {args.work / strategy} first")
        start = time.perf_counter()
        summary = run_release(params_file, release, log)
        scores = champion_scores(params_file, releases[: i + 1])
        row = row_of(summary, time.perf_counter() - start, scores)
        save_row(mode, strategy, release.name, row)
        kept = ", ".join(f"{t} {v:.2f}" for t, v in sorted(row["kept_vs_base"].items()))
        print(
            f"{strategy:>16} {release.name:<16} {'passed' if row['passed'] else 'FAILED':<6} "
            f"new task {row['new_task']:.3f} (was {row['new_task_baseline']:.3f})  kept vs base: "
            f"{kept}  train {row['train_seconds']:.0f} s",
            flush=True,
        )


def matrix(rows: dict, order: list[str]) -> list[list[float]]:
    """``R[i][j]``: the champion after release i on release j (j <= i; later ones are NaN)."""
    names = [r for r in order if r in rows]
    return [
        [rows[a]["champion_scores"].get(b, float("nan")) if j <= i else float("nan")
         for j, b in enumerate(names)]
        for i, a in enumerate(names)
    ]  # fmt: skip


def summary_table(results: dict, order: list[str]) -> list[str]:
    """Markdown: one row per strategy; per release the new-task score (x: the gate failed),
    the least general-knowledge kept vs base after the last release, ACC, BWT, training time."""
    names = [r for r in order if any(r in rows for rows in results.values())]
    head = ["strategy", *names, "passed", "least kept vs base (last)", "ACC", "BWT", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for strategy, rows in results.items():
        cells = [
            f"{rows[n]['new_task']:.2f}{'' if rows[n]['passed'] else ' ✗'}" if n in rows else "–"
            for n in names
        ]
        learned = [n for n in names if n in rows]
        last = rows[learned[-1]]
        R = matrix(rows, names)
        kept = min(last["kept_vs_base"].values()) if last["kept_vs_base"] else float("nan")
        cells += [
            f"{sum(rows[n]['passed'] for n in learned)}/{len(learned)}",
            f"{kept:.3f}",
            f"{average_accuracy(R):.3f}",
            f"{backward_transfer(R):+.3f}",
            f"{sum(rows[n]['train_seconds'] for n in learned):.0f}",
        ]
        lines.append("| " + " | ".join([strategy, *cells]) + " |")
    return lines


def plot(results: dict, order: list[str], out: Path) -> Path:
    """Per release, one line per strategy: the new-task score, and the least share of the base
    model's known general-knowledge items kept (the gate's anchored statistic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r for r in order if any(r in rows for rows in results.values())]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for strategy, rows in results.items():
        xs = [i for i, n in enumerate(names) if n in rows]
        top.plot(xs, [rows[names[i]]["new_task"] for i in xs], marker="o", label=strategy)
        kept = [min(rows[names[i]]["kept_vs_base"].values(), default=float("nan")) for i in xs]
        bottom.plot(xs, kept, marker="o", label=strategy)
    top.set_ylabel("new-task score")
    bottom.set_ylabel("general knowledge kept vs base\n(least probe task)")
    bottom.axhline(0.9, color="grey", linestyle="--", linewidth=1)
    bottom.set_xticks(range(len(names)), [f"{n}\n({RELEASES.get(n, '')})" for n in names])
    bottom.tick_params(axis="x", labelsize=7)
    top.legend(fontsize=7, ncol=3)
    top.set_title("Continual benchmark: each release through `forgetless run`")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default="naive,lwf", help="comma-separated specs")
    ap.add_argument("--releases", type=int, help="learn the first N releases (default: all)")
    ap.add_argument("--quick", action="store_true", help="the tiny model, 3 releases")
    ap.add_argument("--redo", action="store_true", help="run rows that are recorded again")
    ap.add_argument("--report", action="store_true", help="only print the table and plot")
    ap.add_argument("--work", type=Path, help="workspaces (default: .cache/continual/<mode>)")
    ap.add_argument("--mode", help="results name (default: quick or smollm2)")
    ap.add_argument("--results", type=Path, help="results folder (default: benchmarks/results)")
    args = ap.parse_args(argv)
    global RESULTS
    RESULTS = (args.results or RESULTS).resolve()
    mode = args.mode or ("quick" if args.quick else "smollm2")
    args.work = (args.work or ROOT / ".cache" / "continual" / mode).resolve()
    demo = build_demo(args.work / "demo-data" if args.quick else ROOT / ".cache" / "demo-data")
    releases = demo_releases(demo)[: args.releases or (3 if args.quick else None)]
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if not args.report:
        for strategy in args.strategies.split(","):
            run_chain(strategy, releases, args, demo, mode)
    results = load_results(mode)
    if results:
        order = list(RELEASES)
        table = summary_table(results, order)
        print("\n".join(table))
        print(f"plot: {plot(results, order, RESULTS / f'continual_{mode}.png')}")
        if mode == "smollm2" and RESULTS == ROOT / "benchmarks" / "results":
            write_table(ROOT / "benchmarks" / "README.md", table)


def write_table(readme: Path, table: list[str]) -> None:
    """Put ``table`` between the ``continual-table`` markers of ``readme``."""
    text = readme.read_text()
    start, end = "<!-- continual-table -->\n", "<!-- /continual-table -->"
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n".join(table) + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
