"""The fine-tune step in a process of its own, for tests/flows/test_checkpoint_resume.py to kill:

    python -m tests.flows.finetune_child PARAMS_FILE CHAMPION_JSON RELEASE_DIR RUN_DIR

It runs the step as the pipeline does (``flows.production.launch.train``: on several ranks when
``train.num_processes`` asks) and writes the step's record to
``RUN_DIR/train_result.json`` when it finishes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.core.config import load_params
from flows.core.records import ChampionRef
from flows.production import launch
from flows.steps.finetune import FinetuneStep


def main(params_file: str, champion_json: str, release_dir: str, run_dir: str) -> None:
    champion = ChampionRef.read(Path(champion_json))
    result = launch.train(
        FinetuneStep.from_params(load_params(params_file)),
        champion,
        Path(release_dir),
        Path(run_dir),
    )
    result.write(Path(run_dir) / "train_result.json")


if __name__ == "__main__":
    main(*sys.argv[1:])
