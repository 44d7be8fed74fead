"""Step 3, probes: build the frozen old-task probe set and score it on the current champion and
on each task's anchor.

The candidates for probe items are every probe source (by default the embedded general-knowledge
probes) plus the held-out eval items of every release the champion has learned. Per probe task:

1. a stratified sample of ``probes.per_category`` items per (task, category), in a reproducible
   order (``probes.seed``);
2. scored on the champion; while the task holds fewer items the champion answers right than
   the gate's design needs (``evaluate.needed_known``: ``probes.min_known``, or by default the
   known items with which a candidate keeping ``gate.design_retention`` passes the exact test
   with probability ``gate.power``), more items are drawn from the rest of its sources (round
   robin over categories) and scored. A task whose sources run out first is listed in
   ``too_small``; the gate blocks on it unless ``gate.too_small: decide``;
3. only when a tournament selects on dev (``train.candidates``): split stratified by (task,
   category, champion right or wrong) into ``probes/dev.jsonl`` (share ``probes.dev_fraction``)
   and ``probes/test.jsonl``; otherwise every item is test, since nothing is chosen on dev.
   Tracked by DVC;
4. the test items scored on each task's anchor (``evaluate.anchor_of``: the base model, or the
   version that learned the release), the reference of the anchored retention check.

The champion's per-item results are the baseline retention is measured against, item by item.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from itertools import zip_longest
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from flows.core.config import Params, ProbesConfig
from flows.core.data import DataError, as_probe_record, load_release, probe_example, write_jsonl
from flows.core.lm_eval_source import read_source
from flows.core.records import ChampionRef, ProbeSet
from flows.core.schemas import ProbeItem, record_errors
from flows.demo.build import PROBE_FILES, build_demo
from flows.scoring.scoring import accuracy_by_task
from flows.scoring.splits import stratified_split
from flows.steps.evaluate import (
    EvaluateStep,
    Scorer,
    accuracy,
    needed_known,
    read_results,
    score_anchors,
    write_results,
)
from flows.steps.version import track_file


class ProbesStep(BaseModel):
    """What the probe step reads: the probe sources, the workspace (the releases the champion
    learned; where the probe set is versioned), the ``probes`` section and how items are
    scored, resolved from ``params.yaml`` once (:meth:`from_params`)."""

    model_config = ConfigDict(frozen=True)

    sources: list[Path]  # probes.sources, or the embedded demo's probe files (built on first use)
    workspace: Path
    scoring: EvaluateStep  # holds the ``probes`` section too

    @property
    def probes(self) -> ProbesConfig:
        return self.scoring.probes

    @classmethod
    def from_params(cls, params: Params) -> ProbesStep:
        sources = [params.path(p) for p in params.probes.sources]
        if not sources:
            demo = build_demo(params.path(params.data.demo_dir))
            sources = [demo / "probes" / name for name in PROBE_FILES]
        return cls(
            sources=sources,
            workspace=params.workspace_dir,
            scoring=EvaluateStep.from_params(params),
        )


def probe_items(source: Path) -> list[dict]:
    """The items of one probe source in the form the steps use (:meth:`ProbeItem.as_record`:
    ids as NFC text); an item that breaks the schema is a :class:`DataError` naming it."""
    items = []
    for line, record in read_source(source):
        try:
            items.append(ProbeItem.model_validate(record).as_record())
        except ValidationError:
            rule, detail = record_errors(ProbeItem, record)[0]
            raise DataError(source, line, f"{rule} ({detail})" if detail else rule) from None
    return items


def learned_probe_items(workspace: Path, champion: ChampionRef) -> list[dict]:
    """The eval items of every release the champion has learned, as probe items."""
    items = []
    for release in champion.releases:
        folder = workspace / "releases" / release
        items += [as_probe_record(ex) for ex in load_release(folder, "eval")]
    return items


def collect_probe_items(step: ProbesStep, champion: ChampionRef) -> list[dict]:
    """All candidate probe items: the sources, then each learned release's eval items."""
    items = [item for src in step.sources for item in probe_items(src)]
    items += learned_probe_items(step.workspace, champion)
    ids = [(r["task"], r["id"]) for r in items]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise DataError(
            "probes.sources", None, f"probe ids repeat within a task: {sorted(dupes)[:5]}"
        )
    return items


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


def sampling_order(
    items: list[dict], per_group: int, seed: int
) -> dict[str, tuple[list[dict], int]]:
    """Per task, its items in the order they are drawn, and how many form the first sample: the
    stratified sample first, then the other items round robin over categories, each category
    in a seeded shuffle."""
    first = stratified(items, per_group, seed)
    chosen = {(r["task"], r["id"]) for r in first}
    rest: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(items, key=lambda r: r["id"]):
        if (r["task"], r["id"]) not in chosen:
            rest[r["task"]][r.get("category", "")].append(r)
    order = {}
    for task in sorted({r["task"] for r in items}):
        cats = [rest[task][c] for c in sorted(rest[task])]
        for c, group in zip(sorted(rest[task]), cats, strict=True):
            random.Random(f"{seed}:{task}:{c}").shuffle(group)
        head = [r for r in first if r["task"] == task]
        tail = [r for row in zip_longest(*cats) for r in row if r is not None]
        order[task] = (head + tail, len(head))
    return order


