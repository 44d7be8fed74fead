"""Choosing a strategy: what each registered strategy stores, what it costs per training step as
measured in ``benchmarks/``, whether it needs a task id at inference, whether the pipeline runs
it, and which one to pick in a few scenarios, every number read from ``benchmarks/results/*.json``
with the row it comes from. ``forgetless strategies`` prints it."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cf_strategies
from flows.core.config import pipeline_strategy

#: The measured results of ``benchmarks/``, at the repository root (not installed with the package).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

OVERHEAD = "strategy_overhead_smollm2.json"  # regularisers on SmolLM2-135M-Instruct
REPLAY_OVERHEAD = "replay_overhead_smollm2-135m.json"  # replay, distillation: its architecture
DEMO = "smollm2_demo.json"
SPLIT_TASK_IL = "split_digits_task_il.json"
TWO_RELEASES = "smollm2_two_releases.json"  # each strategy on its own chain of two releases

#: The per-step overhead row measured for each strategy: (results file, row). Regularisers with
#: the state of one past release (the rows with more cost the same). Strategies not here were
#: not measured per step.
STEP_COST_ROWS: dict[str, tuple[str, str]] = {
    "naive": (OVERHEAD, "naive"),
    "l2": (OVERHEAD, "l2@1"),
    "ewc": (OVERHEAD, "ewc@1"),
    "si": (OVERHEAD, "si@1"),
    "hlr": (OVERHEAD, "hlr@1"),
    "label_smoothing": (REPLAY_OVERHEAD, "label_smoothing"),
    "lwf": (REPLAY_OVERHEAD, "lwf (LoRA teacher)"),
    "replay": (REPLAY_OVERHEAD, "replay (ratio 0.5)"),
    "der": (REPLAY_OVERHEAD, "DER++ (ratio 0.5, top-32)"),
}

#: Costs paid once per release, not per step: (results file, row, field, what the seconds pay).
ONCE_COST_ROWS: dict[str, tuple[str, str, str, str]] = {
    "ewc": (OVERHEAD, "ewc@1", "after_task_s", "s for the Fisher (after_task)"),
    "si": (OVERHEAD, "si@1", "after_task_s", "s for the importance update (after_task)"),
    "hlr": (OVERHEAD, "hlr@1", "after_task_s", "s for the importance update (after_task)"),
    "der": (
        REPLAY_OVERHEAD,
        "one_off",
        "der_insertion_s_per_example",
        "s per buffered example (logits pass)",
    ),
    "self_rehearsal": (
        REPLAY_OVERHEAD,
        "one_off",
        "self_rehearsal_generation_s_per_prompt",
        "s per rehearsal prompt answered (generation)",
    ),
}


@dataclass(frozen=True)
class Scenario:
    """One line of advice: when, what to choose, the measured rows behind it, what to mind."""

    when: str
    choose: str
    names: tuple[str, ...]  # the registered strategies ``choose`` names
    rows: tuple[tuple[str, str], ...]  # (results file, row) cited; empty: not measured yet
    mind: str


ADVICE: tuple[Scenario, ...] = (
    Scenario(
        "ample resources, task id known at inference",
        "progressive or packnet",
        ("progressive", "packnet"),
        (
            (SPLIT_TASK_IL, "PNN (progressive)"),
            (SPLIT_TASK_IL, "PackNet"),
            (TWO_RELEASES, "progressive"),
            (TWO_RELEASES, "packnet"),
        ),
        "BWT exactly 0: each task answers with its own parameters, so a request must name its "
        "release (general questions go to the base weights). Progressive answers task t with "
        "t + 1 forward passes; PackNet has less free capacity for every task.",
    ),
    Scenario(
        "constrained compute",
        "ewc+lwf",
        ("ewc", "lwf"),
        (
            (OVERHEAD, "ewc@1"),
            (REPLAY_OVERHEAD, "lwf (LoRA teacher)"),
            (DEMO, "lwf α=1"),
            (DEMO, "ewc λ=1e6 (weights)"),
        ),
        "The pair itself is not measured yet. EWC stores a Fisher the size of the LoRA target "
        "matrices; LwF stores nothing and its teacher is the same model without the adapter.",
    ),
    Scenario(
        "privacy-sensitive: no user data stored",
        "lwf+self_rehearsal (distilled)",
        ("lwf", "self_rehearsal"),
        ((DEMO, "lwf α=0.15 + self_rehearsal distilled α=5"),),
        "Stores the champion's answers to rehearsal prompts only (leave prompts_from_data off). "
        "One run of one seed, strengths chosen on the same probes; per-step cost not measured.",
    ),
    Scenario(
        "large models",
        "ilora",
        ("ilora",),
        ((TWO_RELEASES, "ilora"), (TWO_RELEASES, "ilora+label_smoothing"), (TWO_RELEASES, "lwf")),
        "Measured on SmolLM2-135M only, one seed, defaults: it protects from its second release "
        "on; at the first its buffer is empty and it forgets general knowledge like naive. It "
        "serves one merged LoRA model (the slow learner) and stores raw examples (a replay "
        "buffer), so it is not for the privacy case.",
    ),
)


@dataclass(frozen=True)
class Measured:
    """A measured cost as printed, with the number and the row it was read from."""

    text: str
    value: float | None = None  # None: not measured, or no results to read
    source: str = ""  # "file › row" and the benchmark's setting


@dataclass(frozen=True)
class StrategyFacts:
    """One registered strategy, as ``forgetless strategies`` lists it."""

    name: str
    stores: str
    step_cost: Measured
    once_cost: Measured | None
    needs_task_id: bool
    pipeline: str  # "yes", or "no: why"


def results_dir(results: Path | None = None) -> Path:
    """The folder of measured results (``benchmarks/results`` at the repository root)."""
    return Path(results) if results is not None else RESULTS_DIR


def results_available(results: Path | None = None) -> bool:
    """True when the results folder holds benchmark JSON files."""
    folder = results_dir(results)
    return folder.is_dir() and any(folder.glob("*.json"))


def missing_results(results: Path | None = None) -> str:
    """What to say when there are no results to read."""
    return (
        f"benchmark results not found in {results_dir(results)} (they live in the repository's "
        "benchmarks/results/, not in an installed package)"
    )


def load_result(file: str, results: Path | None = None) -> dict[str, Any] | None:
    """A results file's JSON, or None when it is absent."""
    path = results_dir(results) / file
    return json.loads(path.read_text()) if path.is_file() else None


