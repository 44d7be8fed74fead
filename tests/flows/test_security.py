"""Security: weights load from safetensors only, and credentials from the environment never
reach anything a retrain writes (logs, MLflow params, tags, metrics, artifacts, the workspace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flows.drivers.retrain import retrain
from flows.registry.serving import load
from tests.conftest import count, write_params

pytestmark = pytest.mark.usefixtures("prefect_harness")

SECRET = "planted-Secret-7f3a9c2e"


def test_pickled_weights_are_refused(tmp_path, tiny_model_dir):
    """A model folder with only a pickle (``pytorch_model.bin``) is not loaded: unpickling a file
    someone supplied can run code."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the legacy, pickled format
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    assert (folder / "pytorch_model.bin").exists()
    assert not list(folder.glob("*.safetensors"))
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    count("security", "pickled weights (pytorch_model.bin only)")
    with pytest.raises(OSError, match="safetensors"):
        load(folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before  # nothing converted
    load(tiny_model_dir)  # the same model as safetensors loads


def test_credentials_in_the_environment_reach_nothing_a_retrain_writes(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch, capfd
):
    for key in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "PGPASSWORD"):
        monkeypatch.setenv(key, SECRET)
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    count("security", "credentials planted in the environment")
    summary = retrain(params_file=str(params_file))
    assert summary.registration.version == "1"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written)  # the store and its artifacts are searched
    assert any("mlartifacts" in p.parts for p in written)
    leaks = [p for p in written if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the planted secret is in {leaks[:5]}"
    out, err = capfd.readouterr()
    assert SECRET not in out + err  # nor in the logs
    assert Path(params_file).read_text().count(SECRET) == 0
