"""The input boundaries hold: pipes, devices, link loops, deep trees, YAML bombs and duplicate
keys get a clear error at once (file, line, rule), through the functions and the CLI a user types.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from flows.core.config import MAX_CANDIDATES, ParamsError, load_params
from flows.core.data import DataError, read_jsonl
from flows.core.files import MAX_DEPTH, walk
from flows.core.lm_eval_source import read_source
from flows.core.records import ChampionRef
from flows.steps.probes import probe_items, stratified
from flows.steps.validate import (
    ValidateStep,
    validate_probe_source,
    validate_release,
    validate_step,
)
from tests.conftest import BAD_INPUTS, write_params

BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def rejected_quickly(text: str, tmp_path: Path) -> str:
    """The ParamsError of a params file, checked to come in under a second and 100 MB."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        load_params(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()  # measured apart: tracing slows the parser several times
    try:
        with pytest.raises(ParamsError):
            load_params(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    BAD_INPUTS["params bombs and nonsense (load_params)"] += 1
    assert seconds < 1.0 and peak < 100e6, (seconds, peak)
    assert len(str(err.value)) < 2000, "the message must not print the expanded value"
    return str(err.value)


# --- params.yaml -------------------------------------------------------------------------------


def test_billion_laughs_is_refused_at_the_first_anchor(tmp_path):
    message = rejected_quickly(
        f"train:\n  strategy: lwf\n  strategy_params:\n    lwf:\n      x:\n{BILLION_LAUGHS}\n",
        tmp_path,
    )
    assert "anchors and aliases" in message and ":6:" in message


def test_a_huge_candidate_grid_is_counted_not_built(tmp_path):
    values = "[" + ", ".join(str(0.1 * i) for i in range(1, 21)) + "]"
    grid = "".join(f"      {o}: {values}\n" for o in ("alpha", "temperature"))
    grid += "      positions: [labels, all]\n      classes: [all, seen]\n"
    message = rejected_quickly(f"train:\n  candidates:\n    lwf:\n{grid}", tmp_path)
    assert f"expands to 1600 candidates, over the limit of {MAX_CANDIDATES}" in message


def test_deep_nesting_is_refused(tmp_path):
    message = rejected_quickly("train: " + "[" * 5000 + "]" * 5000 + "\n", tmp_path)
    assert "nested deeper than" in message
    message = rejected_quickly(
        "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  x\n", tmp_path
    )
    assert "nested deeper than" in message


@pytest.mark.parametrize(
    "text, first, again",
    [
        ("model:\n  trust_remote_code: false\n  trust_remote_code: true\n", 2, 3),
        ("train:\n  strategy: lwf\ngate:\n  alpha: 0.05\ntrain:\n  strategy: naive\n", 1, 5),
    ],
    ids=["trust_remote_code twice", "a second train section"],
)
def test_a_duplicate_key_names_both_lines(text, first, again, tmp_path):
    message = rejected_quickly(text, tmp_path)
    assert f"first on line {first}, again on line {again}" in message


@pytest.mark.parametrize(
    "text, expect",
    [
        ("train:\n  max_steps: '30'\n", "not a string"),
        ("train:\n  learning_rate: 1e9\n", "less than or equal to 1"),
        ("gate:\n  min_new_task_score: 2.0\n", "less than or equal to 1"),
        (
            "train:\n  strategy: lwf\n  strategy_params: {lwf: {alpha: .inf}}\n",
            "finite number",
        ),
        (
            "train:\n  strategy: lwf\n  strategy_params: {lwf: {alpha: '2'}}\n",
            "valid number",
        ),
        ("tracking:\n  uri: ftp://somewhere/mlflow\n", "unknown tracking URI scheme 'ftp'"),
        ("root: /elsewhere\n", "root: is set from the file's folder"),
    ],
    ids=[
        "a quoted number",
        "learning rate 1e9",
        "a new-task target of 2",
        "an infinite distillation weight",
        "a quoted strategy option",
        "an unknown URI scheme",
        "root written",
    ],
)
def test_accepted_nonsense_is_refused(text, expect, tmp_path):
    assert expect in rejected_quickly(text, tmp_path)


def test_yaml_12_numbers_are_numbers(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "train:\n  learning_rate: 2e-4\n  strategy: ewc\n  strategy_params:\n    ewc: {lambda_: 1e3}\n"
    )
    params = load_params(path)
    assert params.train.learning_rate == 2e-4
    assert params.train.strategy_params["ewc"]["lambda_"] == 1000.0


def test_folders_that_cannot_be_folders_are_named(tmp_path):
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "params.yaml"
    for text, expect in [
        ("workspace: /dev/null\n", "workspace: /dev/null is a device"),
        ("model:\n  cache_dir: a-file\n", f"model.cache_dir: {tmp_path / 'a-file'} is a file"),
        ("data:\n  demo_dir: a-file/below\n", "is a file, not a folder, and it is on the path"),
    ]:
        path.write_text(text)
        with pytest.raises(ParamsError, match="invalid params") as err:
            load_params(path)
        BAD_INPUTS["params paths (load_params)"] += 1
        assert expect in str(err.value), str(err.value)


def test_the_cli_says_what_is_wrong_with_the_params_path(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    os.mkfifo(tmp_path / "pipe.yaml")
    for name, expect in [("dir.yaml", "is a directory"), ("pipe.yaml", "named pipe (FIFO)")]:
        out = cli("--params", name, "status", cwd=tmp_path, timeout=60)
        BAD_INPUTS["params paths (CLI)"] += 1
        assert out.returncode == 2 and expect in out.stdout, out.stdout + out.stderr
        assert "Traceback" not in out.stderr


# --- files and folders ------------------------------------------------------------------------


def test_only_regular_files_are_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    for name, expect in [
        ("pipe.jsonl", "is a named pipe (FIFO), not a regular file"),
        ("dir.jsonl", "is a directory, not a regular file"),
        ("loop.jsonl", "symbolic link loop"),
        ("dangling.jsonl", "dangling symbolic link"),
        ("missing.jsonl", "file is missing"),
    ]:
        with pytest.raises(DataError, match=re.escape(expect)):
            read_jsonl(tmp_path / name)
    with pytest.raises(DataError, match="is a character device"):
        read_jsonl(Path("/dev/zero"))


def test_a_line_over_the_limit_is_named(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"id": 1}\n' + '{"id": "' + "x" * 1_100_000 + '"}\n')
    with pytest.raises(DataError, match=r"big.jsonl:2: line is longer than 1000000 bytes"):
        read_jsonl(path)


def test_a_deep_folder_tree_is_bounded_without_recursion(tmp_path):
    folder = tmp_path / "deep"
    node = folder
    for _ in range(MAX_DEPTH + 3):
        node = node / "d"
    node.mkdir(parents=True)
    with pytest.raises(DataError, match=f"nested deeper than {MAX_DEPTH} levels"):
        list(walk(folder))


@pytest.fixture
def release_and_params(tmp_path, demo_dir):
    release = tmp_path / "release"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    params = write_params(tmp_path, model, demo_dir, workspace=str(tmp_path / "ws"))
    return release, params


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_a_release_of_pipes_links_and_deep_folders_is_rejected_at_once(release_and_params):
    release, params_file = release_and_params
    replace_with_fifo(release / "train.jsonl")
    (release / "eval.jsonl").unlink()
    (release / "eval.jsonl").mkdir()
    deep = release / "notes"
    for _ in range(40):
        deep = deep / "n"
    deep.mkdir(parents=True)
    champion = ChampionRef(version=None, model_dir=params_file.parent, releases=[])
    start = time.perf_counter()
    report = validate_step(ValidateStep.from_params(load_params(params_file)), release, champion)
    BAD_INPUTS["release folders (pipes, folders, depth)"] += 1
    assert time.perf_counter() - start < 60
    rules = {(Path(v.file).name, v.rule) for v in report.violations}
    assert ("train.jsonl", "is a named pipe (FIFO), not a regular file") in rules, rules
    assert ("eval.jsonl", "is a directory, not a regular file") in rules, rules
    assert ("release", f"folders nested deeper than {MAX_DEPTH} levels") in rules, rules


def test_a_rehearsal_file_that_is_a_pipe_is_rejected(release_and_params, tmp_path):
    release, params_file = release_and_params
    os.mkfifo(tmp_path / "prompts.jsonl")
    params = load_params(params_file).with_overrides(
        {
            "train.strategy": "self_rehearsal",
            "train.rehearsal_prompts": str(tmp_path / "prompts.jsonl"),
        }
    )
    champion = ChampionRef(version=None, model_dir=params_file.parent, releases=[])
    report = validate_step(ValidateStep.from_params(params), release, champion)
    BAD_INPUTS["rehearsal prompts (pipe)"] += 1
    assert any(
        v.file.endswith("prompts.jsonl") and "named pipe" in v.rule for v in report.violations
    ), report.violations


def test_the_cli_prints_a_release_path_with_markup_as_it_is(release_and_params):
    release, params_file = release_and_params
    odd = release.parent / "a[" / "b]" / "rel[red]" / "release"  # the path holds "[/b]"
    odd.parent.mkdir(parents=True)
    release.rename(odd)
    out = cli("--params", str(params_file), "validate", str(odd), cwd=params_file.parent)
    BAD_INPUTS["release path with console markup (CLI)"] += 1
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{odd}: valid" in out.stdout.replace("\n", "")


def test_set_values_are_read_by_the_same_strict_loader(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 3\n")
    for value, expect in [
        ("{a: &x [1, 2], b: *x}", "anchors and aliases"),
        ("{a: 1, a: 2}", "duplicate key 'a'"),
        ("[" * 500 + "]" * 500, "nested deeper than"),
    ]:
        out = cli("run", "--set", f"train.strategy_params={value}", cwd=tmp_path, timeout=120)
        BAD_INPUTS["--set values (CLI)"] += 1
        assert out.returncode == 2 and expect in out.stdout, out.stdout + out.stderr
        assert "Traceback" not in out.stderr


def test_a_file_store_is_refused_with_what_to_use(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    path = tmp_path / "params.yaml"
    for uri in ("./mlruns", "file:///tmp/mlruns"):
        path.write_text(f"tracking:\n  uri: {uri}\n")
        with pytest.raises(ParamsError, match="is a file store") as err:
            load_params(path)
        assert "sqlite:///" in str(err.value)


@pytest.mark.parametrize(
    "template, expect",
    [
        ("{{ 'a' * 10**9 }}", "may not build a text this long"),
        ("{{ 9 ** 99999 }}", "too large for a template"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ],
    ids=["a gigabyte string", "a huge power", "Python internals"],
)
def test_an_lm_eval_template_runs_sandboxed_and_bounded(template, expect, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"q": "Which?", "choices": ["a", "b"]}\n')
    config = tmp_path / "task.yaml"
    config.write_text(
        "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: docs.jsonl}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        f'doc_to_text: "{template}"\ndoc_to_choice: choices\ndoc_to_target: 0\n'
    )
    BAD_INPUTS["lm-eval templates (read_source)"] += 1
    start = time.perf_counter()
    with pytest.raises(DataError, match=expect):
        read_source(config)
    assert time.perf_counter() - start < 1.0


# --- probe sources ------------------------------------------------------------------------------

PROBE = {"id": "p1", "prompt": "What is the capital of Ghana?", "answers": ["Accra"], "task": "gk"}
PROBE_CASES = [
    ({"id": ["p", 1]}, "id must be"),
    ({"category": None}, "category must be a string"),
    ({"category": ["capitals"]}, "category must be a string"),
    ({"category": "cap\x07itals"}, "category contains"),
    ({"answers": ["Acc\ud800ra"]}, "answers contains an unpaired surrogate"),
    ({"choices": ["Accra", "Ku\udc00masi"], "scoring": "choice"}, "choices contains"),
    ({"task": "capitals (world)"}, "task must be 1..100 letters"),
    ({"task": "gk/../x"}, "task must be 1..100 letters"),
    ({"prompt": "\u200b\u2060\u3164"}, "prompt must not be blank"),
    ({"answer": ["Accra"]}, "unknown field 'answer'"),
    ({"scoring": "choice"}, "choice probes need 2+ choices"),
    ({"prompt": 30}, "prompt must be a string"),
]


@pytest.mark.parametrize(
    "change, expect", PROBE_CASES, ids=[next(iter(c)) + ": " + e for c, e in PROBE_CASES]
)
def test_a_bad_probe_item_is_rejected_before_it_can_crash_sampling(change, expect, tmp_path):
    source = tmp_path / "probes.jsonl"
    record = {**PROBE, **change}
    source.write_bytes(
        json.dumps({**PROBE, "id": "p0"}).encode()
        + b"\n"
        + json.dumps(record).encode("utf-8", "surrogatepass")
        + b"\n"
    )
    report = validate_probe_source(source)
    BAD_INPUTS["bad probe items (validate_probe_source)"] += 1
    assert any(v.line == 2 and expect in v.rule for v in report.violations), report.violations
    with pytest.raises(DataError, match=re.escape(f"{source}:2: ")):
        probe_items(source)


def test_numeric_probe_ids_are_sampled_as_text(tmp_path):
    source = tmp_path / "probes.jsonl"
    items = [{**PROBE, "id": 7}, {**PROBE, "id": "7b", "prompt": "What is the capital of Peru?"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in items))
    assert validate_probe_source(source).passed
    got = probe_items(source)
    assert [r["id"] for r in got] == ["7", "7b"]
    assert len(stratified(got, per_group=5, seed=0)) == 2


def test_a_nul_in_a_path_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    for text, key in [
        ('workspace: "ws\\0x"\n', "workspace"),
        ('probes:\n  sources: ["a\\0b.jsonl"]\n', "probes.sources"),
        ('train:\n  strategy: lwf\n  strategy_params: {lwf: {teacher: "a\\x07"}}\n', "train"),
    ]:
        path.write_text(text)
        with pytest.raises(ParamsError, match="contains a control character") as err:
            load_params(path)
        BAD_INPUTS["params paths (load_params)"] += 1
        assert f"  {key}" in str(err.value), str(err.value)
    with pytest.raises(DataError, match="the path holds a NUL character"):
        read_jsonl(Path("a\0b"))


def test_forgetless_run_on_a_broken_release_says_so_in_one_line(tmp_path, tiny_model_dir, demo_dir):
    release = tmp_path / "broken"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    with open(release / "train.jsonl", "a") as f:
        f.write('{"id": 1\n')
    params = write_params(tmp_path, tiny_model_dir, demo_dir)
    out = cli("--params", str(params), "run", "--release", str(release), cwd=tmp_path, timeout=300)
    BAD_INPUTS["broken release through forgetless run"] += 1
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.jsonl:241: not valid JSON" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]


def test_the_printed_json_schema_accepts_the_demo_and_refuses_a_misspelt_key(tmp_path, demo_dir):
    """`forgetless schema` prints the declared schema; it agrees with validation on the demo."""
    import jsonschema

    schemas = {}
    for kind in ("release", "probe", "rehearsal", "params"):
        out = cli("schema", kind, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        schemas[kind] = json.loads(out.stdout)
        assert schemas[kind]["additionalProperties"] is False
    for split in ("train", "eval"):
        for _, r in read_jsonl(demo_dir / "releases" / "wiki-topics-1" / f"{split}.jsonl"):
            jsonschema.validate(r, schemas["release"])
    for _, r in read_jsonl(demo_dir / "probes" / "country_facts.jsonl"):
        jsonschema.validate(r, schemas["probe"])
    for _, r in read_jsonl(demo_dir / "rehearsal" / "general_prompts.jsonl"):
        jsonschema.validate(r, schemas["rehearsal"])
    with pytest.raises(jsonschema.ValidationError, match="categroy"):
        jsonschema.validate(
            {"id": 1, "prompt": "p", "completion": "c", "categroy": "x"}, schemas["release"]
        )


def test_a_release_path_that_is_no_folder_is_one_clear_violation(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for path, expect in [
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "a-file", "is not a folder"),
    ]:
        report = validate_release(path, [])
        BAD_INPUTS["release path that is no folder (validate_release)"] += 1
        assert [(v.file, v.rule.split(" (")[0]) for v in report.violations] == [(str(path), expect)]
