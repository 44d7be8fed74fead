"""Step 2, validate: Great Expectations suites over every file of a release (and probe sources).

Release files (``train.jsonl``, ``eval.jsonl``): an id, a prompt and a completion on every record
(``messages`` accepted), strings of bounded length, unique ids, the completion among ``choices``
when choices are given, no prompt that is also a probe prompt (training on the probes would
fake retention), and no eval prompt that is also a training prompt. Probe sources: id, prompt,
non-empty answers, a task, a known scoring, choices that contain the answers.

:func:`validate_step` applies every rule with the settings of ``params.yaml`` and is what the
Prefect flow, the DVC stage and ``forgetless validate`` all run. A failure is a
:class:`ValidationReport` naming file, line, record and rule; the run stops before training on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flows.data import RELEASE_FILES, DataError, read_jsonl
from flows.records import ChampionRef, ValidationReport, Violation

if TYPE_CHECKING:  # flows.config imports torch (through cf_strategies); the CLI imports this
    from flows.config import Params


class ValidationFailed(ValueError):
    def __init__(self, report: ValidationReport, limit: int = 20):
        self.report = report
        shown = "\n".join(f"  {v}" for v in report.violations[:limit])
        more = len(report.violations) - limit
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"release {report.release!r} failed validation "
            f"({len(report.violations)} violations):\n{shown}{tail}"
        )


def normalise_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def _text(value: Any) -> str | None:
    """Strings stay; a non-string becomes its repr so that only the type rule reports it."""
    return value if value is None or isinstance(value, str) else repr(value)


def release_rows(records: list[tuple[int, dict]]) -> pd.DataFrame:
    rows = []
    for line, r in records:
        prompt, completion, fmt = r.get("prompt"), r.get("completion"), "prompt/completion"
        if "messages" in r:
            msgs = r["messages"]
            ok = (
                isinstance(msgs, list)
                and len(msgs) >= 2
                and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
                and msgs[-1].get("role") == "assistant"
            )
            fmt = "messages" if ok else "malformed messages"
            if ok:
                prompt = "\n".join(str(m["content"]) for m in msgs[:-1])
                completion = msgs[-1]["content"]
        choices = r.get("choices")
        rows.append(
            {
                "line": line,
                "id": None if r.get("id") is None else str(r.get("id")),
                "prompt": _text(prompt),
                "completion": _text(completion),
                "format": fmt,
                "prompt_is_text": prompt is None or isinstance(prompt, str),
                "completion_is_text": completion is None or isinstance(completion, str),
                "answer_in_choices": not choices or completion in choices,
            }
        )
    return pd.DataFrame(rows)


def probe_rows(records: list[tuple[int, dict]]) -> pd.DataFrame:
    rows = []
    for line, r in records:
        answers, choices = r.get("answers"), r.get("choices") or []
        answers_ok = (
            isinstance(answers, list)
            and bool(answers)
            and all(isinstance(a, str) and a.strip() for a in answers)
        )
        rows.append(
            {
                "line": line,
                "id": None if r.get("id") is None else str(r.get("id")),
                "prompt": _text(r.get("prompt")),
                "task": _text(r.get("task")),
                "scoring": r.get("scoring", "generate"),
                "answers_ok": answers_ok,
                "choices_ok": (r.get("scoring", "generate") != "choice" or len(choices) >= 2)
                and (not choices or (answers_ok and set(answers) <= set(choices))),
            }
        )
    return pd.DataFrame(rows)


def _release_suite(gx, name: str, max_prompt: int, max_completion: int, eval_file: bool):
    E = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    rules = [
        E.ExpectColumnValuesToNotBeNull(column="id", meta={"rule": "every record needs an id"}),
        E.ExpectColumnValuesToBeUnique(column="id", meta={"rule": "ids must be unique"}),
        E.ExpectColumnValuesToBeInSet(
            column="format",
            value_set=["prompt/completion", "messages"],
            meta={"rule": "messages must be a list of {role, content} ending with the assistant"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="prompt_is_text", value_set=[True], meta={"rule": "prompt must be a string"}
        ),
        E.ExpectColumnValuesToBeInSet(
            column="completion_is_text",
            value_set=[True],
            meta={"rule": "completion must be a string"},
        ),
        E.ExpectColumnValuesToNotBeNull(
            column="prompt", meta={"rule": "a prompt (or messages) is required"}
        ),
        E.ExpectColumnValuesToNotBeNull(
            column="completion",
            meta={"rule": "a completion (or final assistant message) is required"},
        ),
        E.ExpectColumnValueLengthsToBeBetween(
            column="prompt",
            min_value=1,
            max_value=max_prompt,
            meta={"rule": f"prompt length must be 1..{max_prompt} characters"},
        ),
        E.ExpectColumnValueLengthsToBeBetween(
            column="completion",
            min_value=1,
            max_value=max_completion,
            meta={"rule": f"completion length must be 1..{max_completion} characters"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="answer_in_choices",
            value_set=[True],
            meta={"rule": "the completion must be one of the record's choices"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="is_probe_prompt",
            value_set=[False],
            meta={"rule": "prompt is a probe prompt (probe leaked into the release)"},
        ),
    ]
    if eval_file:
        rules.append(
            E.ExpectColumnValuesToBeInSet(
                column="in_train",
                value_set=[False],
                meta={
                    "rule": "eval prompt also appears in train.jsonl (eval leaked into training)"
                },
            )
        )
    for rule in rules:
        suite.add_expectation(rule)
    return suite


def _probe_suite(gx, name: str):
    E = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for rule in [
        E.ExpectColumnValuesToNotBeNull(column="id", meta={"rule": "every probe needs an id"}),
        E.ExpectColumnValuesToBeUnique(column="id", meta={"rule": "probe ids must be unique"}),
        E.ExpectColumnValuesToNotBeNull(
            column="prompt", meta={"rule": "a probe needs a prompt string"}
        ),
        E.ExpectColumnValuesToNotBeNull(
            column="task", meta={"rule": "a probe needs a task string"}
        ),
        E.ExpectColumnValuesToBeInSet(
            column="scoring",
            value_set=["generate", "choice"],
            meta={"rule": "scoring must be 'generate' or 'choice'"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="answers_ok",
            value_set=[True],
            meta={"rule": "answers must be a non-empty list of non-empty strings"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="choices_ok",
            value_set=[True],
            meta={"rule": "choice probes need 2+ choices that contain every answer"},
        ),
    ]:
        suite.add_expectation(rule)
    return suite


def _run_suite(gx, context, file: Path, df: pd.DataFrame, suite) -> list[Violation]:
    asset = context.data_sources.add_pandas(f"src-{len(context.data_sources.all())}")
    batch = (
        asset.add_dataframe_asset(file.name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    result = batch.validate(
        context.suites.add(suite),
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["line", "id"],
        },
    )
    violations = []
    for r in result.results:
        if r.success:
            continue
        rule = r.expectation_config.meta.get("rule", r.expectation_config.type)
        column = r.expectation_config.kwargs.get("column")
        for bad in r.result.get("unexpected_index_list") or []:
            rid = bad.get("id")
            value = bad.get(column)
            detail = (
                ""
                if column in ("id", None) or isinstance(value, bool | np.bool_)
                else _preview(value)
            )
            violations.append(
                Violation(
                    file=str(file),
                    line=int(bad["line"]),
                    record_id=None if rid is None or pd.isna(rid) else str(rid),
                    rule=rule,
                    detail=detail,
                )
            )
    return violations


def _preview(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "missing"
    text = str(value)
    return f"got {len(text)} characters: {text[:60]!r}" + ("..." if len(text) > 60 else "")


def _gx_context():
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    return gx, context


def _release_violations(
    gx,
    context,
    release_dir: Path,
    probes: set[str],
    max_prompt_chars: int,
    max_completion_chars: int,
    min_records: dict[str, int],
) -> tuple[list[Violation], dict[str, int]]:
    violations: list[Violation] = []
    checked: dict[str, int] = {}
    train_prompts: set[str] = set()
    for fname in RELEASE_FILES:
        file = release_dir / fname
        if not file.is_file():
            violations.append(
                Violation(file=str(file), line=None, record_id=None, rule="file is missing")
            )
            continue
        try:
            records = read_jsonl(file)
        except DataError as exc:
            violations.append(
                Violation(file=exc.file, line=exc.line, record_id=None, rule=exc.rule)
            )
            continue
        checked[fname] = len(records)
        need = min_records.get(fname.removesuffix(".jsonl"), 1)
        if len(records) < need:
            violations.append(
                Violation(
                    file=str(file),
                    line=None,
                    record_id=None,
                    rule=f"needs at least {need} records, has {len(records)}",
                )
            )
            continue
        df = release_rows(records)
        norm = df["prompt"].map(lambda p: normalise_prompt(p) if isinstance(p, str) else "")
        df["is_probe_prompt"] = norm.isin(probes)
        if fname == "train.jsonl":
            train_prompts = set(norm)
        else:
            df["in_train"] = norm.isin(train_prompts)
        suite = _release_suite(
            gx,
            f"{release_dir.name}-{fname}",
            max_prompt_chars,
            max_completion_chars,
            eval_file=fname != "train.jsonl",
        )
        violations += _run_suite(gx, context, file, df, suite)
    return violations, checked


def validate_release(
    release_dir: Path,
    probe_prompts: Iterable[str],
    max_prompt_chars: int = 2000,
    max_completion_chars: int = 500,
    min_records: dict[str, int] | None = None,
) -> ValidationReport:
    """Run the release suites; the report lists every violation (empty when it passed)."""
    release_dir = Path(release_dir)
    gx, context = _gx_context()
    violations, checked = _release_violations(
        gx,
        context,
        release_dir,
        {normalise_prompt(p) for p in probe_prompts},
        max_prompt_chars,
        max_completion_chars,
        min_records or {},
    )
    violations.sort(key=lambda v: (v.file, v.line or 0))
    return ValidationReport(
        release=release_dir.name, passed=not violations, violations=violations, checked=checked
    )


def _probe_source_violations(
    gx, context, path: Path
) -> tuple[list[Violation], list[tuple[int, dict]]]:
    """The probe rules on one source file, and its records (none when it cannot be read)."""
    if not path.is_file():
        return [Violation(file=str(path), line=None, record_id=None, rule="file is missing")], []
    try:
        records = read_jsonl(path)
    except DataError as exc:
        return [Violation(file=exc.file, line=exc.line, record_id=None, rule=exc.rule)], []
    if not records:
        v = Violation(file=str(path), line=None, record_id=None, rule="probe source is empty")
        return [v], []
    suite = _probe_suite(gx, f"probes-{len(context.suites.all())}-{path.stem}")
    return _run_suite(gx, context, path, probe_rows(records), suite), records


def validate_probe_source(path: Path) -> ValidationReport:
    """Run the probe rules on one probe-source file."""
    path = Path(path)
    gx, context = _gx_context()
    violations, records = _probe_source_violations(gx, context, path)
    return ValidationReport(
        release=path.name,
        passed=not violations,
        violations=violations,
        checked={path.name: len(records)} if records else {},
    )


def _rehearsal_leaks(path: Path, probes: set[str]) -> list[Violation]:
    """Rehearsal prompts that are probe prompts: rehearsing them would fake retention."""
    try:
        records = read_jsonl(path)
    except FileNotFoundError:
        return [Violation(file=str(path), line=None, record_id=None, rule="file is missing")]
    except DataError as exc:
        return [Violation(file=exc.file, line=exc.line, record_id=None, rule=exc.rule)]
    return [
        Violation(
            file=str(path),
            line=line,
            record_id=None if r.get("id") is None else str(r.get("id")),
            rule="rehearsal prompt is a probe prompt (probe leaked into training)",
        )
        for line, r in records
        if isinstance(r.get("prompt"), str) and normalise_prompt(r["prompt"]) in probes
    ]


def validate_step(params: Params, release_dir: Path, champion: ChampionRef) -> ValidationReport:
    """Every rule, whichever driver asks (the flow, the DVC stage, ``forgetless validate``).

    The release suites with the record minimums of ``params.data``; no release prompt that is a
    probe prompt of ``champion`` (probe sources and the eval items of the releases it learned);
    the probe rules on every file of ``probes.sources``; and, for a strategy that rehearses
    prompts, no rehearsal prompt that is a probe prompt.
    """
    import cf_strategies
    from flows.finetune import rehearsal_prompt_file
    from flows.probes import learned_probe_items, probe_sources

    release_dir = Path(release_dir)
    cfg = params.data
    gx, context = _gx_context()
    violations: list[Violation] = []
    checked: dict[str, int] = {}
    prompts = [item["prompt"] for item in learned_probe_items(params, champion)]
    for source in probe_sources(params):
        found, records = _probe_source_violations(gx, context, source)
        violations += found
        if records:
            checked[source.name] = len(records)
        prompts += [r["prompt"] for _, r in records if isinstance(r.get("prompt"), str)]
    probes = {normalise_prompt(p) for p in prompts}
    found, release_checked = _release_violations(
        gx,
        context,
        release_dir,
        probes,
        cfg.max_prompt_chars,
        cfg.max_completion_chars,
        {"train": cfg.min_train_records, "eval": cfg.min_eval_records},
    )
    violations += found
    checked |= release_checked
    names = cf_strategies.split_spec(params.train.strategy)
    if any(cf_strategies.STRATEGIES[n].uses_rehearsal_prompts for n in names):
        violations += _rehearsal_leaks(rehearsal_prompt_file(params), probes)
    violations.sort(key=lambda v: (v.file, v.line or 0))
    return ValidationReport(
        release=release_dir.name, passed=not violations, violations=violations, checked=checked
    )
