"""``forgetless strategies``: every registered strategy with what it stores, its measured cost per
step (equal to the number in the results file it cites), task id and pipeline support, and the
scenario advice, each line backed by rows that exist in ``benchmarks/results``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from cf_strategies import STRATEGIES
from cf_strategies.base import Strategy
from flows.cli import main as cli
from flows.cli import strategy_guide as guide
from flows.core.config import pipeline_strategy

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
OVERHEAD_FILES = sorted(RESULTS.glob("strategy_overhead*.json")) + sorted(
    RESULTS.glob("replay_overhead*.json")
)


def run_command(argv: list[str]) -> tuple[int, str]:
    """``forgetless <argv>`` through ``flows.cli.main``, printed on a wide console."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "console", Console(file=out, width=400))
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def printed() -> str:
    code, out = run_command(["strategies"])
    assert code == 0
    return out


def row_of(printed: str, name: str) -> str:
    """The printed table row of strategy ``name`` (all its lines)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"│ {name} "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("│"))
    return "\n".join(lines[start:end])


def cells(row: str) -> list[str]:
    """The text of each column of a printed row, its lines joined by spaces."""
    columns: list[list[str]] = []
    for line in row.splitlines():
        parts = [p.strip() for p in line.strip("│").split("│")]
        columns = columns or [[] for _ in parts]
        for col, part in zip(columns, parts, strict=True):
            if part:
                col.append(part)
    return [" ".join(col) for col in columns]


def json_row(file: str, key: str) -> dict:
    """A row of a results file, looked up here without the guide's code."""
    data = json.loads((RESULTS / file).read_text())
    if file.startswith("strategy_overhead"):
        return data["results"][key]
    if file.startswith(("replay_overhead", "split_digits")):
        field = "strategy" if file.startswith("replay_overhead") else "method"
        (row,) = [r for r in data["results"] if r[field] == key]
        return row
    return data[key]


def cited(source: str) -> tuple[str, str]:
    """(file, row) from the first line of a cost's source, ``file › row``."""
    file, key = source.splitlines()[0].split(" › ", 1)
    return file, key


# ---- the table --------------------------------------------------------------------------------
def test_lists_every_registered_strategy(printed):
    names = [f.name for f in guide.strategy_facts()]
    assert names == sorted(STRATEGIES)
    assert {"ilora", "packnet", "progressive", "ewc", "lwf", "replay"} <= set(names)
    for name in STRATEGIES:
        assert cells(row_of(printed, name))[0] == name


def test_each_step_cost_equals_the_number_in_the_file_it_cites(printed):
    measured = 0
    for f in guide.strategy_facts():
        if f.step_cost.value is None:
            assert f.step_cost.text == "not measured"
            continue
        file, key = cited(f.step_cost.source)
        assert (RESULTS / file) in OVERHEAD_FILES, f"{f.name}: {file} is not a per-step benchmark"
        row = json_row(file, key)
        expected = row["vs_naive"] if "vs_naive" in row else row["median_ratio_to_naive"]
        assert f.step_cost.value == expected
        assert f.step_cost.text.startswith(f"{expected:.3f}×")
        shown = cells(row_of(printed, f.name))
        assert f.step_cost.text in shown[2] and f"{file} › {key}" in shown[3]
        measured += 1
    assert measured == len(guide.STEP_COST_ROWS) == 9
    # known values, on the pipeline's model
    assert guide.step_cost("ewc").text.startswith("1.023× naive")
    assert guide.step_cost("lwf").text.startswith("1.367× naive")
    assert "strategy_overhead_smollm2.json › ewc@1" in guide.step_cost("ewc").source


def test_each_once_per_release_cost_equals_its_file():
    for name, (file, key, field, _) in guide.ONCE_COST_ROWS.items():
        cost = guide.once_cost(name)
        assert cost is not None and cost.source == f"{file} › {key}.{field}"
        data = json.loads((RESULTS / file).read_text())
        value = (data["results"][key] if key != "one_off" else data["one_off"])[field]
        value = sum(value) / len(value) if isinstance(value, list) else value
        assert cost.value == pytest.approx(value, rel=1e-12)
        assert cost.text.startswith(f"{value:.3f} ")


def test_not_measured_means_no_row_in_any_overhead_file():
    def row_names(path: Path) -> list[str]:
        results = json.loads(path.read_text())["results"]
        return list(results) if isinstance(results, dict) else [r["strategy"] for r in results]

    tokens = {
        t.removesuffix("++")
        for path in OVERHEAD_FILES
        for key in row_names(path)
        for t in re.split(r"[@ +()]", key.lower())
    }
    for f in guide.strategy_facts():
        if f.step_cost.value is None:
            assert f.name not in tokens, f"{f.name} has a measured row: cite it"
    assert {"self_rehearsal", "ilora", "packnet", "progressive", "wise"} <= {
        f.name for f in guide.strategy_facts() if f.step_cost.value is None
    }


