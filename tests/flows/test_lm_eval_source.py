"""A probe task given as an lm-evaluation-harness task configuration over local files gets the
same accuracy from the project as from lm-eval itself, item by item, on the same model."""

from __future__ import annotations

import json

import pytest

from flows.core.data import DataError, probe_example
from flows.core.lm_eval_source import probe_records, read_source
from flows.registry.serving import load
from flows.scoring.scoring import score_examples
from tests.flows.pretrained_tiny import CAPITALS

CONFIG = """\
task: capitals-mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "What is the capital of {{{{country}}}}?"
doc_to_choice: "{{{{options}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_dir(tmp_path):
    countries = sorted(CAPITALS)
    cities = [CAPITALS[c] for c in countries]
    with open(tmp_path / "capitals.jsonl", "w") as f:
        for i, country in enumerate(countries):
            options = [cities[(i + k * 7) % len(cities)] for k in range(4)]
            f.write(json.dumps({"country": country, "options": options, "answer": i % 4}) + "\n")
    # absolute: lm-eval reads a relative data file from its working directory
    (tmp_path / "capitals.yaml").write_text(CONFIG.format(data=tmp_path / "capitals.jsonl"))
    return tmp_path


def test_the_config_becomes_loglik_probe_items(task_dir):
    items = probe_records(task_dir / "capitals.yaml")
    assert len(items) == len(CAPITALS)
    first = items[0]
    assert first["task"] == "capitals-mc" and first["scoring"] == "loglik"
    assert first["prompt"] == f"What is the capital of {sorted(CAPITALS)[0]}?"
    assert first["answers"] == [first["choices"][0]] and first["delimiter"] == " "
    assert [n for n, _ in read_source(task_dir / "capitals.yaml")][:3] == [1, 2, 3]


def test_unsupported_lm_eval_features_are_refused_by_name(task_dir):
    bad = task_dir / "fewshot.yaml"
    config = (task_dir / "capitals.yaml").read_text()
    bad.write_text(config + "process_docs: !function utils.process\n")
    with pytest.raises(DataError, match="not an lm-eval task configuration"):
        probe_records(bad)
    bad.write_text(config + "fewshot_split: test\n")
    with pytest.raises(DataError, match=r"not supported here: \['fewshot_split'\]"):
        probe_records(bad)


def test_accuracy_equals_lm_evals_own(task_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load(tiny_model_dir, device="cpu")
    examples = [probe_example(r) for r in probe_records(task_dir / "capitals.yaml")]
    ours = [r["correct"] for r in score_examples(model, tokenizer, examples, False, 6, 8)]

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    out = simple_evaluate(
        model=lm,
        tasks=["capitals-mc"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )
    samples = sorted(out["samples"]["capitals-mc"], key=lambda s: s["doc_id"])
    theirs = [bool(s["acc"]) for s in samples]
    assert ours == theirs  # item by item
    accuracy = out["results"]["capitals-mc"]["acc,none"]
    assert sum(ours) / len(ours) == pytest.approx(accuracy)
    assert 0 < accuracy < 1  # a random tiny model: neither all right nor all wrong
