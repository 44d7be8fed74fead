import json
import shutil

import pytest
from mlflow import MlflowClient

from flows.cli.main import main
from flows.core.config import load_params
from flows.core.leaks import LeakIndex
from flows.core.records import FILES, VersionedRelease
from flows.demo.build import PROBE_FILES
from flows.drivers import retrain as retrain_flow
from flows.drivers.stages import run_stage
from flows.registry.tracking import current_champion
from flows.steps.validate import (
    ValidateStep,
    ValidationFailed,
    release_content_hash,
    validate_probe_source,
    validate_release,
    validate_step,
)
from tests.conftest import write_params

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


def test_near_duplicate_prompts_compare_equal():
    index = LeakIndex(["What is the capital of Ghana?"])
    for variant in [
        "  what IS the capital of   Ghana",
        "“What is the capital of Ghana?!”",
        "Ｗｈａｔ ｉｓ the capital of Ghana？",  # full-width (NFKC)
        "What is the capi\u200btal of Ghana?",  # a zero-width space
    ]:
        found = index.find(variant)
        assert found is not None and found.kind == "same", variant
    assert index.find("What is the capital of Ghana? 2").kind != "same"
    assert index.find("What is the capital of Ghanaian food?") is None


def test_content_hash_ignores_ids_order_and_layout(release, tmp_path):
    """Two releases that teach the same records hash alike; another record changes it."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for fname in ("train.jsonl", "eval.jsonl"):
        records = [json.loads(line) for line in (release / fname).read_text().splitlines()]
        lines = [
            json.dumps({**r, "id": f"x{i}"}, sort_keys=True, indent=None, separators=(" ,", " : "))
            for i, r in enumerate(reversed(records))
        ]
        (copy / fname).write_text("\n".join(lines) + "\n\n")
    assert release_content_hash(copy) == release_content_hash(release)
    append(copy, "train.jsonl", {"id": "new", "prompt": "p", "completion": "c"})
    assert release_content_hash(copy) != release_content_hash(release)


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
        (3, "scoring must be 'generate', 'rouge_l', 'choice' or 'loglik'"),
    }


# One validation, three entry points: ``forgetless validate DIR``, the flow's validate task and
# the DVC stage all run ``validate_step`` with the settings of params.yaml.


def first_record(folder, fname="train.jsonl"):
    return json.loads((folder / fname).read_text().splitlines()[0])


def first_probe(demo_dir):
    return json.loads((demo_dir / "probes" / "general_knowledge.jsonl").open().readline())


def missing_completion(release, tmp, demo_dir):
    append(release, "train.jsonl", {"id": "broken", "prompt": "Which topic?"})
    return "a completion (or final assistant message) is required", {}


def duplicated_id(release, tmp, demo_dir):
    append(release, "train.jsonl", {**first_record(release), "prompt": "another prompt"})
    return "ids must be unique", {}


def probe_leaked_into_train(release, tmp, demo_dir):
    prompt = first_probe(demo_dir)["prompt"]
    append(release, "train.jsonl", {"id": "leak", "prompt": prompt, "completion": "x"})
    return "probe leaked into the release", {}


def eval_prompt_in_train(release, tmp, demo_dir):
    append(release, "eval.jsonl", {**first_record(release), "id": "copy"})
    return "eval leaked into training", {}


def too_few_records(release, tmp, demo_dir):
    lines = (release / "eval.jsonl").read_text().splitlines()
    (release / "eval.jsonl").write_text("\n".join(lines[:2]) + "\n")
    return "needs at least 4 records, has 2", {}


def answer_not_among_choices(release, tmp, demo_dir):
    record = {"id": "c", "prompt": "Pick one.", "completion": "c", "choices": ["a", "b"]}
    append(release, "train.jsonl", record)
    return "the completion must be one of the record's choices", {}


def malformed_messages(release, tmp, demo_dir):
    append(release, "train.jsonl", {"id": "m", "messages": [{"role": "user", "content": "hi"}]})
    return "messages must be a list of {role, content} ending with the assistant", {}


def bad_probe_source(release, tmp, demo_dir):
    source = tmp / "my_probes.jsonl"
    source.write_text(
        json.dumps(
            {
                "id": "p1",
                "prompt": "Is the sky green?",
                "answers": ["maybe"],
                "task": "colours",
                "scoring": "choice",
                "choices": ["yes", "no"],
            }
        )
        + "\n"
    )
    general = demo_dir / "probes" / "general_knowledge.jsonl"
    rule = "choice probes need 2+ choices that contain every answer"
    return rule, {"probes": {"per_category": 8, "sources": [str(general), str(source)]}}


def probe_source_without_answers(release, tmp, demo_dir):
    source = tmp / "my_probes.jsonl"
    source.write_text(json.dumps({"id": "p1", "prompt": "Sky?", "task": "colours"}) + "\n")
    rule = "answers must be a non-empty list of non-empty strings"
    return rule, {"probes": {"per_category": 8, "sources": [str(source)]}}


def rehearsal_prompt_is_a_probe(release, tmp, demo_dir):
    prompts = tmp / "rehearsal.jsonl"
    prompts.write_text(json.dumps({"id": "r1", "prompt": first_probe(demo_dir)["prompt"]}) + "\n")
    train = {"strategy": "self_rehearsal", "rehearsal_prompts": str(prompts)}
    return "rehearsal prompt is a probe prompt", {"train": train}


BAD = [
    missing_completion,
    duplicated_id,
    probe_leaked_into_train,
    eval_prompt_in_train,
    too_few_records,
    answer_not_among_choices,
    malformed_messages,
    bad_probe_source,
    probe_source_without_answers,
    rehearsal_prompt_is_a_probe,
]


@pytest.fixture(scope="module")
def shared_workspace(tmp_path_factory):
    """One workspace (and MLflow store) for the entry-point cases: no champion in it."""
    return tmp_path_factory.mktemp("validate-ws") / "workspace"


def test_the_flow_and_the_dvc_stage_run_the_shared_step():
    assert retrain_flow.validate_task.fn is validate_step


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__ for f in BAD])
def test_every_entry_point_rejects_with_the_same_rules(
    make_bad, tmp_path, tiny_model_dir, demo_dir, shared_workspace, capsys
):
    release = (tmp_path / "rel").resolve()
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    rule, sections = make_bad(release, tmp_path, demo_dir)
    params_file = write_params(
        tmp_path, tiny_model_dir, demo_dir, workspace=str(shared_workspace), **sections
    )

    assert main(["--params", str(params_file), "validate", str(release)]) == 1
    printed = "".join(capsys.readouterr().out.split())  # the console wraps long lines

    params = load_params(params_file)
    report = validate_step(
        ValidateStep.from_params(params), release, current_champion(params.model_store)
    )  # the flow's task
    assert not report.passed
    hits = [v for v in report.violations if rule in v.rule]
    assert hits, [str(v) for v in report.violations]
    if "records, has" not in rule:  # a count names the file only
        assert hits[0].file.endswith(".jsonl") and hits[0].line and hits[0].record_id, hits[0]
    for v in report.violations:
        assert "".join(str(v).split()) in printed, (str(v), printed)

    run_dir = tmp_path / "dvc-run"
    VersionedRelease(
        name=release.name, path=release, dvc_hash="-", git_commit="-", remote="-"
    ).write(run_dir / FILES["version"])
    with pytest.raises(ValidationFailed) as err:
        run_stage("validate", params, run_dir)
    assert err.value.report == report


def test_a_valid_release_passes_every_entry_point(
    tmp_path, tiny_model_dir, demo_dir, shared_workspace, capsys
):
    release = demo_dir / "releases" / "wiki-topics-1"
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir, workspace=str(shared_workspace))
    assert main(["--params", str(params_file), "validate", str(release)]) == 0
    assert "valid" in capsys.readouterr().out
    params = load_params(params_file)
    report = validate_step(
        ValidateStep.from_params(params), release, current_champion(params.model_store)
    )
    assert report.passed
    assert report.checked == {
        **{name: len(read_lines(demo_dir / "probes" / name)) for name in PROBE_FILES},
        "train.jsonl": 240,
        "eval.jsonl": 60,
    }


def read_lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.usefixtures("prefect_harness")
def test_a_bad_probe_source_stops_the_run_before_training(tmp_path, tiny_model_dir, demo_dir):
    source = tmp_path / "my_probes.jsonl"
    good = first_probe(demo_dir)
    bad = {**good, "id": "no-answer", "prompt": "Name a prime number.", "answers": []}
    source.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    params_file = write_params(
        tmp_path, tiny_model_dir, demo_dir, probes={"per_category": 8, "sources": [str(source)]}
    )
    with pytest.raises(ValidationFailed) as err:
        retrain_flow.retrain(params_file=str(params_file))
    message = str(err.value)
    assert f"{source}:2 (record 'no-answer')" in message
    assert "answers must be a non-empty list of non-empty strings" in message
    uri = load_params(params_file).tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_model_versions("name='forgetless-lm'") == []
    runs = list((tmp_path / "workspace" / "runs").iterdir())
    assert not any((r / "trainer").exists() for r in runs), "training started on bad probes"
    assert not any((r / FILES["probes"]).exists() for r in runs)
