"""Step 5, evaluate: score the candidate on the test probes and the new release's eval set.

Retention is measured twice per probe task, each time on the paired per-item results of the
candidate and a reference scored under the same conditions (dtype, device kind, template,
decoding): against the champion (no step back) and against the task's anchor (the base model
for general knowledge, the version that learned a release for its items), so that drift cannot
compound unseen over releases. Each gets the exact one-sided test of ``flows/scoring/confidence.py``.
Per-item outputs are written beside the scores so a reviewer can read what each model said.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from rich.progress import Progress
from transformers import AutoTokenizer

from flows.core.config import EvaluateConfig, GateConfig, ModelStore, Params, ProbesConfig
from flows.core.data import GENERATION_KINDS, Example, load_probes, load_release
from flows.core.records import ChampionRef, EvalReport, ProbeSet, ScoringConditions, TaskRetention
from flows.registry.serving import default_device, learned_tasks, load_dtype, load_for_serving
from flows.scoring import confidence
from flows.scoring.score_cache import ScoreCache, item_key, model_key
from flows.scoring.scoring import accuracy_by_task, result_of, score_examples
from flows.scoring.splits import stratified_split


def serving_conditions(model_dir: Path) -> ScoringConditions:
    """How serving answers with this model on this machine: its serving dtype, this device."""
    dtype = load_dtype(model_dir) if Path(model_dir).is_dir() else torch.float32
    return ScoringConditions(dtype=str(dtype).removeprefix("torch."), device=default_device())


class EvaluateStep(BaseModel):
    """What the evaluate step reads, and the probe step when it scores the champion: the
    ``evaluate``, ``probes`` and ``gate`` sections, how the model is asked, the score cache's
    folder and the model store, resolved from ``params.yaml`` once (:meth:`from_params`)."""

    model_config = ConfigDict(frozen=True)

    evaluate: EvaluateConfig
    probes: ProbesConfig
    gate: GateConfig
    use_chat_template: bool  # model.use_chat_template
    trust_remote_code: bool  # model.trust_remote_code
    score_cache: Path | None  # workspace/cache/scores with evaluate.score_cache, else None
    tournament: bool  # train.candidates: a tournament splits the release's eval set dev/test
    store: ModelStore  # the registered anchors, the base model

    @classmethod
    def from_params(cls, params: Params) -> EvaluateStep:
        cache = params.workspace_dir / "cache" / "scores"
        return cls(
            evaluate=params.evaluate,
            probes=params.probes,
            gate=params.gate,
            use_chat_template=params.model.use_chat_template,
            trust_remote_code=params.model.trust_remote_code,
            score_cache=cache if params.evaluate.score_cache else None,
            tournament=bool(params.train.candidates),
            store=params.model_store,
        )


DEFAULT = "default"  # answered_by of an item a task model answers through its default route


class Scorer:
    """One model that scores lists of examples (probes and new-task items alike).

    A model that keeps parameters per task (packnet, progressive; ``flows/registry/serving.py``) answers
    each item as its endpoint would: a release it learned through that release's column or mask
    (a client names the task), any other task (general knowledge, a release it has not learned
    yet) through what a request without a task gets, the default route (the latest release's
    parameters), never the base weights, which no such request reaches. Each result records it
    as ``answered_by`` ("default" for the default route).

    Answers this model version gave before are read from the score cache
    (``flows/scoring/score_cache.py``) instead of being computed again; the model itself is loaded only
    when an item is not in the cache. ``cached`` and ``scored`` count the items of each kind.

    ``conditions`` (dtype, device) default to how serving answers with this model here; the gate
    passes the candidate's to the champion's and the anchors' scorers, so all answer alike."""

    def __init__(
        self, step: EvaluateStep, model_dir: Path, conditions: ScoringConditions | None = None
    ):
        self.model_dir = Path(model_dir)
        self.conditions = conditions or serving_conditions(self.model_dir)
        self.cfg, self.chat = step.evaluate, step.use_chat_template
        self.trust_remote_code = step.trust_remote_code
        self.tasks = learned_tasks(model_dir)
        self.cache = (  # a hub id is not content we can hash: its answers are not cached
            ScoreCache(step.score_cache, model_key(model_dir))
            if step.score_cache is not None and self.model_dir.is_dir()
            else None
        )
        self.cached = self.scored = 0
        self._loaded: tuple | None = None
        self._tokenizer = None

    def _load(self) -> tuple:
        if self._loaded is None:
            self._loaded = load_for_serving(
                self.model_dir,
                self.trust_remote_code,
                getattr(torch, self.conditions.dtype),
                self.conditions.device,
            )
        return self._loaded

    @property
    def model(self):
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]

    def route(self, task: str) -> str | None:
        """The task whose parameters answer an item of ``task`` (None: the model's one set, or
        a task model's default route)."""
        if self.tasks is None:
            return None
        return task if task in self.tasks else None

    def answer_budget(self, ex: Example) -> int:
        """New tokens for an answer sized by its reference: the longest accepted answer (or
        choice) in this model's tokens, plus ``evaluate.answer_margin_tokens``, rounded up to a
        multiple of 8 so that items of about one length share their batches."""
        if self._tokenizer is None:
            self._tokenizer = (
                self._loaded[1]
                if self._loaded
                else AutoTokenizer.from_pretrained(
                    str(self.model_dir), trust_remote_code=self.trust_remote_code
                )
            )
        longest = max(
            len(self._tokenizer(a, add_special_tokens=False)["input_ids"])
            for a in [*ex.answers, *ex.choices]
        )
        return -(-(longest + self.cfg.answer_margin_tokens) // 8) * 8

    def budget(self, ex: Example, new_task: bool) -> int:
        """New tokens to answer ``ex``: a ``rouge_l`` item's, and a new-task item's unless
        ``evaluate.new_task_max_new_tokens`` fixes them, from its reference
        (:meth:`answer_budget`); a probe's ``evaluate.max_new_tokens`` (the model restates the
        question first)."""
        if new_task and self.cfg.new_task_max_new_tokens is not None:
            return self.cfg.new_task_max_new_tokens
        if new_task or ex.scoring == "rouge_l":
            return self.answer_budget(ex)
        return self.cfg.max_new_tokens

    def score(self, examples: Sequence[Example], new_task: bool = False) -> list[dict]:
        """Per-item results ``{"id", "task", "category", "scoring", "output", "correct"}``
        (and ``answered_by`` for a model with tasks), in the order of ``examples``;
        ``new_task``: they are the release's eval items (their budget: :meth:`budget`)."""
        groups: dict[tuple[str | None, int], list[int]] = {}
        for i, ex in enumerate(examples):
            budget = self.budget(ex, new_task) if ex.scoring in GENERATION_KINDS else 0
            groups.setdefault((self.route(ex.task), budget), []).append(i)
        outputs: dict[int, str] = {}
        with Progress(transient=True) as bar:
            job = bar.add_task(f"scoring {self.model_dir.name}", total=len(examples))
            for (route, max_new_tokens), indices in groups.items():
                keys = {
                    i: item_key(examples[i], route, max_new_tokens, self.chat, self.conditions)
                    for i in indices
                }
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
            results = [r | {"answered_by": self.route(r["task"]) or DEFAULT} for r in results]
        return results

    def _answering(self, route: str | None):
        model, _, router = self._load()
        return nullcontext(model) if route is None else router.answering(route)

    def score_new_task(self, release_dir: Path) -> list[dict]:
        return self.score(load_release(release_dir, "eval"), new_task=True)


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
    step: EvaluateStep, model_dir: Path, probe_path: Path, release_dir: Path, out_dir: Path
) -> Scores:
    """Scores of one model on the probes (per task) and on ``release_dir/eval.jsonl``;
    per-item results go to ``out_dir/{probes,new_task}.jsonl``."""
    start = time.perf_counter()
    scorer = Scorer(step, model_dir)
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
    reference: Sequence[bool],
    candidate: Sequence[bool],
    threshold: float,
    gate: GateConfig,
    needed_known: int,
    against: str = "champion",
) -> TaskRetention:
    """Retention of one probe task from two models' answers to the same items, in order, with
    the exact one-sided test the gate decides on (``flows/scoring/confidence.py``)."""
    pairs = list(zip(reference, candidate, strict=True))
    known = sum(a for a, _ in pairs)
    lost = sum(a and not b for a, b in pairs)
    gained = sum(b and not a for a, b in pairs)
    ref, cand = known / max(1, len(pairs)), sum(b for _, b in pairs) / max(1, len(pairs))
    alpha = gate.alpha
    if gate.gains_offset_losses:
        bound = confidence.net_bound(known, lost, len(pairs) - known, gained, alpha)
        method = "ratio of accuracies, Bonferroni of two exact Clopper-Pearson bounds"
    else:
        bound = confidence.kept_bound(known, lost, alpha)
        method = "share of known items kept, exact Clopper-Pearson (binomial test)"
    return TaskRetention(
        against=against,
        n=len(pairs),
        known=known,
        lost=lost,
        gained=gained,
        reference_score=ref,
        candidate_score=cand,
        retention=retention(cand, ref),
        statistic="net" if gate.gains_offset_losses else "kept",
        value=bound.value,
        low=bound.low,
        high=bound.high,
        threshold=threshold,
        method=f"{method}, one-sided, alpha {alpha:g}",
        needed_known=needed_known,
        passes_reliably_at=confidence.passes_reliably_at(known, threshold, alpha, gate.power),
        too_small=known < needed_known,
    )


