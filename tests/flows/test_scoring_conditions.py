"""Champion and candidate are scored under the same conditions. A candidate whose weights answer
in bfloat16 (as one trained in bf16 does, or any model on a GPU) is paired with the champion's
answers in bfloat16 too, scored again at the evaluate step; the score cache keeps the two
dtypes' answers apart."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from flows.core.config import load_params
from flows.core.data import load_probes, write_jsonl
from flows.core.records import ChampionRef, ProbeSet, ScoringConditions
from flows.scoring.score_cache import item_key
from flows.steps.evaluate import (
    EvaluateStep,
    Scorer,
    evaluate_candidate,
    read_results,
    write_results,
)
from tests.conftest import write_params

FP32 = ScoringConditions(dtype="float32", device="cpu")
BF16 = ScoringConditions(dtype="bfloat16", device="cpu")


@pytest.fixture
def bf16_candidate(tmp_path, tiny_model_dir):
    folder = tmp_path / "candidate"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(folder)  # config.json says bfloat16: it answers in bfloat16
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


def test_the_champion_is_scored_again_in_the_candidates_dtype(
    tmp_path, tiny_model_dir, demo_dir, bf16_candidate
):
    params = load_params(write_params(tmp_path, tiny_model_dir, demo_dir))
    items = load_probes(demo_dir / "probes" / "general_knowledge.jsonl")[:24]
    probe_path = write_jsonl(
        tmp_path / "probes.jsonl",
        [
            {"id": e.id, "prompt": e.prompt_text, "answers": e.answers, "task": e.task}
            | ({"choices": e.choices, "scoring": e.scoring} if e.choices else {})
            for e in items
        ],
    )
    release = demo_dir / "releases" / "wiki-topics-1"
    champion = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    assert champion.conditions == FP32
    baseline = tmp_path / "run" / "baseline"
    write_results(baseline / "probes.jsonl", champion.score(load_probes(probe_path)))
    write_results(baseline / "new_task.jsonl", champion.score_new_task(release))
    probe_set = ProbeSet(
        path=probe_path,
        dvc_hash="-",
        n_items=len(items),
        tasks=["general-knowledge"],
        baseline={},
        new_task_baseline=0.0,
        champion=ChampionRef(version=None, model_dir=tiny_model_dir),
        champion_results=baseline,
        conditions=FP32,
    )
    report = evaluate_candidate(
        EvaluateStep.from_params(params), bf16_candidate, probe_set, release, tmp_path / "run"
    )
    assert report.conditions == BF16
    # The champion was answered again in bfloat16, and that is what the candidate was paired with.
    again = read_results(tmp_path / "run" / "references" / "champion_probes.jsonl")
    in_bf16 = Scorer(EvaluateStep.from_params(params), tiny_model_dir, BF16).score(
        load_probes(probe_path)
    )
    assert [r["output"] for r in again] == [r["output"] for r in in_bf16]
    assert report.baseline["general-knowledge"] == sum(r["correct"] for r in in_bf16) / len(items)
    # One model, two dtypes: its cache holds both answers to each item, under two keys.
    answers = Scorer(EvaluateStep.from_params(params), tiny_model_dir).cache.answers
    for ex in load_probes(probe_path):
        keys = [item_key(ex, None, params.evaluate.max_new_tokens, False, c) for c in (FP32, BF16)]
        assert keys[0] != keys[1] and all(k in answers for k in keys)
