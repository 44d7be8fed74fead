"""Shared fixtures: a tiny model, the demo data, and a params file whose workspace, MLflow
store (SQLite) and DVC remote live in a temporary folder."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.demo_data import build_demo
from flows.workspace import quiet_env
from tests.tiny_llm import build_tiny_llm

quiet_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

# Bad inputs the tests actually fed to the pipeline, by kind; reported at the end of the run.
BAD_INPUTS: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter) -> None:
    if BAD_INPUTS:
        terminalreporter.write_sep("-", f"bad inputs tried: {sum(BAD_INPUTS.values())}")
        for kind, n in sorted(BAD_INPUTS.items()):
            terminalreporter.write_line(f"  {kind}: {n}")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_dir) -> Path:
    corpus = []
    for f in sorted(demo_dir.rglob("*.jsonl")):
        corpus += [json.dumps(json.loads(line)) for line in f.open()]
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), corpus)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_params(tmp_path: Path, tiny_model_dir: Path, demo_dir: Path, **sections) -> Path:
    """A params.yaml for the tiny model; ``sections`` override whole keys of a section."""
    params = {
        "workspace": str(tmp_path / "workspace"),
        "model": {"base": str(tiny_model_dir), "use_chat_template": False},
        "data": {"demo_dir": str(demo_dir)},
        "probes": {"per_category": 8},
        "train": {
            "max_steps": 40,
            "batch_size": 8,
            "learning_rate": 0.02,
            "max_length": 160,
            "lora": {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR},
        },
        "evaluate": {"batch_size": 32, "max_new_tokens": 6, "new_task_max_new_tokens": 4},
        "gate": {"min_retention": 0.0, "min_new_task_score": 0.0},
        "versioning": {"remote": str(tmp_path / "dvc-remote")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            params[section] = {**params[section], **values}
        else:
            params[section] = values
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def params_file(tmp_path, tiny_model_dir, demo_dir) -> Path:
    return write_params(tmp_path, tiny_model_dir, demo_dir)
