"""Step 3, probes: build the frozen old-task probe set and score it on the current champion.

The probe set is every probe source (by default the embedded general-knowledge probes) plus the
held-out eval items of every release the champion has learned, sampled stratified by
(task, category), written as JSONL, tracked by DVC, and scored on the champion: that score is
the baseline retention is measured against.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from flows.config import Params
from flows.data import as_probe_record, load_release, read_jsonl, write_jsonl
from flows.demo_data import build_demo
from flows.evaluate import score_model
from flows.records import ChampionRef, ProbeSet
from flows.version import track_file


def probe_sources(params: Params) -> list[Path]:
    if params.probes.sources:
        return [params.path(p) for p in params.probes.sources]
    demo = build_demo(params.path(params.data.demo_dir))
    return [demo / "probes" / "general_knowledge.jsonl"]


def learned_probe_items(params: Params, champion: ChampionRef) -> list[dict]:
    """The eval items of every release the champion has learned, as probe items."""
    items = []
    for release in champion.releases:
        folder = params.workspace_dir / "releases" / release
        items += [as_probe_record(ex) for ex in load_release(folder, "eval")]
    return items


def collect_probe_items(params: Params, champion: ChampionRef) -> list[dict]:
    """All candidate probe items: the sources, then each learned release's eval items."""
    items = [r for src in probe_sources(params) for _, r in read_jsonl(src)]
    return items + learned_probe_items(params, champion)


def stratified(items: list[dict], per_group: int, seed: int) -> list[dict]:
    """At most ``per_group`` items from each (task, category), chosen reproducibly."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for item in items:
        groups[(item["task"], item.get("category", ""))].append(item)
    rng = random.Random(seed)
    chosen = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: r["id"])
        chosen += group if len(group) <= per_group else rng.sample(group, per_group)
    return chosen


def build_probe_set(params: Params, champion: ChampionRef, out: Path) -> tuple[Path, list[str]]:
    items = stratified(
        collect_probe_items(params, champion), params.probes.per_category, params.probes.seed
    )
    ids = [(r["task"], r["id"]) for r in items]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"probe ids repeat within a task: {sorted(dupes)[:5]}")
    write_jsonl(out, items)
    return out, sorted({r["task"] for r in items})


def create_probe_set(
    params: Params, release_dir: Path, champion: ChampionRef, run_dir: Path
) -> ProbeSet:
    """Build, version and score the probe set; the champion's scores are the baseline."""
    ws = params.workspace_dir
    path, tasks = build_probe_set(params, champion, ws / "probes" / "probe_set.jsonl")
    dvc_hash = track_file(path, ws, f"Probe set for {release_dir.name}")
    scores = score_model(params, champion.model_dir, path, release_dir, run_dir / "baseline")
    return ProbeSet(
        path=path,
        dvc_hash=dvc_hash,
        n_items=len(read_jsonl(path)),
        tasks=tasks,
        baseline=scores.probe_scores,
        new_task_baseline=scores.new_task_score,
        champion=champion,
        baseline_seconds=scores.seconds,
    )
