"""One "machine" of the promotion race in tests/flows/test_races.py, run as its own process:

    python -m tests.flows.race_child PARAMS_FILE VERSION CHAMPION_AT_START BARRIER_DIR OUT_JSON

It waits until every racer is ready (a file each in BARRIER_DIR), then promotes VERSION as a
retrain measured against CHAMPION_AT_START would, and writes the outcome to OUT_JSON. The read
of the champion inside the lock waits up to ``READ_WINDOW`` s for the other racer's read: racers
that are not serialised both read the old champion, so only the lock can keep one out.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import flows.steps.promote
from flows.core.config import load_params
from flows.core.records import Registration
from flows.registry.locks import lock_kind
from flows.steps.promote import promote
from tests.flows.conftest import PASSED

RACERS = 2
READ_WINDOW = 5.0  # seconds a racer that read the champion waits for the other's read


def wait_for(barrier: Path, prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(barrier.glob(prefix + "*"))) < RACERS and time.monotonic() < deadline:
        time.sleep(0.02)


def main(params_file: str, version: str, champion_at_start: str, barrier: str, out: str) -> None:
    params = load_params(params_file)
    folder = Path(barrier)
    read = flows.steps.promote.champion_version

    def read_then_wait(p):
        current = read(p)
        (folder / f"read-{version}").touch()
        wait_for(folder, "read-", READ_WINDOW)
        return current

    flows.steps.promote.champion_version = read_then_wait
    (folder / f"ready-{version}").touch()
    wait_for(folder, "ready-", 300)
    name = params.model.registered_name
    result = promote(
        params.model_store, Registration(name=name, version=version, run_id="r"), PASSED, "1"
    )
    Path(out).write_text(
        json.dumps(
            {
                "version": version,
                "lock": lock_kind(params.model_store),
                "promoted": result.promoted,
                "reason": result.reason,
                "champion": result.champion_version,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
