"""Step 5, evaluate: score the candidate on the probe set and the new release's eval set.

Retention per probe task = candidate score / baseline score (the champion's, from step 3).
Per-item outputs are written beside the scores so a reviewer can read what the model said.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from flows.config import Params
from flows.data import load_probes, load_release
from flows.modeling import load_model
from flows.records import EvalReport, ProbeSet
from flows.scoring import accuracy_by_task, score_examples


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
    model, tokenizer = load_model(model_dir)
    cfg, chat = params.evaluate, params.model.use_chat_template
    probes = load_probes(probe_path)
    new_task = load_release(release_dir, "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    with Progress(transient=True) as bar:
        job = bar.add_task(f"scoring {Path(model_dir).name}", total=len(probes) + len(new_task))
        advance = lambda n: bar.advance(job, n)  # noqa: E731
        probe_results = score_examples(
            model, tokenizer, probes, chat, cfg.max_new_tokens, cfg.batch_size, advance
        )
        task_results = score_examples(
            model, tokenizer, new_task, chat, cfg.new_task_max_new_tokens, cfg.batch_size, advance
        )
    for name, results in (("probes", probe_results), ("new_task", task_results)):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    new_score = sum(r["correct"] for r in task_results) / max(1, len(task_results))
    return Scores(accuracy_by_task(probe_results), new_score, time.perf_counter() - start)


def retention(score: float, baseline: float) -> float:
    """candidate / baseline; a task the champion scored 0 on cannot be forgotten (1.0)."""
    return score / baseline if baseline > 0 else 1.0


def evaluate_candidate(
    params: Params, candidate_dir: Path, probe_set: ProbeSet, release_dir: Path, run_dir: Path
) -> EvalReport:
    scores = score_model(params, candidate_dir, probe_set.path, release_dir, run_dir / "candidate")
    return EvalReport(
        scores=scores.probe_scores,
        baseline=probe_set.baseline,
        retention={
            t: retention(scores.probe_scores.get(t, 0.0), b) for t, b in probe_set.baseline.items()
        },
        new_task=release_dir.name,
        new_task_score=scores.new_task_score,
        new_task_baseline=probe_set.new_task_baseline,
        eval_seconds=scores.seconds,
    )