def needed_known(step: EvaluateStep, task: str, threshold: float | None = None) -> int:
    """Known items a probe task needs: ``probes.min_known`` when set, else the gate's design
    (a candidate keeping ``gate.design_retention`` passes with probability ``gate.power``)."""
    if step.probes.min_known is not None:
        return step.probes.min_known
    g = step.gate
    return confidence.required_known(
        g.threshold(task) if threshold is None else threshold, g.alpha, g.power, g.design_retention
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


def new_task_items(step: EvaluateStep, release_dir: Path, part: str) -> list[Example]:
    """The new release's eval items the gate (``test``) or a tournament (``dev``) scores. Only a
    tournament splits them (stratified by category, ``probes.dev_fraction``, ``probes.seed``):
    without one nothing is selected, and the gate reads them all."""
    items = load_release(release_dir, "eval")
    if not step.tournament:
        return items
    dev, test = stratified_split(
        items,
        lambda ex: ex.category,
        lambda ex: ex.id,
        step.probes.dev_fraction,
        step.probes.seed,
    )
    return dev if part == "dev" else test


def anchor_of(step: EvaluateStep, champion: ChampionRef, task: str) -> tuple[str, Path]:
    """A probe task's anchor, what its retention is measured from over any number of releases:
    for an earlier release's items, the registered version that learned it (its score when
    learned); for every other task (general knowledge), the base model."""
    from flows.registry.tracking import base_model_dir, model_version_dir

    if task in champion.releases:
        version = champion.learned_by.get(task)
        if version is None:
            raise ValueError(
                f"the champion learned release {task!r} but its registry record does not say "
                "which version learned it (tag learned_by): its anchor is unknown"
            )
        if version == champion.version:
            return f"v{version}", champion.model_dir
        return f"v{version}", model_version_dir(step.store, version)
    return "base", base_model_dir(step.store)


def score_anchors(
    step: EvaluateStep,
    champion: ChampionRef,
    items: Sequence[Example],
    champion_results: Sequence[dict],
    conditions: ScoringConditions,
) -> tuple[dict[str, str], list[dict]]:
    """Each task's anchor and the anchors' per-item results on ``items`` (``anchor`` names the
    model on each row); where the anchor is the champion itself, its results are reused."""
    by_task: dict[str, list[Example]] = {}
    for ex in items:
        by_task.setdefault(ex.task, []).append(ex)
    mine = {(r["task"], r["id"]): r for r in champion_results}
    anchors, rows = {}, []
    models: dict[Path, Scorer] = {}
    for task, examples in sorted(by_task.items()):
        label, model_dir = anchor_of(step, champion, task)
        anchors[task] = label
        if Path(model_dir).resolve() == Path(champion.model_dir).resolve():
            got = [mine[(ex.task, ex.id)] for ex in examples]
        else:
            scorer = models.setdefault(model_dir, Scorer(step, model_dir, conditions))
            got = scorer.score(examples)
        rows += [r | {"anchor": label} for r in got]
    return anchors, rows


def reference_results(
    step: EvaluateStep,
    probe_set: ProbeSet,
    probes: Sequence[Example],
    new_task: Sequence[Example],
    conditions: ScoringConditions,
    anchors: bool,
    out: Path,
) -> tuple[list[dict], list[dict], list[dict]]:
    """The champion's results on ``probes`` and ``new_task`` and, with ``anchors``, the
    anchors' on ``probes``, scored under ``conditions``: read from the probe step when it
    scored them so, else scored again here (a GPU pool that answers in bfloat16 scores the
    champion in bfloat16 too) and written to ``out`` for a reviewer."""
    theirs = probe_set.champion_results
    # a probe set recorded before conditions were (None): scored by this same code's defaults
    if theirs is not None and probe_set.conditions in (None, conditions):
        return (
            read_results(theirs / "probes.jsonl"),
            read_results(theirs / "new_task.jsonl"),
            read_results(probe_set.anchor_results) if anchors and probe_set.anchor_results else [],
        )
    from flows.registry.tracking import (
        candidate_dir,  # a champion folder that gave way to a pointer
    )

    scorer = Scorer(step, candidate_dir(step.store, probe_set.champion.model_dir), conditions)
    champ_probes = scorer.score(probes)
    champ_new = scorer.score(new_task, new_task=True)
    anchor_rows: list[dict] = []
    if anchors and probe_set.anchors:
        _, anchor_rows = score_anchors(step, probe_set.champion, probes, champ_probes, conditions)
    write_results(out / "champion_probes.jsonl", champ_probes)
    write_results(out / "champion_new_task.jsonl", champ_new)
    write_results(out / "anchors.jsonl", anchor_rows)
    return champ_probes, champ_new, anchor_rows


def retention_by_task(
    step: EvaluateStep, reference: Sequence[dict], candidate: Sequence[dict], against: str | None
) -> dict[str, TaskRetention]:
    """Per task, the test of the candidate against ``reference`` (the champion, threshold
    ``gate.min_retention``), or against each row's ``anchor`` when ``against`` is None
    (threshold ``gate.min_retention_vs_anchor``)."""
    gate = step.gate
    label = {r["task"]: r.get("anchor", against) for r in reference}
    out = {}
    for task, (a, b) in sorted(paired(reference, candidate).items()):
        threshold = gate.threshold(task) if against else gate.min_retention_vs_anchor
        need = needed_known(step, task, threshold)
        out[task] = task_retention(a, b, threshold, gate, need, against or label[task])
    return out


def evaluate_candidate(
    step: EvaluateStep,
    candidate_dir: Path,
    probe_set: ProbeSet,
    release_dir: Path,
    run_dir: Path,
    part: str = "test",
    out_dir: Path | None = None,
) -> EvalReport:
    """Score a candidate on one part of the probes and of the new task: ``test`` for the gate,
    ``dev`` for choosing among candidates. References are the champion's results on the same
    items (and on ``test`` each task's anchor's), paired item by item, scored under the
    candidate's conditions."""
    start = time.perf_counter()
    probe_path = probe_set.path if part == "test" else probe_set.dev_path
    if probe_path is None:
        raise ValueError(f"the probe set has no {part} part")
    scorer = Scorer(step, candidate_dir)
    out = out_dir or run_dir / "candidate"
    probe_items = load_probes(probe_path)
    task_items = new_task_items(step, release_dir, part)
    probes = scorer.score(probe_items)
    new_task = scorer.score(task_items, new_task=True)
    write_results(out / "probes.jsonl", probes)
    write_results(out / "new_task.jsonl", new_task)
    champ_probes, champ_new_rows, anchor_rows = reference_results(
        step,
        probe_set,
        probe_items,
        task_items,
        scorer.conditions,
        part == "test",
        out.parent / "references",
    )
    scores = accuracy_by_task(probes)
    tasks = retention_by_task(step, champ_probes, probes, "champion")
    champ_new, cand_new = next(iter(paired(champ_new_rows, new_task).values()), ([], []))
    alpha = step.gate.alpha
    return EvalReport(
        scores=scores,
        baseline={t: s.reference_score for t, s in tasks.items()},
        retention={t: s.retention for t, s in tasks.items()},
        new_task=release_dir.name,
        new_task_score=accuracy(new_task),
        new_task_baseline=sum(champ_new) / max(1, len(champ_new)),
        new_task_n=len(new_task),
        eval_seconds=time.perf_counter() - start,
        alpha=alpha,
        tasks=tasks,
        anchored=retention_by_task(step, anchor_rows, probes, None) if anchor_rows else {},
        new_task_interval=confidence.proportion_interval(sum(cand_new), len(cand_new), alpha),
        new_task_gain_interval=confidence.paired_difference(champ_new, cand_new, alpha),
        conditions=scorer.conditions,
    )
