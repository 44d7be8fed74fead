"""Shared fixtures: a tiny model, the demo data, and a params file whose workspace, MLflow
store (SQLite) and DVC remote live in a temporary folder."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.core.workspace import quiet_env
from flows.demo.build import PROBE_FILES, RELEASE_TOPICS, build_demo
from tests.tiny_llm import build_tiny_llm

quiet_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

# What the tests actually threw at the pipeline, by kind and case; one table at the end of the
# run. Each counted case asserts the champion, registry and workspace are as before (or as
# designed) and that the message names the cause.
KINDS = ("bad input", "service fault", "race", "security")
TRIED: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
BAD_INPUTS = TRIED["bad input"]  # tests/flows/test_bad_input*.py add to it directly


def count(kind: str, case: str, n: int = 1) -> None:
    """Count ``n`` cases of ``kind`` (one of ``KINDS``) tried, e.g. ``count("race", "...")``."""
    if kind not in TRIED:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    TRIED[kind][case] += n


def tried_table() -> list[str]:
    """The counts as a table: a row per case, and a total after each kind."""
    rows = []
    for k in (k for k in KINDS if TRIED[k]):
        rows += [(k, case, n) for case, n in sorted(TRIED[k].items())]
        rows.append((k, "all", sum(TRIED[k].values())))
    width = max(len(case) for _, case, _ in rows)
    return [f"  {k:<13}  {case:<{width}}  {n:>5}" for k, case, n in rows]


def pytest_terminal_summary(terminalreporter) -> None:
    total = sum(sum(c.values()) for c in TRIED.values())
    if total:
        terminalreporter.write_sep("-", f"faults, bad inputs and races tried: {total}")
        for line in tried_table():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_dir) -> Path:
    corpus = []
    for f in sorted(demo_dir.rglob("*.jsonl")):
        if f.name in PROBE_FILES:  # the tokenizer's corpus as before those probes existed
            continue
        if f.parent.parent.name == "releases" and f.parent.name not in RELEASE_TOPICS:
            continue  # nor the releases of other kinds (demo version 6)
        corpus += [json.dumps(json.loads(line)) for line in f.open()]
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), corpus)


# the probe tasks of the embedded sources (flows/demo/build.py)
GENERAL_TASKS = ("country-facts", "general-knowledge", "world-cities")
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
        "gate": {"min_retention": 0.0, "min_retention_vs_anchor": 0.0, "min_new_task_score": 0.0},
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
