from pathlib import Path

import pytest

from flows.core.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_shipped_params_load_and_resolve_paths_against_their_folder():
    params = load_params(ROOT / "params.yaml")
    assert params.workspace_dir == ROOT / "workspace"
    assert params.tracking_uri == f"sqlite:///{ROOT / 'workspace' / 'mlflow.db'}"
    assert params.dvc_remote == str(ROOT / "dvc-remote")


def test_misspelt_key_names_the_valid_keys(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "train:\n  max_stepz: 3\n"))
    assert "train.max_stepz" in str(err.value) and "max_steps" in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown strategy 'ewcc'; valid strategies: .*naive"):
        load_params(write(tmp_path, "train:\n  strategy: ewcc\n"))


def test_options_must_name_a_real_strategy_and_real_options(tmp_path):
    text = "train:\n  strategy: naive\n  strategy_params: {other: {x: 1}}\n"
    with pytest.raises(ParamsError, match="unknown strategy 'other'"):
        load_params(write(tmp_path, text))
    text = "train:\n  strategy: naive\n  strategy_params: {ewc: {lamda: 1}}\n"
    with pytest.raises(ParamsError, match="strategy 'ewc': unknown option 'lamda'.*lambda_"):
        load_params(write(tmp_path, text))
    text = "train:\n  strategy: ewc\n  strategy_params: {ewc: {lambda_: abc}}\n"
    with pytest.raises(
        ParamsError,
        match="(?s)params.yaml: .*'ewc': option 'lambda_': Input should be a valid number",
    ):
        load_params(write(tmp_path, text))
    text = "train:\n  strategy: naive\n  strategy_params: {ewc: {lambda_: 1}}\n"
    assert load_params(write(tmp_path, text)).train.strategy == "naive"  # kept for later


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"train.learning_rate: .*greater than 0"):
        load_params(write(tmp_path, "train:\n  learning_rate: -1\n"))


def test_overrides_are_validated_too(tmp_path):
    params = load_params(write(tmp_path, "{}\n"), {"train.max_steps": 5})
    assert params.train.max_steps == 5
    with pytest.raises(ParamsError, match="max_steps"):
        load_params(write(tmp_path, "{}\n"), {"train.max_steps": 0})