def find_row(data: dict[str, Any], row: str) -> dict[str, Any] | None:
    """A named row of a results file: ``results[row]`` (a dict of rows), the entry of the
    ``results`` list whose ``strategy`` or ``method`` is ``row``, else the top-level ``row``."""
    rows = data.get("results")
    if isinstance(rows, dict) and isinstance(rows.get(row), dict):
        return rows[row]
    if isinstance(rows, list):
        for entry in rows:
            if row in (entry.get("strategy"), entry.get("method")):
                return entry
    found = data.get(row)
    return found if isinstance(found, dict) else None


def setting(file: str, data: dict[str, Any]) -> str:
    """The benchmark and model a results file measured, from its own recorded setting."""
    if "config" in data:  # strategy_overhead.py
        c = data["config"]
        targets = c["targets"] if isinstance(c["targets"], str) else _short(c["targets"])
        lora = f"LoRA r={c['lora_r']} on {targets}" if c.get("lora_r") else targets
        batch = f"batch {c['batch']}×{c['seq']}, {c['device'].upper()}"
        return f"{Path(data['model']).name}, {lora}, {batch}"
    if "setup" in data:  # replay_overhead.py
        s = data["setup"]
        return (
            f"{s['preset']} architecture (random weights), LoRA r={s['lora_r']} on "
            f"{_short(s['lora_targets'])}, batch {s['batch']}, CPU"
        )
    if "protocol" in data:  # split_digits.py, replay_permuted_digits.py
        return data["protocol"].split(":")[0]
    if file == TWO_RELEASES:
        return "SmolLM2-135M-Instruct demo, two releases, each strategy on its own chain"
    if file.startswith("smollm2_demo"):
        release = "release 2" if "release2" in file else "release 1"
        return f"SmolLM2-135M-Instruct demo, {release}"
    return file


def _short(targets: list[str]) -> str:
    return "/".join(t.removesuffix("_proj") for t in targets)


