"""The forgetting report of one retrain: a self-contained HTML page (an MLflow artifact) and a
markdown summary (a Prefect artifact), made from the records in the run folder.

It shows the accuracy matrix as a heatmap with average accuracy, backward and forward transfer
over the releases the candidate has learned; each probe task's retention with its interval
against its threshold; the new-task score against its target; the decision with every reason;
the lineage (release hash, commits, parent champion, strategy and its options); the
tournament's trade-off plot when candidates competed; and the probe items that flipped, with
the champion's and the candidate's answers side by side.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from cf_strategies import STRATEGIES, metrics, split_spec
from flows.core.config import GateConfig, ModelStore, Params
from flows.core.records import (
    FILES,
    EvalReport,
    GateDecision,
    ProbeSet,
    Promotion,
    Registration,
    TrainResult,
    VersionedRelease,
)
from flows.scoring import accuracy_matrix
from flows.steps.evaluate import read_results

REPORT_HTML, REPORT_MD = "forgetting_report.html", "forgetting_report.md"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lineage_matrix(matrix: dict, releases: list[str], candidate: str) -> np.ndarray:
    """R[i][j]: the score on release j of the model that learned release i (the champions that
    learned the earlier releases, then ``candidate``); NaN where it was never measured."""
    rows = {r["label"]: r for r in matrix["rows"]}
    learners = [
        next(
            (r for r in matrix["rows"] if r.get("release") == rel and r.get("promoted")),
            None,
        )
        for rel in releases[:-1]
    ] + [rows.get(candidate)]
    return np.array(
        [[(row or {}).get("scores", {}).get(rel, math.nan) for rel in releases] for row in learners]
    )


def transfer_metrics(matrix: dict, releases: list[str], candidate: str) -> dict[str, float]:
    """ACC, BWT and, where the base model was scored on every release, FWT."""
    R = lineage_matrix(matrix, releases, candidate)
    base = next((r for r in matrix["rows"] if r["label"] == "base"), {"scores": {}})
    first = [base["scores"].get(rel, math.nan) for rel in releases]
    out = {"acc": metrics.average_accuracy(R)}
    if len(releases) > 1:  # both need an earlier release: with one they are 0 by definition
        out["bwt"] = metrics.backward_transfer(R)
        if not any(math.isnan(b) for b in first):
            out["fwt"] = metrics.forward_transfer(R, first)
    return out


def retention_plot(report: EvalReport, decision: GateDecision, out: Path) -> Path:
    """Each gate check with an interval as a point, its interval and its threshold."""
    plt = _plt()
    checks = [
        c
        for c in decision.checks
        if c.name.startswith(("retention[", "retention_vs_anchor[", "new_task_score["))
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.55 * len(checks)))
    for y, c in enumerate(reversed(checks)):
        color = "#2a9d4b" if c.passed else "#c0392b"
        low, high = c.interval or (c.value, c.value)
        ax.plot([low, high], [y, y], color=color, lw=3, alpha=0.6, solid_capstyle="butt")
        ax.plot([c.value], [y], "o", color=color, ms=8)
        ax.plot([c.threshold] * 2, [y - 0.35, y + 0.35], color="k", ls="--", lw=1)
    ax.set_yticks(range(len(checks)), [c.name for c in reversed(checks)])
    ax.set_ylim(-0.6, len(checks) - 0.4)
    level = f"exact bounds at {1 - report.alpha:.0%}" if report.alpha else "no interval"
    ax.set_xlabel(f"value ({level}); dashed: threshold; green passed, red failed")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tradeoff_plot(candidates: list[dict], min_retention: float, min_score: float, out: Path):
    """Tournament: worst dev retention against dev new-task score, one numbered point per
    candidate (named in the legend), the gate's region shaded, the winner starred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    xs = [c["new_task_score"] for c in candidates]
    ys = [c["min_retention"] for c in candidates]
    low_x, low_y = min([*xs, min_score]) - 0.08, min([*ys, min_retention]) - 0.06
    top = max([1.02, *ys]) + 0.04
    ax.fill_between([min_score, 1.02], min_retention, top, color="#2a9d4b", alpha=0.12)
    ax.plot([], [], "s", color="#2a9d4b", alpha=0.25, ms=10, label="meets every threshold")
    seen: dict[tuple[float, float], int] = {}
    for i, (c, x, y) in enumerate(zip(candidates, xs, ys, strict=True), start=1):
        marker, size = ("*", 17) if c.get("winner") else ("o", 9)
        ax.plot(
            x,
            y,
            marker,
            ms=size,
            label=f"{i}: {c['label']}" + (" (winner)" if c.get("winner") else ""),
        )
        stacked = seen.get((x, y), 0)  # candidates on the same point: labels side by side
        seen[(x, y)] = stacked + 1
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(7 + 9 * stacked, 5))
    ax.set_xlim(low_x, 1.02)
    ax.set_ylim(low_y, top)
    ax.set_xlabel("new-task score (dev)")
    ax.set_ylabel("lowest retention over probe tasks (dev)")
    ax.set_title("Strategy tournament on the dev probes")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def flipped_items(probe_set: ProbeSet, run_dir: Path) -> list[dict]:
    """Test probe items answered differently by champion and candidate: lost ones first."""
    if probe_set.champion_results is None:
        return []
    champion = {
        (r["task"], r["id"]): r
        for r in read_results(probe_set.champion_results / "probes.jsonl")
        if r.get("split", "test") == "test"
    }
    prompts = {(r["task"], r["id"]): r["prompt"] for r in map(json.loads, probe_set.path.open())}
    flips = []
    for r in read_results(run_dir / "candidate" / "probes.jsonl"):
        key = (r["task"], r["id"])
        theirs = champion.get(key)
        if theirs is not None and bool(theirs["correct"]) != bool(r["correct"]):
            flips.append(
                {
                    "task": r["task"],
                    "id": r["id"],
                    "prompt": prompts.get(key, ""),
                    "champion": theirs["output"],
                    "candidate": r["output"],
                    "change": "lost" if theirs["correct"] else "gained",
                }
            )
    return sorted(flips, key=lambda f: (f["change"] != "lost", f["task"], f["id"]))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = ""
    if header:
        cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        head = f"<thead><tr>{cells}</tr></thead>"
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{margin-bottom:.2em} .verdict{font-size:1.3em;font-weight:bold;padding:.4em .8em;
border-radius:6px;display:inline-block} .passed{background:#d7f5df;color:#145a2a}
.failed{background:#fadbd8;color:#7b241c} table{border-collapse:collapse;margin:.6em 0 1.4em}
td,th{border:1px solid #ccc;padding:.25em .45em;text-align:left;vertical-align:top;font-size:.85em}
th{background:#f3f3f3} img{max-width:100%;margin:.4em 0} .ok{color:#145a2a}.bad{color:#a02020}
"""


class ReportStep(BaseModel):
    """What the report reads: the gate's settings, the strategies' options, the workspace's
    accuracy matrix and the model store the report is attached to, resolved from
    ``params.yaml`` once (:meth:`from_params`)."""

    model_config = ConfigDict(frozen=True)

    gate: GateConfig
    strategy_params: dict[str, dict[str, Any]]  # train.strategy_params
    matrix_file: Path  # the workspace's accuracy_matrix.json
    store: ModelStore

    @classmethod
    def from_params(cls, params: Params) -> ReportStep:
        return cls(
            gate=params.gate,
            strategy_params=params.train.strategy_params,
            matrix_file=params.workspace_dir / "accuracy_matrix.json",
            store=params.model_store,
        )


def write_report(
    step: ReportStep, run_dir: Path, matrix: dict, tournament: list[dict] | None = None
) -> tuple[Path, Path]:
    """Write ``forgetting_report.html`` and ``forgetting_report.md`` into ``run_dir``."""
    release = VersionedRelease.read(run_dir / FILES["version"])
    probe_set = ProbeSet.read(run_dir / FILES["probes"])
    trained = TrainResult.read(run_dir / FILES["finetune"])
    report = EvalReport.read(run_dir / FILES["evaluate"])
    decision = GateDecision.read(run_dir / FILES["gate"])
    registration = Registration.read(run_dir / FILES["register"])
    promotion = Promotion.read(run_dir / FILES["promote"])
    plots = run_dir / "plots"
    heatmap = accuracy_matrix.plot(matrix, plots / "accuracy_matrix.png")
    checks_png = retention_plot(report, decision, plots / "gate_checks.png")
    trade_png = None
    if tournament:
        trade_png = tradeoff_plot(
            tournament,
            step.gate.min_retention,
            step.gate.min_new_task_score,
            plots / "tournament.png",
        )
    releases = probe_set.champion.releases + [release.name]
    transfer = transfer_metrics(matrix, releases, f"v{registration.version}")
    flips = flipped_items(probe_set, run_dir)
    strategy_options = {  # with every default filled in: what actually ran
        n: STRATEGIES[n]
        .options_model.model_validate(step.strategy_params.get(n, {}))
        .model_dump(mode="json")
        for n in split_spec(trained.strategy)
    }
    from flows.steps.register import code_commit

    lineage = [
        ["release", f"{release.name} (DVC {release.dvc_hash})"],
        ["workspace commit", release.git_commit],
        ["code commit", code_commit()],
        ["parent champion", probe_set.champion.version or "base model"],
        ["releases learned", ", ".join(releases)],
        ["strategy", f"{trained.strategy} {json.dumps(strategy_options)}"],
        ["probe set (test)", f"{probe_set.n_items} items, DVC {probe_set.dvc_hash}"],
        ["registered", f"{registration.name} v{registration.version} (run {registration.run_id})"],
    ]
    task_rows = []
    for task in sorted(report.retention):
        for s in (report.tasks.get(task), report.anchored.get(task)):
            if s is None:
                continue
            task_rows.append(
                [
                    task,
                    s.against,
                    _fmt(s.reference_score),
                    _fmt(s.candidate_score),
                    f"{s.known} known, {s.lost} lost, {s.gained} gained",
                    _fmt(s.value),
                    _fmt(s.low),
                    f"{s.threshold:.2f}",
                    f"{s.needed_known} ({_fmt(s.passes_reliably_at)})",
                    "too small to decide" if s.too_small else "",
                ]
            )
    statistic = "net ratio" if step.gate.gains_offset_losses else "kept share"
    task_header = [
        "probe task",
        "against",
        "reference",
        "candidate",
        "items",
        statistic,
        f"lower bound ({1 - report.alpha:.0%})",
        "threshold",
        f"known needed (passes with p {step.gate.power:g} at)",
        "note",
    ]
    interval = report.new_task_interval
    new_rows = [
        [
            report.new_task,
            _fmt(report.new_task_baseline),
            _fmt(report.new_task_score),
            f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "n/a",
            f"{step.gate.min_new_task_score:.2f}",
            report.new_task_n,
        ]
    ]
    new_header = ["new task", "champion", "candidate", "interval", "target", "items"]
    check_rows = [["✓" if c.passed else "✗", str(c)] for c in decision.checks]
    flip_header = ["change", "task", "id", "prompt", "champion said", "candidate said"]
    flip_rows = [
        [f["change"], f["task"], f["id"], f["prompt"], f["champion"], f["candidate"]] for f in flips
    ]
    verdict = "passed" if decision.passed else "failed"
    outcome = (
        f"promoted: v{registration.version} is champion"
        if promotion.promoted
        else f"not promoted: {promotion.reason}"
    )
    transfer_row = [
        [_fmt(transfer.get(k)) if k in transfer else "n/a (one release)" for k in ("acc", "bwt")]
        + [_fmt(transfer["fwt"]) if "fwt" in transfer else "n/a"]
    ]
    title = f"Forgetting report: {registration.name} v{registration.version} on {release.name}"

    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict {verdict}">gate {verdict.upper()}; {html.escape(outcome)}</p>',
        "<h2>Decision</h2>",
        _table(["", "check: value [interval] against threshold"], check_rows),
        "<h2>Retention on the test probes</h2>",
        _table(task_header, task_rows),
        _table(new_header, new_rows),
        _img(checks_png),
        "<h2>Accuracy matrix</h2>",
        _table(["ACC", "BWT", "FWT"], transfer_row),
        _img(heatmap),
    ]
    if trade_png:
        rows = [
            [
                c["label"],
                _fmt(c["new_task_score"]),
                _fmt(c["min_retention"]),
                "winner" if c.get("winner") else c.get("note", ""),
            ]
            for c in tournament or []
        ]
        sections += [
            "<h2>Tournament (dev probes)</h2>",
            _table(["candidate", "new task", "lowest retention", ""], rows),
            _img(trade_png),
        ]
    sections += [
        "<h2>Lineage</h2>",
        _table(None, lineage),
        f"<h2>Probe items that flipped ({len(flips)})</h2>",
        _table(flip_header, flip_rows) if flips else "<p>None: the same answers right.</p>",
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>"
    )
    html_path = run_dir / REPORT_HTML
    html_path.write_text(page, encoding="utf-8")

    md = [
        f"# {title}",
        f"**Gate {verdict.upper()}**: {outcome}",
        "## Decision",
        _md_table(["", "check"], check_rows),
        "## Retention on the test probes",
        _md_table(task_header, task_rows),
        _md_table(new_header, new_rows),
        f"ACC {transfer_row[0][0]}, BWT {transfer_row[0][1]}, FWT {transfer_row[0][2]}",
        "## Lineage",
        _md_table(["", ""], lineage),
        f"## Probe items that flipped ({len(flips)}; the first 20)",
        _md_table(flip_header, flip_rows[:20]) if flips else "None.",
    ]
    md_path = run_dir / REPORT_MD
    md_path.write_text("\n\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path


def publish(step: ReportStep, run_dir: Path, tournament: list[dict] | None = None) -> Path:
    """After promote, whichever driver ran the steps (the flow, a DVC stage, ``resume``): add
    the run to the workspace's accuracy matrix (the champion's row, the candidate's, whether it
    was promoted), write the report, attach both to the retrain's MLflow run (``report/``) and,
    inside a Prefect flow run, publish the markdown as the ``forgetting-report`` artifact.
    Every entry is idempotent, so a resumed run publishes once more without double rows.
    Returns the HTML report."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from flows.steps.register import log_artifact

    release = VersionedRelease.read(run_dir / FILES["version"])
    probe_set = ProbeSet.read(run_dir / FILES["probes"])
    report = EvalReport.read(run_dir / FILES["evaluate"])
    registration = Registration.read(run_dir / FILES["register"])
    promotion = Promotion.read(run_dir / FILES["promote"])
    matrix_file = step.matrix_file
    champion = probe_set.champion.version
    accuracy_matrix.record_scores(
        matrix_file,
        f"v{champion}" if champion else "base",
        probe_set.baseline | {release.name: probe_set.new_task_baseline},
    )
    accuracy_matrix.record_scores(
        matrix_file,
        f"v{registration.version}",
        report.scores | {release.name: report.new_task_score},
        release=release.name,
    )
    matrix = accuracy_matrix.record_scores(
        matrix_file, f"v{registration.version}", {}, promoted=promotion.promoted
    )
    heatmap = accuracy_matrix.plot(matrix, run_dir / "accuracy_matrix.png")
    log_artifact(step.store, registration.run_id, heatmap)
    html_report, md_report = write_report(step, run_dir, matrix, tournament)
    for path in (html_report, md_report, *sorted((run_dir / "plots").glob("*.png"))):
        log_artifact(step.store, registration.run_id, path, "report")
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=md_report.read_text(),
            key="forgetting-report",
            description=f"Forgetting report of {release.name}",
        )
    return html_report
