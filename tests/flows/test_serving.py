"""The registered model is self-contained: it loads and answers in a fresh process outside the
repository, where ``flows`` cannot be imported, and over ``mlflow models serve``'s REST API,
with the same answers as the pipeline's own scoring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from flows.core.config import load_params
from flows.core.data import Example, read_jsonl
from flows.registry import serving
from flows.scoring.scoring import generate
from flows.steps.modeling import load_model
from tests.conftest import write_params
from tests.flows.conftest import register_candidate
from tests.flows.outside_repo import run_outside_repo
from tests.flows.test_tracking import free_port

# What the champion answers outside the repository, and which of its modules it imported.
LOAD_OUTSIDE = """
import pandas as pd

out = {
    "list": model.predict(prompts),
    "string": model.predict(prompts[0]),
    "frame": model.predict(pd.DataFrame({"prompt": prompts})),
    "longer": model.predict(prompts[:1], params={"max_new_tokens": 12}),
    "repo_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("flows", "tests")
                           and sys.modules[m] is not None),
}
"""


def prompts_of(demo_dir: Path, n: int = 5) -> list[str]:
    """Release prompts of different lengths (so that left padding matters)."""
    records = [r for _, r in read_jsonl(demo_dir / "releases" / "wiki-topics-1" / "eval.jsonl")]
    return [r["prompt"][: 60 + 40 * i] for i, r in enumerate(records[:n])]


def pipeline_answers(
    model_dir: Path, prompts: list[str], chat: bool, max_new_tokens: int, batch_size: int
) -> list[str]:
    """What the pipeline's evaluation generates for these prompts."""
    model, tokenizer = load_model(model_dir)
    examples = [
        Example(
            id=str(i), messages=[{"role": "user", "content": p}], completion="", answers=[], task=""
        )
        for i, p in enumerate(prompts)
    ]
    return generate(model, tokenizer, examples, chat, max_new_tokens, batch_size)


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_model_dir, demo_dir):
    """A workspace whose champion (v1) is the tiny model, registered by the real step."""
    tmp = tmp_path_factory.mktemp("serving")
    params = load_params(write_params(tmp, tiny_model_dir, demo_dir))
    register_candidate(params, tiny_model_dir, demo_dir)
    return params


def test_champion_loads_outside_the_repository(champion, tiny_model_dir, demo_dir, tmp_path):
    prompts = prompts_of(demo_dir)
    ev = champion.evaluate
    expected = pipeline_answers(tiny_model_dir, prompts, False, ev.max_new_tokens, ev.batch_size)
    longer = pipeline_answers(tiny_model_dir, prompts[:1], False, 12, ev.batch_size)
    out = run_outside_repo(LOAD_OUTSIDE, tmp_path, champion.tracking_uri, {"prompts": prompts})
    assert len(set(expected)) > 1 and all(expected)  # real, distinct answers
    assert out["list"] == expected
    assert out["string"] == expected[:1]
    assert out["frame"] == expected
    assert out["longer"] == longer and len(longer[0]) > len(expected[0])
    assert out["repo_modules"] == []


def test_champion_serves_over_rest(champion, tiny_model_dir, demo_dir, tmp_path):
    prompts = prompts_of(demo_dir, 3)
    ev = champion.evaluate
    expected = pipeline_answers(tiny_model_dir, prompts, False, ev.max_new_tokens, ev.batch_size)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # serve runs `uvicorn` from PATH
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.tracking_uri, "PATH": path}
    mlflow_cli = [sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local"]
    server = subprocess.Popen(
        [*mlflow_cli, "-m", "models:/forgetless-lm@champion", "-p", str(port), "-w", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                assert time.time() < deadline, "mlflow models serve did not start in 180 s"
                time.sleep(0.5)
        bodies = [
            {"inputs": prompts},
            {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]}},
            {"dataframe_records": [{"prompt": p} for p in prompts]},
        ]
        for body in bodies:
            request = urllib.request.Request(
                f"{url}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                assert json.loads(response.read()) == {"predictions": expected}, body
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_chat_template_answers_match_the_pipeline(tiny_model_dir, demo_dir, tmp_path):
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)
    prompts = prompts_of(demo_dir)
    expected = pipeline_answers(model_dir, prompts, True, 8, 2)
    plain = pipeline_answers(model_dir, prompts, False, 8, 2)
    assert expected != plain  # the template changes what the model sees
    model, tok = serving.load(model_dir)
    assert serving.generate(model, tok, prompts, True, 8, 2) == expected
    assert serving.generate(model, tok, prompts, False, 8, 2) == plain


def test_models_loaded_in_threads_at_once_are_whole_and_in_their_dtype(tiny_model_dir):
    """Parallel candidates load in threads; transformers swaps process-wide state while it
    loads (torch's default dtype, tie_weights). Without the lock every one of these loads came
    back with lm_head on the meta device or weights in the other thread's dtype."""
    broken: list[str] = []

    def load_five(dtype: torch.dtype) -> None:
        for _ in range(5):
            model, _ = serving.from_pretrained(tiny_model_dir, dtype, trust_remote_code=False)
            for name, param in model.named_parameters():
                if param.device.type == "meta" or param.dtype != dtype:
                    broken.append(f"{dtype} {name}: {param.device} {param.dtype}")
            embeddings = model.get_input_embeddings().weight
            if model.config.tie_word_embeddings and model.lm_head.weight is not embeddings:
                broken.append(f"{dtype}: lm_head not tied")

    threads = [
        threading.Thread(target=load_five, args=(torch.bfloat16 if i % 2 else torch.float32,))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert broken == []