def step_cost(name: str, results: Path | None = None) -> Measured:
    """The measured extra cost per training step of strategy ``name`` (median step time as a
    multiple of naive's, in the same run), or why there is none."""
    if not results_available(results):
        return Measured("no results to read")
    if name not in STEP_COST_ROWS:
        return Measured("not measured")
    file, key = STEP_COST_ROWS[name]
    data = load_result(file, results)
    row = None if data is None else find_row(data, key)
    if data is None or row is None:
        return Measured("not measured")
    source = f"{file} › {key}\n{setting(file, data)}"
    if "vs_naive" in row:  # strategy_overhead.py: milliseconds
        ratio, step = row["vs_naive"], row["median_ms"]
        naive = data["results"]["naive"]["median_ms"]
    else:  # replay_overhead.py: seconds
        ratio, step = row["median_ratio_to_naive"], row["median_step_s"] * 1000
        naive = find_row(data, "naive")["median_step_s"] * 1000
    if name == "naive":
        return Measured(f"{ratio:.3f}× (the baseline: {step:.0f} ms a step)", ratio, source)
    return Measured(f"{ratio:.3f}× naive ({step:.0f} vs {naive:.0f} ms a step)", ratio, source)


def once_cost(name: str, results: Path | None = None) -> Measured | None:
    """A measured cost paid once per release (not per step), if one was measured."""
    if name not in ONCE_COST_ROWS or not results_available(results):
        return None
    file, key, field, what = ONCE_COST_ROWS[name]
    data = load_result(file, results)
    row = None if data is None else find_row(data, key)
    if row is None or row.get(field) is None:
        return None
    value = row[field]
    value = statistics.fmean(value) if isinstance(value, list) else float(value)
    return Measured(f"{value:.3f} {what}", value, f"{file} › {key}.{field}")


def pipeline_support(name: str) -> str:
    """Whether ``forgetless run`` accepts the strategy: "yes" (served by task for parameter
    isolation), else "no: " and why."""
    try:
        pipeline_strategy(name)
    except ValueError as err:
        return f"no: {err}"
    return "yes, served by task" if cf_strategies.STRATEGIES[name].isolates_tasks else "yes"


def strategy_facts(results: Path | None = None) -> list[StrategyFacts]:
    """Every registered strategy, by name."""
    return [
        StrategyFacts(
            name=name,
            stores=cls.stores,
            step_cost=step_cost(name, results),
            once_cost=once_cost(name, results),
            needs_task_id=cls.isolates_tasks,
            pipeline=pipeline_support(name),
        )
        for name, cls in sorted(cf_strategies.STRATEGIES.items())
    ]


def describe_row(file: str, key: str, results: Path | None = None) -> str:
    """``file › row: numbers`` for a cited row, its numbers read from the file."""
    data = load_result(file, results)
    row = None if data is None else find_row(data, key)
    if row is None:
        return f"{file} › {key}: row not found"
    if "vs_naive" in row:
        numbers = f"{row['vs_naive']:.3f}× naive a step"
    elif "median_ratio_to_naive" in row:
        numbers = f"{row['median_ratio_to_naive']:.3f}× naive a step"
    elif "release2" in row:  # smollm2_two_releases.py: a chain of two releases
        first, second = row["release1"], row["release2"]
        kept = ", ".join(f"{task} {r:.3f}" for task, r in sorted(second["retention"].items()))
        numbers = (
            f"release 1 learned {first['new_task']:.3f}, general knowledge kept "
            f"{first['retention']['general-knowledge']:.3f}; release 2 learned "
            f"{second['new_task']:.3f}, kept {kept}"
        )
    elif "final_acc" in row:
        acc, bwt = row["final_acc"], row["bwt"]
        numbers = (
            f"final accuracy {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}%, "
            f"BWT {100 * bwt['mean']:+.1f} ± {100 * bwt['std']:.1f}"
        )
    else:
        kept = ", ".join(f"{task} {r:.3f}" for task, r in sorted(row["retention"].items()))
        numbers = f"new task {row['new_task']:.3f}, retention {kept}"
    return f"{file} › {key} ({setting(file, data)}): {numbers}"


def advice(results: Path | None = None) -> list[tuple[Scenario, list[str], str]]:
    """Each scenario with its cited rows described from the results files (none when it is not
    measured yet, or there are no results) and which of its strategies the pipeline cannot run."""
    out = []
    for s in ADVICE:
        cited = (
            [describe_row(f, k, results) for f, k in s.rows] if results_available(results) else []
        )
        refused = [n for n in s.names if not pipeline_support(n).startswith("yes")]
        note = f"Not run by the pipeline yet: {', '.join(refused)}." if refused else ""
        out.append((s, cited, note))
    return out
