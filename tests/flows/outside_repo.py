"""Run a script with the registered model in a fresh Python process outside the repository, as
a user of the registry would: the model must load and answer without the repository's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.flows.conftest import ROOT

REPO_PACKAGES = ("flows", "cf_strategies", "tests", "benchmarks")

# The repository's packages are importable anywhere through the editable install's import hook
# (they are not on sys.path, so PYTHONPATH and cwd alone cannot hide them): the script blocks
# them with ``sys.modules[name] = None``, so any import of them fails.
PRELUDE = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.path[:] = [p for p in sys.path if p.rstrip("/") != {root!r}]
import json
import mlflow

{inputs}
model = mlflow.pyfunc.load_model({model_uri!r})
"""
EPILOGUE = """
open("out.json", "w").write(json.dumps(out))
"""


def run_outside_repo(
    body: str,
    folder: Path,
    tracking_uri: str,
    inputs: dict[str, Any],
    blocked: Iterable[str] = REPO_PACKAGES,
    model_uri: str = "models:/forgetless-lm@champion",
) -> Any:
    """Run ``body`` in a fresh Python process in ``folder``, with MLflow at ``tracking_uri``, the
    packages ``blocked`` unimportable and the checkout off ``sys.path`` and PYTHONPATH. The
    script starts with ``mlflow``, ``json``, a variable per item of ``inputs`` (JSON values)
    and ``model``, ``model_uri`` loaded as a pyfunc; ``body`` sets ``out``, which is returned
    (through JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    assignments = "\n".join(f"{name} = json.loads({json.dumps(v)!r})" for name, v in inputs.items())
    prelude = PRELUDE.format(
        blocked=tuple(blocked), root=str(ROOT), inputs=assignments, model_uri=model_uri
    )
    (folder / "outside.py").write_text(prelude + body + EPILOGUE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    done = subprocess.run(
        [sys.executable, "outside.py"], cwd=folder, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "out.json").read_text())
