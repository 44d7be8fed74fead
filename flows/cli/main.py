"""The ``forgetless`` command: ``run``, ``validate``, ``submit``, ``step``, ``resume``,
``schema``, ``demo-data``, ``status``, ``strategies``, and the registry commands ``history``,
``rollback``, ``promote`` and ``prune``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.core.records import STAGES

console = Console()


def parse_overrides(pairs: list[str]) -> dict:
    """``--set train.max_steps=5`` → ``{"train.max_steps": 5}`` (values parsed as YAML)."""
    from flows.core.config import ParamsError
    from flows.core.safe_yaml import YamlError, cut, load_yaml, shown

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ParamsError(f"--set expects KEY=VALUE, got {shown(pair)}")
        key, value = pair.split("=", 1)
        try:
            out[key] = load_yaml(value)
        except YamlError as exc:
            raise ParamsError(f"--set {cut(key)}: {exc.rule}") from None
    return out


def print_summary(summary) -> None:
    ev, gate = summary.eval, summary.gate
    table = Table(title=escape(f"Retrain on {summary.release} with strategy {summary.strategy}"))
    table.add_column("measure")
    table.add_column("champion", justify="right")
    table.add_column("candidate", justify="right")
    table.add_column("kept vs champion", justify="right")
    table.add_column("kept vs anchor", justify="right")
    table.add_row(
        escape(f"new task: {ev.new_task}"),
        f"{ev.new_task_baseline:.3f}",
        f"{ev.new_task_score:.3f}",
        "",
        "",
    )

    def kept(s) -> str:
        return f"{s.value:.3f} ≥{s.low:.3f} ({s.against})" if s else ""

    for t in sorted(ev.baseline):
        table.add_row(
            escape(f"probe: {t}"),
            f"{ev.baseline[t]:.3f}",
            f"{ev.scores.get(t, 0):.3f}",
            kept(ev.tasks.get(t)),
            kept(ev.anchored.get(t)),
        )
    console.print(table)
    verdict = "[green]PASSED[/green]" if gate.passed else "[red]FAILED[/red]"
    console.print(f"Gate {verdict}")
    for check in gate.checks:
        console.print(f"  {'✓' if check.passed else '✗'} {escape(str(check))}")
    reg, promo = summary.registration, summary.promotion
    status = "is now [bold]champion[/bold]" if promo.promoted else f"not promoted: {promo.reason}"
    console.print(
        f"Model {reg.name} v{reg.version} {escape(status) if not promo.promoted else status}"
    )
    console.print(
        f"Wall time {summary.wall_seconds:.0f}s (training {summary.train_seconds:.0f}s, "
        f"evaluation {summary.eval_seconds:.0f}s, everything else {summary.overhead_share:.0%}); "
        f"outputs in {escape(str(summary.run_dir))}"
    )


def cmd_run(args) -> int:
    from flows.core.config import load_params
    from flows.drivers.retrain import PrefectUnavailable, retrain
    from flows.production.landing import NoNewRelease

    load_params(args.params, parse_overrides(args.set))  # a bad file fails here, before a flow
    try:
        summary = retrain(
            params_file=args.params, release=args.release, overrides=parse_overrides(args.set)
        )
    except PrefectUnavailable as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    if isinstance(summary, NoNewRelease):  # a scheduled run with nothing new: not an error
        console.print(escape(summary.message), soft_wrap=True)
        return 0
    print_summary(summary)
    return 0


def cmd_validate(args) -> int:
    from flows.core.config import load_params
    from flows.registry.tracking import current_champion
    from flows.steps.validate import ValidateStep, ValidationFailed, validate_step

    params = load_params(args.params)
    report = validate_step(
        ValidateStep.from_params(params),
        Path(args.release).resolve(),
        current_champion(params.model_store),
    )
    if report.passed:
        console.print(f"[green]{escape(args.release)}: valid[/green] {escape(str(report.checked))}")
        return 0
    console.print(f"[red]{escape(str(ValidationFailed(report, limit=100)))}[/red]")
    return 1


def cmd_submit(args) -> int:
    from flows.core.config import load_params
    from flows.production.landing import submit
    from flows.steps.validate import ValidationFailed

    params = load_params(args.params)
    try:
        done = submit(params, Path(args.release))
    except ValidationFailed as exc:  # the message of `forgetless validate`; nothing landed
        console.print(f"[red]{escape(str(exc))}[/red]")
        return 1
    r = done.release
    if not done.new:
        console.print(
            f"already landed: the same content (hash {r.hash}) is {escape(r.name)} in "
            f"{escape(r.uri)}, landed {r.landed_at:%Y-%m-%d %H:%M:%S} UTC; nothing written",
            soft_wrap=True,
        )
        return 0
    event = f"event {done.event_id}" if done.event_id else "no Prefect event sent"
    console.print(
        f"[green]landed {escape(r.name)}[/green] in {escape(r.uri)} (content hash {r.hash}); "
        f"forgetless.release.landed: {event}",
        soft_wrap=True,
    )
    return 0


def cmd_step(args) -> int:
    from flows.core.config import load_params
    from flows.demo.build import build_demo, demo_releases
    from flows.drivers.stages import run_stage

    params = load_params(args.params)
    release = params.path(params.data.release) if params.data.release else None
    if release is None:  # the DVC driver's default: the first demo release
        release = demo_releases(build_demo(params.path(params.data.demo_dir)))[0]
    run_stage(args.stage, params, Path(args.run_dir), release)
    return 0


def cmd_resume(args) -> int:
    from flows.core.config import load_params
    from flows.core.records import FILES, Promotion, Registration
    from flows.drivers.stages import ResumeError, resume
    from flows.steps.version import RemoteUnavailable

    run_dir = Path(args.run_dir).resolve()
    try:
        ran = resume(load_params(args.params), run_dir)
    except (ResumeError, RemoteUnavailable) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    if not ran:
        console.print(f"nothing to resume: every step of {escape(str(run_dir))} has its record")
        return 0
    console.print(f"resumed {escape(str(run_dir))}: ran {', '.join(ran)}")
    reg = Registration.read(run_dir / FILES["register"])
    promo = Promotion.read(run_dir / FILES["promote"])
    status = "is now champion" if promo.promoted else f"not promoted: {promo.reason}"
    console.print(f"Model {reg.name} v{reg.version} {escape(status)}")
    return 0


def cmd_schema(args) -> int:
    """The JSON Schema of one input (``flows/core/schemas.py``, ``flows/core/config.py``)."""
    import json

    from flows.core.config import Params
    from flows.core.schemas import ProbeItem, RehearsalPrompt, ReleaseRecord

    model = {
        "release": ReleaseRecord,
        "probe": ProbeItem,
        "rehearsal": RehearsalPrompt,
        "params": Params,
    }[args.kind]
    print(json.dumps(model.model_json_schema(), indent=1, ensure_ascii=False))
    return 0


def cmd_demo_data(args) -> int:
    from flows.demo.build import build_demo

    out = build_demo(Path(args.out))
    console.print(f"demo releases and probes in {escape(str(out))}")
    return 0


def cmd_status(args) -> int:
    from flows.core.config import load_params
    from flows.registry.tracking import current_champion
    from flows.scoring import accuracy_matrix

    params = load_params(args.params)
    champ = current_champion(params.model_store)
    console.print(
        escape(
            f"champion: {champ.version or 'base model'} ({champ.model_dir}); learned {champ.releases}"
        )
    )
    print_lineage(params)
    matrix = accuracy_matrix.load(params.workspace_dir / "accuracy_matrix.json")
    cols = accuracy_matrix.tasks(matrix)
    table = Table(title="accuracy matrix R[i][j]")
    table.add_column("model")
    for c in cols:
        table.add_column(escape(c), justify="right")
    for row in matrix["rows"]:
        cells = [f"{row['scores'][c]:.3f}" if c in row["scores"] else "" for c in cols]
        table.add_row(escape(row["label"] + (" *" if row.get("promoted") else "")), *cells)
    console.print(table)
    return 0


def print_lineage(params) -> None:
    """The champion and the champions before it, back to the base model."""
    from flows.registry.history import lineage

    entries = lineage(params.model_store)
    chain = " ← ".join(
        e.version if e.version in ("base", "?") else f"v{e.version}" for e in entries
    )
    table = Table(title=f"champion lineage: {escape(chain)}")
    table.add_column("version")
    table.add_column("release")
    table.add_column("strategy")
    table.add_column("became champion")
    for e in entries:
        table.add_row(e.version, escape(e.release), escape(e.strategy), escape(e.how))
    console.print(table)


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def cmd_history(args) -> int:
    from flows.core.config import load_params
    from flows.registry.history import history

    params = load_params(args.params)
    rows = history(params.model_store)
    if not rows:
        console.print(f"no versions of {params.model.registered_name} registered yet")
        return 0
    table = Table(title=f"{params.model.registered_name}: every registered version, oldest first")
    for col, justify in [
        ("version", "right"),
        ("release", "left"),
        ("strategy", "left"),
        ("gate", "left"),
        ("new task", "right"),
        ("kept vs champion", "right"),
        ("kept vs anchor", "right"),
        ("promoted", "left"),
        ("champion", "left"),
    ]:
        table.add_column(col, justify=justify)
    for r in rows:
        gate = r.gate + (f": {r.gate_reasons}" if r.gate == "failed" and r.gate_reasons else "")
        promoted = ("yes" if r.promoted else "no") + (f": {r.promotion}" if r.promotion else "")
        promoted = "\n".join([promoted, *r.notes])
        table.add_row(
            r.version,
            escape(r.release),
            escape(r.strategy),
            escape(gate),
            _score(r.new_task_score),
            _score(r.min_retention),
            _score(r.min_vs_anchor),
            escape(promoted),
            "[bold]champion[/bold]" if r.champion else "",
        )
    console.print(table)
    return 0


def _describe(version: str | None) -> str:
    return f"v{version}" if version else "the base model"


def cmd_rollback(args) -> int:
    from flows.core.config import load_params
    from flows.steps.promote import rollback

    params = load_params(args.params)
    move = rollback(params.model_store, args.version, args.reason)
    console.print(
        f"champion of {move.name}: {_describe(move.from_version)} → {_describe(move.to_version)} "
        f"(rollback by {escape(move.by)} at {move.at}: {escape(move.reason)})"
    )
    if move.to_version is None:
        console.print(
            f"the {move.name}@champion alias is removed: the base model ({escape(params.model.base)})"
            " stands in, and the next retrain is measured against it"
        )
    return 0


def cmd_promote(args) -> int:
    from flows.core.config import load_params
    from flows.steps.promote import force_promote

    params = load_params(args.params)
    move = force_promote(params.model_store, args.version, args.force, args.reason)
    console.print(
        f"champion of {move.name}: {_describe(move.from_version)} → {_describe(move.to_version)} "
        f"(forced promotion by {escape(move.by)} at {move.at}: {escape(move.reason)})"
    )
    return 0


def cmd_prune(args) -> int:
    from flows.core.config import load_params
    from flows.registry.prune import prune

    params = load_params(args.params)
    keep = params.registry.keep_failed_weights if args.keep is None else args.keep
    if keep is None:
        console.print("registry.keep_failed_weights is null: the retention policy removes nothing")
        return 0
    decided = prune(params.model_store, keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    table = Table(title=f"retention policy: failed versions' weights go after {keep} newer")
    for col in ("version", "release", "newer", "weights", "why"):
        table.add_column(col)
    for d in decided:
        what = f"{verb} {d.bytes / 1e6:.1f} MB" if d.remove else "kept"
        table.add_row(d.version, escape(d.release), str(d.newer), what, escape(d.reason))
    console.print(table)
    freed = sum(d.bytes for d in decided if d.remove)
    console.print(
        f"{verb} the weights of {sum(d.remove for d in decided)} version(s): "
        f"{freed / 1e6:.1f} MB; their runs, metrics and reports stay"
    )
    return 0


def cmd_strategies(args) -> int:
    from flows.cli import strategy_guide as guide

    results = Path(args.results) if args.results else None
    if guide.results_available(results):
        console.print(f"measured costs from {guide.results_dir(results)}")
    else:
        console.print(f"[yellow]{escape(guide.missing_results(results))}[/yellow]")
    table = Table(title="Registered strategies", show_lines=True)
    table.add_column("strategy")
    table.add_column("stores between releases")
    table.add_column("extra cost per training step")
    table.add_column("measured in", overflow="fold")
    table.add_column("task id at inference")
    table.add_column("pipeline")
    for f in guide.strategy_facts(results):
        cost, source = f.step_cost.text, f.step_cost.source
        if f.once_cost is not None:
            cost += f"\nonce per release: {f.once_cost.text}"
            source = "\n".join(x for x in (source, f.once_cost.source) if x)
        table.add_row(
            f.name,
            escape(f.stores),
            escape(cost),
            escape(source or "—"),
            "yes" if f.needs_task_id else "no",
            escape(f.pipeline),
        )
    console.print(table)
    table = Table(title="Which strategy when (each backed by measured rows)", show_lines=True)
    table.add_column("scenario")
    table.add_column("choose")
    table.add_column("measured rows", overflow="fold")
    table.add_column("mind")
    for scenario, cited, pipeline in guide.advice(results):
        rows = "\n".join(f"• {c}" for c in cited) or (
            "not measured yet" if not scenario.rows else "no results to read"
        )
        mind = " ".join(x for x in (scenario.mind, pipeline) if x)
        table.add_row(scenario.when, scenario.choose, escape(rows), escape(mind))
    console.print(table)
    return 0


class _NoTracebackFor(logging.Filter):
    """Drops the traceback from a Prefect run's log record when the run failed on a user's
    mistake (bad params, bad data): the CLI says what is wrong in one line after it."""

    def __init__(self, kinds: tuple[type[BaseException], ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgetless", description=__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="retrain on a release: version, validate, probes, fine-tune, evaluate, gate, register, promote",
    )
    run.add_argument(
        "--release",
        help="release folder (train.jsonl, eval.jsonl); default: data.release, else the oldest "
        "new release in data.landing, else the next demo release",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. train.max_steps=5",
    )
    run.set_defaults(fn=cmd_run)
    val = sub.add_parser("validate", help="validate a release folder without training")
    val.add_argument("release")
    val.set_defaults(fn=cmd_validate)
    sm = sub.add_parser(
        "submit",
        help="validate a release folder and land it in data.landing (once per content hash) "
        "for scheduled retrains",
    )
    sm.add_argument("release")
    sm.set_defaults(fn=cmd_submit)
    step = sub.add_parser("step", help="run one pipeline step on a run folder (the DVC stages)")
    step.add_argument("stage", choices=STAGES)
    step.add_argument("--run-dir", default="artifacts/dvc-run")
    step.set_defaults(fn=cmd_step)
    res = sub.add_parser(
        "resume",
        help="finish a run that stopped (e.g. tracking server down): run the steps whose "
        "records RUN_DIR lacks; a version registered before is reused, never duplicated",
    )
    res.add_argument("run_dir", metavar="RUN_DIR")
    res.set_defaults(fn=cmd_resume)
    sch = sub.add_parser(
        "schema",
        help="print the JSON Schema of a release record, probe item, rehearsal prompt or params",
    )
    sch.add_argument("kind", choices=["release", "probe", "rehearsal", "params"])
    sch.set_defaults(fn=cmd_schema)
    demo = sub.add_parser("demo-data", help="write the embedded demo releases and probe source")
    demo.add_argument("--out", default=".cache/demo-data")
    demo.set_defaults(fn=cmd_demo_data)
    st = sub.add_parser("status", help="the champion, its lineage and the accuracy matrix")
    st.set_defaults(fn=cmd_status)
    strat = sub.add_parser(
        "strategies",
        help="every strategy: what it stores, its measured cost per step, task id, pipeline; "
        "which to choose when",
    )
    strat.add_argument("--results", help="benchmark results folder (default: benchmarks/results)")
    strat.set_defaults(fn=cmd_strategies)
    hist = sub.add_parser(
        "history", help="every registered version: release, strategy, gate, scores, promotion"
    )
    hist.set_defaults(fn=cmd_history)
    rb = sub.add_parser(
        "rollback",
        help="move the champion back: to the previous champion, or to VERSION (one that was "
        "champion before or passed the gate); 'base' removes the alias",
    )
    rb.add_argument("version", nargs="?", help="version number or 'base' (default: previous)")
    rb.add_argument("--reason", help="why (required; recorded on both versions)")
    rb.set_defaults(fn=cmd_rollback)
    pr = sub.add_parser(
        "promote", help="audited override: make VERSION champion whatever its gate said"
    )
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="required: this overrides the gate")
    pr.add_argument("--reason", help="why (required; recorded on the version)")
    pr.set_defaults(fn=cmd_promote)
    pn = sub.add_parser(
        "prune",
        help="retention policy: remove the weights of versions that failed the gate once "
        "registry.keep_failed_weights newer versions exist (runs, metrics, reports stay)",
    )
    pn.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    pn.add_argument("--keep", type=int, help="newer versions to wait for (default: params.yaml)")
    pn.set_defaults(fn=cmd_prune)
    args = parser.parse_args(argv)
    from flows.core.config import ParamsError
    from flows.core.data import DataError
    from flows.production.landing import LandingError
    from flows.registry.locks import LockMisconfigured, LockUnavailable
    from flows.registry.tracking import TrackingUnavailable
    from flows.steps.promote import RegistryActionError
    from flows.steps.validate import ValidationFailed
    from flows.steps.version import RemoteUnavailable

    user_errors = (
        ParamsError,
        DataError,
        ValidationFailed,
        TrackingUnavailable,
        RemoteUnavailable,
        RegistryActionError,
        LockUnavailable,
        LockMisconfigured,
        LandingError,
    )
    quiet = _NoTracebackFor(user_errors)
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # a user's mistake is one line
        logging.getLogger(name).addFilter(quiet)
    try:
        return args.fn(args)
    except user_errors as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    except OSError as exc:  # a path that cannot be used: say which, without a traceback
        where = f": {exc.filename}" if exc.filename else ""
        console.print(
            f"[red]error:[/red] {escape(exc.strerror or str(exc))}{escape(str(where))}",
            soft_wrap=True,
        )
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow."):
            raise
        console.print(f"[red]error:[/red] MLflow: {escape(str(exc))}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