def build_probe_set(step: ProbesStep, champion: ChampionRef, out: Path) -> tuple[Path, list[str]]:
    """The first stratified sample alone, unsplit (the benchmarks' fixed probe set)."""
    items = stratified(
        collect_probe_items(step, champion), step.probes.per_category, step.probes.seed
    )
    write_jsonl(out, items)
    return out, sorted({r["task"] for r in items})


def split_dev_test(
    items: list[dict], correct: dict[tuple[str, str], bool], dev_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Probe items into (dev, test), stratified by (task, category, champion right)."""
    return stratified_split(
        items,
        lambda r: (r["task"], r.get("category", ""), correct[(r["task"], r["id"])]),
        lambda r: r["id"],
        dev_fraction,
        seed,
    )


def known_needed(min_known: int, dev_fraction: float) -> int:
    """Known items a task needs in all so that about ``min_known`` land in the test part."""
    return math.ceil(min_known / (1.0 - dev_fraction))


def sample_with_known(
    order: dict[str, tuple[list[dict], int]], needed: dict[str, int], scorer: Scorer
) -> tuple[list[dict], list[dict]]:
    """Draw each task's first sample, then more items in order until the champion answers
    ``needed[task]`` of them right or the task runs out. Returns (items, the champion's
    results)."""
    items, results = [], []
    for task, (queue, take) in order.items():
        drawn, got = queue[:take], scorer.score([probe_example(r) for r in queue[:take]])
        while sum(r["correct"] for r in got) < needed[task] and take < len(queue):
            known = sum(r["correct"] for r in got)
            rate = max(known / max(1, len(got)), 0.1)  # expected share right among new draws
            more = min(len(queue) - take, max(16, math.ceil((needed[task] - known) / rate)))
            batch = queue[take : take + more]
            drawn, got = drawn + batch, got + scorer.score([probe_example(r) for r in batch])
            take += more
        items += drawn
        results += got
    return items, results


def create_probe_set(
    step: ProbesStep, release_dir: Path, champion: ChampionRef, run_dir: Path
) -> ProbeSet:
    """Build, score, (with a tournament) split and version the probe set; the champion's results
    are the baseline, each task's anchor's the reference of the anchored check."""
    start = time.perf_counter()
    cfg, ws = step.probes, step.workspace
    order = sampling_order(collect_probe_items(step, champion), cfg.per_category, cfg.seed)
    scorer = Scorer(step.scoring, champion.model_dir)
    dev_fraction = cfg.dev_fraction if step.scoring.tournament else 0.0
    need = {t: needed_known(step.scoring, t) for t in order}
    items, results = sample_with_known(
        order, {t: known_needed(n, dev_fraction) for t, n in need.items()}, scorer
    )
    correct = {(r["task"], r["id"]): bool(r["correct"]) for r in results}
    dev, test = (
        split_dev_test(items, correct, dev_fraction, cfg.seed) if dev_fraction else ([], items)
    )
    test_keys = {(r["task"], r["id"]) for r in test}
    split = {k: ("test" if k in test_keys else "dev") for k in correct}
    results = [r | {"split": split[(r["task"], r["id"])]} for r in results]
    out = run_dir / "baseline"
    write_results(out / "probes.jsonl", results)
    new_task = write_results(out / "new_task.jsonl", scorer.score_new_task(release_dir))
    test_path = write_jsonl(ws / "probes" / "test.jsonl", test)
    dvc_hash = track_file(test_path, ws, f"Probe set (test) for {release_dir.name}")
    dev_path = None
    if dev:
        dev_path = write_jsonl(ws / "probes" / "dev.jsonl", dev)
        track_file(dev_path, ws, f"Probe set (dev) for {release_dir.name}")
    test_results = [r for r in results if r["split"] == "test"]
    anchors, anchor_rows = score_anchors(
        step.scoring, champion, [probe_example(r) for r in test], test_results, scorer.conditions
    )
    anchor_path = write_results(out / "anchors.jsonl", anchor_rows)
    known = {t: sum(r["correct"] for r in test_results if r["task"] == t) for t in sorted(order)}
    return ProbeSet(
        path=test_path,
        dev_path=dev_path,
        dvc_hash=dvc_hash,
        n_items=len(test),
        n_dev=len(dev),
        tasks=sorted(order),
        baseline=accuracy_by_task(test_results),
        known=known,
        needed_known=need,
        too_small=[t for t, k in known.items() if k < need[t]],
        champion_results=out,
        new_task_baseline=accuracy(read_results(new_task)),
        champion=champion,
        baseline_seconds=time.perf_counter() - start,
        baseline_cached=scorer.cached,
        baseline_scored=scorer.scored,
        anchors=anchors,
        anchor_results=anchor_path,
        conditions=scorer.conditions,
    )
