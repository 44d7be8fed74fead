"""Code shipped with a model runs only when ``model.trust_remote_code`` is set: a model folder
whose config names its own Python module (``auto_map``) is refused by default with a message
naming the setting, before that module is imported; with the setting it loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.core.config import load_params
from flows.core.data import load_probes
from flows.registry.serving import load
from flows.steps.evaluate import EvaluateStep, Scorer
from tests.conftest import count, write_params

# The model's own code: it leaves a file behind when it is imported.
CUSTOM_CODE = """
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("the model's code ran")


class ShippedConfig(LlamaConfig):
    model_type = "shipped-llama"


class ShippedModel(LlamaForCausalLM):
    config_class = ShippedConfig
"""


@pytest.fixture
def shipped_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model as a folder with its own modeling code, and the file that code writes."""
    folder, marker = tmp_path / "shipped-model", tmp_path / "code-ran.txt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "shipped.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "shipped-llama"
    config["auto_map"] = {
        "AutoConfig": "shipped.ShippedConfig",
        "AutoModelForCausalLM": "shipped.ShippedModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_model_code_is_refused_by_default_and_never_imported(shipped_model):
    folder, marker = shipped_model
    count("security", "a model that ships its own code, loaded by default")
    with pytest.raises(ValueError, match="set model.trust_remote_code: true") as err:
        load(folder)
    assert str(folder) in str(err.value)
    assert not marker.exists()


def test_the_pipeline_scorer_follows_the_setting(shipped_model, tmp_path, tiny_model_dir, demo_dir):
    folder, marker = shipped_model
    params = load_params(write_params(tmp_path, tiny_model_dir, demo_dir))
    assert params.model.trust_remote_code is False  # the default
    count("security", "a model that ships its own code, scored by the pipeline")
    probes = load_probes(demo_dir / "probes" / "general_knowledge.jsonl")[:2]
    with pytest.raises(ValueError, match="trust_remote_code"):
        Scorer(EvaluateStep.from_params(params), folder).score(
            probes
        )  # the model is loaded for its first item
    assert not marker.exists()
    trusting = params.with_overrides({"model.trust_remote_code": True})
    scorer = Scorer(EvaluateStep.from_params(trusting), folder)
    assert len(scorer.score(probes)) == 2
    assert marker.read_text() == "the model's code ran"
    assert type(scorer.model).__name__ == "ShippedModel"
