"""Probe scoring of the gate's two models, before and after likelihood probe sources, in one run.

- before: the general-knowledge source as the gate scored it until now, its 184 items: 124
  capitals by 20 tokens of greedy generation, 60 descriptions by mean log-likelihood;
- now: the default probe sources (``flows/demo_data.py``), the first stratified sample per task
  as the probe step draws it (``probes.per_category`` = 40 per category): the same capitals and
  descriptions, more descriptions, world cities and country facts, all but the capitals scored
  by log-likelihood over their choices.

Both are scored on the embedded SmolLM2 twice, as the gate scores a champion and a candidate
(the score cache off, each model loaded once, the load included), in one process. Writes
``results/probe_scoring.json``: seconds, items, items per second and known items per task.

    OMP_NUM_THREADS=2 python benchmarks/probe_scoring.py
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from flows.config import load_params
from flows.data import probe_example, read_jsonl
from flows.demo_data import build_demo
from flows.evaluate import Scorer
from flows.model_source import resolve_model
from flows.probes import collect_probe_items, stratified
from flows.records import ChampionRef

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "probe_scoring.json"


def score_twice(params, model_dir: Path, items: list[dict]) -> dict:
    """Seconds to score ``items`` on two models (here the same weights, loaded twice)."""
    examples = [probe_example(r) for r in items]
    start = time.perf_counter()
    for _ in ("champion", "candidate"):
        results = Scorer(params, model_dir).score(examples)
    seconds = time.perf_counter() - start
    known = Counter(r["task"] for r in results if r["correct"])
    return {
        "items": len(items),
        "by_scoring": dict(Counter(r["scoring"] for r in items)),
        "seconds_both_models": round(seconds, 1),
        "items_per_second": round(2 * len(items) / seconds, 2),
        "known": dict(sorted(known.items())),
        "items_by_task": dict(sorted(Counter(r["task"] for r in items).items())),
    }


def main() -> None:
    params = load_params(ROOT / "params.yaml", {"evaluate.score_cache": False})
    demo = build_demo(params.path(params.data.demo_dir))
    model_dir = Path(resolve_model(params.model.base, params.path(params.model.cache_dir)))
    before = [r for _, r in read_jsonl(demo / "probes" / "general_knowledge.jsonl")]
    champion = ChampionRef(version=None, model_dir=model_dir)
    now = stratified(
        collect_probe_items(params, champion), params.probes.per_category, params.probes.seed
    )
    rows = {
        "before": score_twice(params, model_dir, before),
        "now": score_twice(params, model_dir, now),
        "threads": torch.get_num_threads(),
    }
    rows["speedup_items_per_second"] = round(
        rows["now"]["items_per_second"] / rows["before"]["items_per_second"], 2
    )
    OUT.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
