"""Step 4b, tournament: train several strategies and strengths, choose one on the dev probes.

``train.candidates`` maps a strategy spec to a grid of its options; every combination is a
candidate::

    candidates:
      lwf: {alpha: [0.15, 0.5, 1.0]}            # three candidates
      lwf+self_rehearsal: {lwf.alpha: [0.15]}   # options of a combination name their strategy
      ewc: {lambda_: [1.0e4, 1.0e6]}
      naive: {}                                 # one candidate, its options from strategy_params

Each candidate is fine-tuned from the champion (its options laid over ``train.strategy_params``)
and scored on the **dev** probes and the dev half of the new release's eval set, never on the
test parts. The rule that picks the winner:

1. eligible: every dev retention (point estimate) meets its threshold, the dev new-task score
   meets ``gate.min_new_task_score`` (and beats the champion's with ``gate.beat_champion``);
2. the winner is the eligible candidate with the best dev new-task score; ties go to the higher
   lowest retention, then to the earlier candidate in ``params.yaml``;
3. with no eligible candidate, the one with the highest lowest retention (the least forgetting)
   goes forward, and the gate will most likely block it: that is reported, not hidden.

Only the winner is scored on the test parts and gated; it is the registered version. Every
candidate becomes a child run of the retrain's MLflow run.

Candidates that differ only in ``wise.mix`` (the WiSE-FT merge coefficient, e.g.
``{lwf+wise: {wise.mix: [0.4, 0.6, 0.8, 1.0]}}``) share one fine-tune: it is trained once at
``mix`` = 1 and each coefficient's weights are interpolated from the champion's and the trained
ones afterwards (:func:`interpolate`), so that searching the coefficient on dev costs one
scoring per coefficient, not one training.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cf_strategies import split_spec
from cf_strategies.registry import strategy_options
from flows.core.config import GateConfig, TrainConfig, grid, laid_over
from flows.core.records import EvalReport, Record, TrainResult
from flows.registry.serving import ADAPTER_PARENT


class Candidate(Record):
    label: str  # e.g. "lwf alpha=0.15"
    strategy: str
    strategy_params: dict[str, dict[str, Any]]  # the full strategy_params it trains with


class CandidateResult(Record):
    candidate: Candidate
    trained: TrainResult
    dev: EvalReport
    eligible: bool
    min_retention: float  # lowest dev retention over probe tasks
    winner: bool = False
    note: str = ""


def expand_candidates(train: TrainConfig) -> list[Candidate]:
    """The candidates of ``train.candidates``, in the order written."""
    out = []
    for spec, options in train.candidates.items():
        for chosen in grid(spec, options or {}):
            merged = laid_over(train.strategy_params, chosen)
            shown = " ".join(
                f"{k if len(split_spec(spec)) == 1 else f'{s}.{k}'}={v}"
                for s, opts in chosen.items()
                for k, v in opts.items()
            )
            out.append(
                Candidate(label=f"{spec} {shown}".strip(), strategy=spec, strategy_params=merged)
            )
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"train.candidates lists a candidate twice: {labels}")
    return out


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", label)


def judge(candidate: Candidate, trained: TrainResult, dev: EvalReport, gate: GateConfig):
    """The candidate's dev result and whether it meets every threshold on dev."""
    low = min(dev.retention.values(), default=1.0)
    kept = all(
        r >= gate.min_retention_per_task.get(t, gate.min_retention)
        for t, r in dev.retention.items()
    )
    learned = dev.new_task_score >= gate.min_new_task_score and (
        not gate.beat_champion or dev.new_task_score > dev.new_task_baseline
    )
    return CandidateResult(
        candidate=candidate,
        trained=trained,
        dev=dev,
        eligible=kept and learned,
        min_retention=low,
        note="" if kept and learned else ("forgets on dev" if not kept else "misses the new task"),
    )


def choose(results: list[CandidateResult]) -> list[CandidateResult]:
    """The results with the winner marked, by the rule of this module's docstring."""
    eligible = [i for i, r in enumerate(results) if r.eligible]
    if eligible:
        best = max(
            eligible,
            key=lambda i: (results[i].dev.new_task_score, results[i].min_retention, -i),
        )
    else:
        best = max(range(len(results)), key=lambda i: (results[i].min_retention, -i))
    note = "" if eligible else "no candidate met every threshold on dev; the least forgetting"
    return [
        r.model_copy(update={"winner": i == best, "note": note if i == best else r.note})
        for i, r in enumerate(results)
    ]


def summary_rows(results: list[CandidateResult]) -> list[dict]:
    """What the report's trade-off plot and table show, one dict per candidate."""
    return [
        {
            "label": r.candidate.label,
            "new_task_score": r.dev.new_task_score,
            "min_retention": r.min_retention,
            "winner": r.winner,
            "note": r.note,
        }
        for r in results
    ]


def candidate_dir(run_dir: Path, candidate: Candidate) -> Path:
    return run_dir / "candidates" / folder_name(candidate.label)


def merge_groups(candidates: list[Candidate]) -> list[tuple[Candidate, list[Candidate]]]:
    """``(what to train, the candidates it serves)``: candidates alike but for ``wise.mix`` share
    one training at ``mix`` = 1 (module doc); any other candidate trains for itself."""
    groups: dict[str, tuple[Candidate, list[Candidate]]] = {}
    for c in candidates:
        if "wise" not in split_spec(c.strategy):
            groups[c.label] = (c, [c])
            continue
        trained = laid_over(c.strategy_params, {"wise": {"mix": 1.0}})
        key = json.dumps([c.strategy, trained], sort_keys=True)
        label = f"{c.strategy} trained once for wise.mix"
        groups.setdefault(
            key, (Candidate(label=label, strategy=c.strategy, strategy_params=trained), [])
        )[1].append(c)
    return list(groups.values())


def merge_coefficient(candidate: Candidate) -> float | None:
    """The candidate's ``wise.mix`` (the strategy's default when not given); None without wise."""
    if "wise" not in split_spec(candidate.strategy):
        return None
    mix = candidate.strategy_params.get("wise", {}).get("mix", strategy_options("wise")["mix"])
    return float(mix)


def interpolate(start_dir: Path, trained: TrainResult, mix: float, out: Path) -> TrainResult:
    """WiSE-FT after the fact: ``θ⁰ + mix · (θ − θ⁰)`` as a model folder at ``out``, from the
    weights training started from (``start_dir``, the champion) and the trained candidate's.
    A LoRA adapter candidate (``registry.weights: adapter``) has its B matrices scaled by ``mix``
    instead, which is the same update (ΔW = B·A). The folder is the trained one's otherwise
    (tokenizer, config, strategy state)."""
    source = Path(trained.model_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if (source / ADAPTER_PARENT).is_file():
        path = tmp / "adapter_model.safetensors"
        weights = load_file(path)
        scaled = {
            k: v * mix if "lora_B" in k or "lora_embedding_B" in k else v
            for k, v in weights.items()
        }
        save_file(scaled, path, metadata={"format": "pt"})
    else:
        start = _weights(start_dir)
        for path in sorted(tmp.glob("*.safetensors")):
            tuned = load_file(path)
            missing = sorted(set(tuned) - set(start))
            if missing:
                raise ValueError(
                    f"{start_dir} has no weight {missing[0]} of the candidate: the merge needs "
                    "the weights training started from"
                )
            merged = {
                k: start[k].float().lerp(v.float(), mix).to(v.dtype) for k, v in tuned.items()
            }
            save_file(merged, path, metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return trained.model_copy(update={"model_dir": out})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no safetensors weights to merge from")
    return {k: v for f in files for k, v in load_file(f).items()}
