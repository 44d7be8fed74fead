"""Probe scoring of the gate's two models, the code before likelihood probe sources against the
code now, side by side in one run on one machine.

- before: the tree at ``--before`` (default: the last commit before this benchmark existed),
  run from a git worktree with its own ``params.yaml``: the general-knowledge source as the
  gate scored it, 184 items: 124 capitals by 20 tokens of greedy generation, 60 descriptions
  by mean log-likelihood after the chat template, one forward pass per choice;
- now: this tree with its ``params.yaml``: the default probe sources' first stratified sample
  (``probes.per_category`` per category, as the probe step draws it first): the same capitals
  and descriptions, and world cities, country facts and more descriptions scored ``loglik``
  (each item's question run once, its choices reading the cached keys and values).

Each side scores its items on the embedded SmolLM2 twice, as the gate scores a champion and a
candidate (the score cache off, each model loaded once, the load included). Writes
``results/probe_scoring.json``: seconds, items per second and known items per task.

    OMP_NUM_THREADS=2 python benchmarks/probe_scoring.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from flows.core.config import load_params
from flows.core.data import read_jsonl, write_jsonl
from flows.core.records import ChampionRef
from flows.demo.build import general_knowledge_source
from flows.registry.model_source import resolve_model
from flows.steps.probes import ProbesStep, collect_probe_items, stratified

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "probe_scoring.json"
BEFORE = "29b883a"  # the gate's bootstrap, one probe source scored by generation

# Run inside a tree (old or new): score the items twice, as champion and candidate.
SCORE_TWICE = """
import json, sys, time
from pathlib import Path
from flows.core.config import load_params
from flows.core.data import load_probes
from flows.steps.evaluate import EvaluateStep, Scorer
params = load_params("params.yaml", {"evaluate.score_cache": False})
items = load_probes(Path(sys.argv[1]))
start = time.perf_counter()
for _ in ("champion", "candidate"):
    results = Scorer(EvaluateStep.from_params(params), Path(sys.argv[2])).score(items)
print(json.dumps({"seconds": time.perf_counter() - start, "results": results}))
"""


def score_twice(tree: Path, items: list[dict], model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(Path(tmp) / "items.jsonl", items)
        env = os.environ | {"PYTHONPATH": str(tree)}
        done = subprocess.run(
            [sys.executable, "-c", SCORE_TWICE, str(path), str(model_dir)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    results, seconds = measured["results"], measured["seconds"]
    return {
        "items": len(items),
        "by_scoring": dict(Counter(r.get("scoring", "generate") for r in items)),
        "seconds_both_models": round(seconds, 1),
        "items_per_second": round(2 * len(items) / seconds, 2),
        "items_by_task": dict(sorted(Counter(r["task"] for r in items).items())),
        "known": dict(sorted(Counter(r["task"] for r in results if r["correct"]).items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=BEFORE, help="the commit to compare with")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    model_dir = Path(resolve_model(params.model.base, params.path(params.model.cache_dir)))
    champion = ChampionRef(version=None, model_dir=model_dir)
    items = collect_probe_items(ProbesStep.from_params(params), champion)
    now = stratified(items, params.probes.per_category, params.probes.seed)
    source = general_knowledge_source(params.path(params.data.demo_dir))
    before = [r for _, r in read_jsonl(source)]  # the one probe source the gate read before
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], check=True)
        try:
            rows = {"before": {"commit": args.before, **score_twice(old, before, model_dir)}}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], check=True)
    rows["now"] = score_twice(ROOT, now, model_dir)
    rows["threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    rows["speedup_items_per_second"] = round(
        rows["now"]["items_per_second"] / rows["before"]["items_per_second"], 2
    )
    OUT.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
