import json
import shutil

import pytest

from flows.validate import ValidationFailed, validate_probe_source, validate_release

PROBES = ["What is the capital of Ghana?"]


@pytest.fixture
def release(tmp_path, demo_dir):
    folder = tmp_path / "rel"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", folder)
    return folder


def append(folder, fname, *records):
    with open(folder / fname, "a") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return len((folder / fname).read_text().splitlines())  # the line number of the last record


def test_the_demo_release_is_valid(release):
    report = validate_release(release, PROBES)
    assert report.passed and report.checked == {"train.jsonl": 240, "eval.jsonl": 60}


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        ({"id": "a", "prompt": "p"}, "a completion (or final assistant message) is required"),
        ({"id": "a", "completion": "c"}, "a prompt (or messages) is required"),
        ({"prompt": "p", "completion": "c"}, "every record needs an id"),
        ({"id": "a", "prompt": 7, "completion": "c"}, "prompt must be a string"),
        ({"id": "a", "prompt": "", "completion": "c"}, "prompt length must be 1..2000 characters"),
        ({"id": "a", "prompt": "p", "completion": "x" * 501}, "completion length must be 1..500"),
        (
            {"id": "a", "prompt": "p", "completion": "c", "choices": ["d"]},
            "one of the record's choices",
        ),
        ({"id": "a", "messages": [{"role": "user", "content": "hi"}]}, "messages must be a list"),
        (
            {"id": "a", "prompt": "what is the capital of  Ghana?", "completion": "c"},
            "probe leaked",
        ),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a record must be a JSON object"),
    ],
)
def test_each_rule_names_file_line_and_rule(release, record, rule):
    line = append(release, "train.jsonl", record)
    report = validate_release(release, PROBES)
    assert not report.passed
    hits = [v for v in report.violations if rule in v.rule]
    assert hits, [str(v) for v in report.violations]
    assert hits[0].line == line and hits[0].file.endswith("train.jsonl")
    assert f"train.jsonl:{line}" in str(ValidationFailed(report))


def test_duplicate_ids_name_both_lines(release):
    first = json.loads((release / "train.jsonl").read_text().splitlines()[0])
    line = append(release, "train.jsonl", {**first, "prompt": "another prompt"})
    report = validate_release(release, PROBES)
    lines = sorted(v.line for v in report.violations if v.rule == "ids must be unique")
    assert lines == [1, line]


def test_eval_item_also_in_training_is_a_leak(release):
    train = json.loads((release / "train.jsonl").read_text().splitlines()[0])
    line = append(release, "eval.jsonl", {**train, "id": "copy"})
    report = validate_release(release, PROBES)
    [v] = report.violations
    assert v.line == line and "eval leaked into training" in v.rule


def test_chat_messages_are_accepted(release):
    append(
        release,
        "train.jsonl",
        {
            "id": "chat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue"},
            ],
        },
    )
    assert validate_release(release, PROBES).passed


def test_missing_file_and_too_few_records(tmp_path):
    folder = tmp_path / "rel"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        json.dumps({"id": "1", "prompt": "p", "completion": "c"}) + "\n"
    )
    report = validate_release(folder, [], min_records={"train": 8})
    rules = {v.rule for v in report.violations}
    assert "file is missing" in rules and "needs at least 8 records, has 1" in rules


def test_probe_source_rules(tmp_path, demo_dir):
    assert validate_probe_source(demo_dir / "probes" / "general_knowledge.jsonl").passed
    bad = tmp_path / "probes.jsonl"
    bad.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "1", "prompt": "q", "answers": [], "task": "t"},
                {
                    "id": "2",
                    "prompt": "q",
                    "answers": ["a"],
                    "task": "t",
                    "scoring": "choice",
                    "choices": ["b", "c"],
                },
                {"id": "3", "prompt": "q", "answers": ["a"], "task": "t", "scoring": "vibes"},
            ]
        )
        + "\n"
    )
    report = validate_probe_source(bad)
    got = {(v.line, v.rule) for v in report.violations}
    assert got == {
        (1, "answers must be a non-empty list of non-empty strings"),
        (2, "choice probes need 2+ choices that contain every answer"),
        (3, "scoring must be 'generate' or 'choice'"),
    }