def test_every_strategy_declares_what_it_stores(printed):
    for name, cls in STRATEGIES.items():
        assert "stores" in vars(cls), f"{name} leaves `stores` at an inherited value"
        assert isinstance(cls.stores, str) and cls.stores.strip()
        if cls.state_dict is Strategy.state_dict:  # saves nothing
            assert cls.stores.startswith("nothing"), name
        assert cls.stores.split()[0] in cells(row_of(printed, name))[1]
    assert "raw examples" in STRATEGIES["replay"].stores
    assert "raw examples" in STRATEGIES["der"].stores and "logits" in STRATEGIES["der"].stores
    assert "answers generated by the champion" in STRATEGIES["self_rehearsal"].stores
    for name in ("ewc", "si", "hlr"):
        assert "importances" in STRATEGIES[name].stores
    for name in ("lwf", "naive", "label_smoothing", "wise", "l2"):
        assert STRATEGIES[name].stores.startswith("nothing"), name
    assert "masks" in STRATEGIES["packnet"].stores
    assert "columns" in STRATEGIES["progressive"].stores


def test_task_id_and_pipeline_columns(printed):
    for f in guide.strategy_facts():
        assert f.needs_task_id is STRATEGIES[f.name].isolates_tasks
        try:
            pipeline_strategy(f.name)
            runs = True
        except ValueError:
            runs = False
        assert f.pipeline.startswith("yes" if runs else "no")
        shown = cells(row_of(printed, f.name))
        assert shown[4] == ("yes" if f.needs_task_id else "no")
        assert shown[5].startswith("yes" if runs else "no")
    refused = {f.name for f in guide.strategy_facts() if not f.pipeline.startswith("yes")}
    assert refused == set()
    by_task = {f.name for f in guide.strategy_facts() if f.pipeline == "yes, served by task"}
    assert by_task == {"packnet", "progressive"}
    with pytest.raises(ValueError, match="at most one parameter-isolation"):
        pipeline_strategy("packnet+progressive")


# ---- the advice -------------------------------------------------------------------------------
def test_advice_cites_rows_that_exist_with_their_numbers(printed):
    for scenario, lines, _ in guide.advice():
        assert set(scenario.names) <= set(STRATEGIES)
        assert len(lines) == len(scenario.rows)
        for (file, key), line in zip(scenario.rows, lines, strict=True):
            row = json_row(file, key)  # raises when the row is missing
            assert line.startswith(f"{file} › {key} (")
            if "vs_naive" in row:
                assert f"{row['vs_naive']:.3f}× naive" in line
            elif "median_ratio_to_naive" in row:
                assert f"{row['median_ratio_to_naive']:.3f}× naive" in line
            elif "final_acc" in row:
                assert f"{100 * row['final_acc']['mean']:.1f} ±" in line
                assert f"BWT {100 * row['bwt']['mean']:+.1f}" in line
            elif "release2" in row:  # a chain of two releases
                assert f"release 1 learned {row['release1']['new_task']:.3f}" in line
                assert f"release 2 learned {row['release2']['new_task']:.3f}" in line
                for task, r in row["release2"]["retention"].items():
                    assert f"{task} {r:.3f}" in line
            else:
                assert f"new task {row['new_task']:.3f}" in line
                for task, r in row["retention"].items():
                    assert f"{task} {r:.3f}" in line
    flat = " ".join(printed.split())
    for scenario in guide.ADVICE:
        assert scenario.when in flat and scenario.choose in flat


def test_the_four_scenarios_and_their_rows():
    by_choice = {s.choose: s for s in guide.ADVICE}
    isolation = by_choice["progressive or packnet"]
    for file, key in isolation.rows:
        row = json_row(file, key)
        if file == "split_digits_task_il.json":
            assert row["bwt"]["mean"] == 0.0
        else:  # the SmolLM2 chain: every old task kept exactly, through its own parameters
            assert file == guide.TWO_RELEASES
            assert set(row["release2"]["retention"].values()) == {1.0}
    constrained = by_choice["ewc+lwf"]
    assert {k for _, k in constrained.rows} >= {"ewc@1", "lwf (LoRA teacher)"}
    private = by_choice["lwf+self_rehearsal (distilled)"]
    assert private.rows == (("smollm2_demo.json", "lwf α=0.15 + self_rehearsal distilled α=5"),)
    row = json_row(*private.rows[0])
    assert round(row["new_task"], 3) == 0.833
    assert round(row["retention"]["general-knowledge"], 3) == 0.978
    assert row["options"]["self_rehearsal"]["distill_alpha"] > 0
    for name in private.names:  # no stored user data
        assert "raw examples" not in STRATEGIES[name].stores
    large = by_choice["ilora"]
    assert {k for _, k in large.rows} == {"ilora", "ilora+label_smoothing", "lwf"}


def test_ilora_advice_cites_the_measured_two_release_rows(printed):
    """The I-LoRA rows exist: the advice cites them, with the numbers read from the file."""
    data = json.loads((RESULTS / guide.TWO_RELEASES).read_text())
    large = " ".join(row_of(printed, "large models").split())
    assert "not measured yet" not in large
    for name in ("ilora", "ilora+label_smoothing"):
        row = data[name]["release2"]
        assert f"{guide.TWO_RELEASES} › {name}" in large
        assert f"release 2 learned {row['new_task']:.3f}" in large


def test_without_results_says_so(tmp_path):
    code, out = run_command(["strategies", "--results", str(tmp_path / "absent")])
    assert code == 0
    flat = " ".join(out.split())
    assert "benchmark results not found" in flat
    assert all(f.step_cost.value is None for f in guide.strategy_facts(tmp_path / "absent"))
    assert "1.023×" not in out
    for name in STRATEGIES:
        assert "no results to read" in cells(row_of(out, name))[2]
    assert guide.RESULTS_DIR == RESULTS and guide.results_available()
