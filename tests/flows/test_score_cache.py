"""No item is scored twice on one model version: answers are cached by the model's content and
what it is asked, and judged again from the item's answers each time."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from flows.core.config import load_params
from flows.core.data import load_probes, load_release
from flows.scoring.score_cache import model_key
from flows.steps.evaluate import EvaluateStep, Scorer
from tests.conftest import write_params


@pytest.fixture
def params(tmp_path, tiny_model_dir, demo_dir):
    return load_params(write_params(tmp_path, tiny_model_dir, demo_dir))


@pytest.fixture
def items(demo_dir):
    """Generation and choice probes, and new-task items (a different max_new_tokens)."""
    probes = load_probes(demo_dir / "probes" / "general_knowledge.jsonl")
    kinds = {p.scoring for p in probes}
    assert kinds == {"generate", "choice"}
    return [p for p in probes if p.scoring == "generate"][:6] + [
        p for p in probes if p.scoring == "choice"
    ][:6]


def test_a_second_scoring_reads_every_answer_without_loading_the_model(
    params, tiny_model_dir, items, demo_dir
):
    first = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    results = first.score(items)
    assert (first.cached, first.scored) == (0, 12)
    again = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    assert again.score(items) == results
    assert (again.cached, again.scored) == (12, 0)
    assert again._loaded is None  # never loaded: every answer came from the cache
    # A new item is scored (and only it); the new-task settings are their own entries.
    release = demo_dir / "releases" / "wiki-topics-1"
    again.score_new_task(release)
    assert again.scored == len(load_release(release, "eval")) and again._loaded is not None


def test_another_model_or_other_settings_miss_the_cache(params, tiny_model_dir, items, tmp_path):
    Scorer(EvaluateStep.from_params(params), tiny_model_dir).score(items)
    changed = tmp_path / "changed-model"
    shutil.copytree(tiny_model_dir, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert model_key(changed) != model_key(tiny_model_dir)
    other = Scorer(EvaluateStep.from_params(params), changed)
    other.score(items)
    assert (other.cached, other.scored) == (0, 12)
    more = params.with_overrides({"evaluate.max_new_tokens": params.evaluate.max_new_tokens + 3})
    longer = Scorer(EvaluateStep.from_params(more), tiny_model_dir)
    longer.score(items)
    assert (longer.cached, longer.scored) == (6, 6)  # choices do not generate: still cached
    off = Scorer(
        EvaluateStep.from_params(params.with_overrides({"evaluate.score_cache": False})),
        tiny_model_dir,
    )
    off.score(items)
    assert (off.cached, off.scored) == (0, 12) and off.cache is None
    # A hub id is not a folder whose content can be hashed: never cached (nor loaded here).
    assert Scorer(EvaluateStep.from_params(params), "some-org/some-model").cache is None
    with pytest.raises(ValueError, match="not a model folder"):
        model_key(tmp_path / "no-such-model")


def test_cached_answers_are_judged_again_against_the_items_answers(params, tiny_model_dir, items):
    results = Scorer(EvaluateStep.from_params(params), tiny_model_dir).score(items)
    # The same question with its answer list changed to what the model said: now right.
    relabelled = [
        dataclasses.replace(ex, answers=[r["output"].strip() or "x"])
        for ex, r in zip(items, results, strict=True)
    ]
    scorer = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    again = scorer.score(relabelled)
    assert scorer.scored == 0 and all(r["correct"] for r in again)
    assert [r["output"] for r in again] == [r["output"] for r in results]


def test_a_line_cut_short_by_a_crash_is_scored_again(params, tiny_model_dir, items):
    scorer = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    scorer.score(items)
    lines = scorer.cache.path.read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["output"] is not None for line in lines)
    scorer.cache.path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    again = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    again.score(items)
    assert (again.cached, again.scored) == (11, 1)
