"""Step 5, evaluate: score the candidate on the test probes and the new release's eval set.

Retention per probe task = candidate score / baseline score (the champion's, from step 3), with
a confidence interval from the paired per-item results of the two models (``flows/confidence.py``),
and, on the items the champion answers right, the share the candidate still answers right.
Per-item outputs are written beside the scores so a reviewer can read what each model said.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from flows.confidence import paired_interval, proportion_interval
from flows.config import Params
from flows.data import Example, load_probes, load_release
from flows.records import EvalReport, ProbeSet, TaskRetention
from flows.score_cache import ScoreCache, item_key, model_key
from flows.scoring import accuracy_by_task, result_of, score_examples
from flows.serving import BASE_TASK, learned_tasks, load_for_serving
from flows.splits import stratified_split


class Scorer:
    """One model that scores lists of examples (probes and new-task items alike).

    A model that keeps parameters per task (packnet, progressive; ``flows/serving.py``) answers
    each item through its task's own parameters: a release it learned through that release's
    column or mask, any other task (general knowledge, releases learned before it, a release it
    has not learned yet) through the base weights. Each result records it as ``answered_by``.

    Answers this model version gave before are read from the score cache
    (``flows/score_cache.py``) instead of being computed again; the model itself is loaded only
    when an item is not in the cache. ``cached`` and ``scored`` count the items of each kind."""

    def __init__(self, params: Params, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.cfg, self.chat = params.evaluate, params.model.use_chat_template
        self.trust_remote_code = params.model.trust_remote_code
        self.tasks = learned_tasks(model_dir)
        self.cache = (  # a hub id is not content we can hash: its answers are not cached
            ScoreCache(params.workspace_dir / "cache" / "scores", model_key(model_dir))
            if params.evaluate.score_cache and self.model_dir.is_dir()
            else None
        )
        self.cached = self.scored = 0
        self._loaded: tuple | None = None

    def _load(self) -> tuple:
        if self._loaded is None:
            self._loaded = load_for_serving(self.model_dir, self.trust_remote_code)
        return self._loaded

    @property
    def model(self):
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]

    def route(self, task: str) -> str | None:
        """The task whose parameters answer an item of ``task`` (None: the model's one set)."""
        if self.tasks is None:
            return None
        return task if task in self.tasks else BASE_TASK

    def score(self, examples: Sequence[Example], max_new_tokens: int | None = None) -> list[dict]:
        """Per-item results ``{"id", "task", "category", "scoring", "output", "correct"}``
        (and ``answered_by`` for a model with tasks), in the order of ``examples``."""
        max_new_tokens = max_new_tokens or self.cfg.max_new_tokens
        groups: dict[str | None, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(self.route(ex.task), []).append(i)
        outputs: dict[int, str] = {}
        with Progress(transient=True) as bar:
            job = bar.add_task(f"scoring {self.model_dir.name}", total=len(examples))
            for route, indices in groups.items():
                keys = {i: item_key(examples[i], route, max_new_tokens, self.chat) for i in indices}
                known = self.cache.lookup(keys.values()) if self.cache else {}
                todo = [i for i in indices if keys[i] not in known]
                outputs |= {i: known[keys[i]] for i in indices if keys[i] in known}
                bar.advance(job, len(indices) - len(todo))
                if todo:
                    with self._answering(route) as model:
                        scored = score_examples(
                            model,
                            self.tokenizer,
                            [examples[i] for i in todo],
                            self.chat,
                            max_new_tokens,
                            self.cfg.batch_size,
                            lambda n: bar.advance(job, n),
                        )
                    outputs |= {i: r["output"] for i, r in zip(todo, scored, strict=True)}
                    if self.cache:
                        self.cache.store({keys[i]: outputs[i] for i in todo})
                self.cached += len(indices) - len(todo)
                self.scored += len(todo)
        results = [result_of(ex, outputs[i]) for i, ex in enumerate(examples)]
        if self.tasks is not None:
            results = [r | {"answered_by": self.route(r["task"])} for r in results]
        return results

    def _answering(self, route: str | None):
        model, _, router = self._load()
        return nullcontext(model) if route is None else router.answering(route)

    def score_new_task(self, release_dir: Path) -> list[dict]:
        return self.score(load_release(release_dir, "eval"), self.cfg.new_task_max_new_tokens)


def write_results(path: Path, results: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).open() if line.strip()]


def accuracy(results: Sequence[dict]) -> float:
    return sum(r["correct"] for r in results) / max(1, len(results))


@dataclass(frozen=True)
class Scores:
    probe_scores: dict[str, float]
    new_task_score: float
    seconds: float


def score_model(
    params: Params, model_dir: Path, probe_path: Path, release_dir: Path, out_dir: Path
) -> Scores:
    """Scores of one model on the probes (per task) and on ``release_dir/eval.jsonl``;
    per-item results go to ``out_dir/{probes,new_task}.jsonl``."""
    start = time.perf_counter()
    scorer = Scorer(params, model_dir)
    probe_results = scorer.score(load_probes(probe_path))
    task_results = scorer.score_new_task(release_dir)
    write_results(out_dir / "probes.jsonl", probe_results)
    write_results(out_dir / "new_task.jsonl", task_results)
    return Scores(
        accuracy_by_task(probe_results), accuracy(task_results), time.perf_counter() - start
    )


def retention(score: float, baseline: float) -> float:
    """candidate / baseline; a task the champion scored 0 on cannot be forgotten (1.0)."""
    return score / baseline if baseline > 0 else 1.0


def task_retention(
    champion: Sequence[bool], candidate: Sequence[bool], min_known: int, confidence: float
) -> TaskRetention:
    """Retention of one probe task from the two models' answers to the same items, in order."""
    known = [c for b, c in zip(champion, candidate, strict=True) if b]
    lost = len(known) - sum(known)
    base, cand = sum(champion) / len(champion), sum(candidate) / len(candidate)
    low, high = paired_interval(champion, candidate, "ratio", confidence)
    k_low, k_high = proportion_interval(sum(known), len(known), confidence)
    return TaskRetention(
        n=len(champion),
        known=len(known),
        lost=lost,
        gained=sum(c and not b for b, c in zip(champion, candidate, strict=True)),
        champion_score=base,
        candidate_score=cand,
        retention=retention(cand, base),
        retention_low=low,
        retention_high=high,
        known_retained=sum(known) / len(known) if known else 1.0,
        known_retained_low=k_low,
        known_retained_high=k_high,
        too_small=len(known) < min_known,
    )


def paired(champion: Sequence[dict], candidate: Sequence[dict]) -> dict[str, tuple[list, list]]:
    """Per task, the champion's and the candidate's right/wrong on the same items, in one order."""
    theirs = {(r["task"], r["id"]): bool(r["correct"]) for r in champion}
    out: dict[str, tuple[list, list]] = {}
    for r in candidate:
        key = (r["task"], r["id"])
        if key not in theirs:
            raise ValueError(f"probe item {key} has no champion result to compare with")
        a, b = out.setdefault(r["task"], ([], []))
        a.append(theirs[key])
        b.append(bool(r["correct"]))
    return out


def new_task_items(params: Params, release_dir: Path, part: str) -> list[Example]:
    """The new release's eval items the gate (``test``) or a tournament (``dev``) scores. Only a
    tournament splits them (stratified by category, ``probes.dev_fraction``, ``probes.seed``):
    without one nothing is selected, and the gate reads them all."""
    items = load_release(release_dir, "eval")
    if not params.train.candidates:
        return items
    dev, test = stratified_split(
        items,
        lambda ex: ex.category,
        lambda ex: ex.id,
        params.probes.dev_fraction,
        params.probes.seed,
    )
    return dev if part == "dev" else test


def evaluate_candidate(
    params: Params,
    candidate_dir: Path,
    probe_set: ProbeSet,
    release_dir: Path,
    run_dir: Path,
    part: str = "test",
    out_dir: Path | None = None,
) -> EvalReport:
    """Score a candidate on one part of the probes and of the new task: ``test`` for the gate,
    ``dev`` for choosing among candidates. Baselines are the champion's results on the same
    items, paired item by item (or, without per-item results, the probe set's baseline)."""
    start = time.perf_counter()
    probe_path = probe_set.path if part == "test" else probe_set.dev_path
    if probe_path is None:
        raise ValueError(f"the probe set has no {part} part")
    scorer = Scorer(params, candidate_dir)
    out = out_dir or run_dir / "candidate"
    probes = scorer.score(load_probes(probe_path))
    new_task = scorer.score(
        new_task_items(params, release_dir, part), params.evaluate.new_task_max_new_tokens
    )
    write_results(out / "probes.jsonl", probes)
    write_results(out / "new_task.jsonl", new_task)
    scores = accuracy_by_task(probes)
    baseline, new_baseline = probe_set.baseline, probe_set.new_task_baseline
    extra: dict = {}
    if probe_set.champion_results is not None:  # paired results: baselines on these items
        level = params.gate.confidence
        theirs = probe_set.champion_results
        pairs = paired(read_results(theirs / "probes.jsonl"), probes)
        new_pairs = paired(read_results(theirs / "new_task.jsonl"), new_task)
        champ_new, cand_new = next(iter(new_pairs.values()), ([], []))
        baseline = {t: sum(a) / len(a) for t, (a, _) in sorted(pairs.items())}
        new_baseline = sum(champ_new) / max(1, len(champ_new))
        extra = {
            "confidence": level,
            "tasks": {
                t: task_retention(a, b, params.probes.min_known, level)
                for t, (a, b) in sorted(pairs.items())
            },
            "new_task_interval": proportion_interval(sum(cand_new), len(cand_new), level),
            "new_task_gain_interval": paired_interval(champ_new, cand_new, "difference", level),
        }
    return EvalReport(
        scores=scores,
        baseline=baseline,
        retention={t: retention(scores.get(t, 0.0), b) for t, b in baseline.items()},
        new_task=release_dir.name,
        new_task_score=accuracy(new_task),
        new_task_baseline=new_baseline,
        new_task_n=len(new_task),
        eval_seconds=time.perf_counter() - start,
        **extra,
    )
