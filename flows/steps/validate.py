"""Step 2, validate: Great Expectations suites over every file of a release (and probe sources).

:func:`validate_step` applies every rule with the settings of ``params.yaml`` and is what the
Prefect flow, the DVC stage and ``forgetless validate`` all run. A failure is a
:class:`ValidationReport` naming file, line, record and rule; the run stops before training on it,
and validation only reads: the release folder is left as it was.

The release folder (one report per broken rule, at the file and line that break it):

- it holds ``train.jsonl`` and ``eval.jsonl`` as regular files (a missing file, a dangling link,
  a link loop, a folder, a named pipe or a device each get their own words, at once:
  :mod:`flows.core.files`), and no symbolic link (a release file or anything else, at any depth)
  points outside the folder (such a file is not read); the folder is at most 16 levels deep and
  holds at most 10,000 entries;
- every line is UTF-8 without a byte-order mark, at most 1 MB, and strict JSON: no ``NaN``, no
  key twice; each non-blank line is a JSON object (:func:`flows.core.data.read_jsonl`; it stops at
  the first bad line);
- no file is empty, and each holds at least ``data.min_train_records`` / ``min_eval_records``.

Each record keeps the schema :class:`flows.core.schemas.ReleaseRecord` (strict types, no unknown
key, every text checked, prompt and completion within ``data.max_prompt_chars`` /
``data.max_completion_chars``), and its id is unique within its file, compared as NFC text
(``7`` and ``"7"`` collide).

Leaks, found by :class:`flows.core.leaks.LeakIndex` as a careful reviewer would: the same text after
normalisation (NFKC, case folding, Unicode confusables, punctuation, spacing and invisible
characters ignored), one text inside the other (a prefix, suffix or instruction added; a prompt
pasted into a completion), or a near-duplicate (a few words misspelt; threshold 0.9 of the
rarity-weighted words, see the module for the rules and their reasons):

- no release prompt or completion leaks a probe prompt: the probe sources', and the eval
  items' of every release the champion has learned (training on the probes would fake
  retention);
- no eval prompt leaks into a train prompt or completion (the new-task score would measure
  memorisation);
- with a strategy that rehearses prompts, no rehearsal prompt leaks a probe prompt.

The champion's releases:

- the release is not one the champion has learned: neither the workspace copy of a learned
  release (a changed release needs a new name) nor identical in content to one. Content is
  compared by :func:`release_content_hash`, computed here from the records of the release and of
  each learned release's workspace copy ``<workspace>/releases/<name>`` (what the version step
  wrote and DVC tracks). The hash ignores ids, record order and JSON layout; DVC's md5 of the
  folder would not, since it hashes bytes. A learned release missing from the workspace is
  reported too.

Probe sources (``probes.sources``): every item keeps :class:`flows.core.schemas.ProbeItem`, ids
unique. The rehearsal prompts (with a strategy that uses them) keep
:class:`flows.core.schemas.RehearsalPrompt`.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flows.core.config import DataConfig, Params
from flows.core.data import (
    RELEASE_FILES,
    RELEASE_NAME,
    RELEASE_NAME_RULE,
    DataError,
    links_outside,
    read_jsonl,
)
from flows.core.leaks import DEFAULT_THRESHOLD, LeakIndex
from flows.core.records import ChampionRef, ValidationReport, Violation
from flows.core.schemas import (
    ProbeItem,
    RehearsalPrompt,
    ReleaseRecord,
    bad_character,
    id_key,
    record_errors,
)


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


def _schema_column(errors: list[tuple[str, str]]) -> str | None:
    """A record's broken rules as one cell: ``rule<TAB>detail`` lines, or None."""
    return "\n".join(f"{rule}\t{detail}" for rule, detail in errors) or None


def _id_or_none(value: Any) -> str | None:
    """The id uniqueness compares (:func:`id_key`), or None for one the schema rejects."""
    if isinstance(value, bool) or not isinstance(value, str | int) or bad_character(value, True):
        return None
    return id_key(value)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and not bad_character(value) else None


def release_rows(records: list[tuple[int, dict]], limits: dict[str, int]) -> pd.DataFrame:
    """One row per record: its id and texts, and the rules of :class:`ReleaseRecord` it breaks
    (``limits``: ``max_prompt_chars``, ``max_completion_chars``)."""
    rows = []
    for line, r in records:
        errors = record_errors(ReleaseRecord, r, limits)
        prompt, completion = r.get("prompt"), r.get("completion")
        messages = r.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            contents = [m.get("content") for m in messages]
            if all(isinstance(c, str) for c in contents):
                prompt, completion = "\n".join(contents[:-1]), contents[-1]
        rid = r.get("id")
        rows.append(
            {
                "line": line,
                "id": _id_or_none(rid),
                "prompt": _text_or_none(prompt),
                "completion": _text_or_none(completion),
                "schema": _schema_column(errors),
            }
        )
    return pd.DataFrame(rows, columns=["line", "id", "prompt", "completion", "schema"])


def probe_rows(records: list[tuple[int, dict]]) -> pd.DataFrame:
    """One row per probe item: its id and the rules of :class:`ProbeItem` it breaks."""
    rows = []
    for line, r in records:
        rid = r.get("id")
        rows.append(
            {
                "line": line,
                "id": _id_or_none(rid),
                "schema": _schema_column(record_errors(ProbeItem, r)),
            }
        )
    return pd.DataFrame(rows, columns=["line", "id", "schema"])


def _release_suite(gx, name: str, eval_file: bool):
    E = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    rules = [
        E.ExpectColumnValuesToBeNull(
            column="schema",
            meta={"rule": "record breaks the release schema", "rules_in_value": True},
        ),
        E.ExpectColumnValuesToBeUnique(column="id", meta={"rule": "ids must be unique"}),
        E.ExpectColumnValuesToBeNull(
            column="probe_leak",
            meta={
                "rule": "holds a probe prompt (probe leaked into the release)",
                "detail_is_value": True,
            },
        ),
    ]
    if eval_file:
        rules.append(
            E.ExpectColumnValuesToBeNull(
                column="train_leak",
                meta={
                    "rule": "eval prompt also appears in train.jsonl (eval leaked into training)",
                    "detail_is_value": True,
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
        E.ExpectColumnValuesToBeNull(
            column="schema",
            meta={"rule": "probe item breaks the probe schema", "rules_in_value": True},
        ),
        E.ExpectColumnValuesToBeUnique(column="id", meta={"rule": "probe ids must be unique"}),
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
        meta = r.expectation_config.meta
        rule = meta.get("rule", r.expectation_config.type)
        column = r.expectation_config.kwargs.get("column")
        for bad in r.result.get("unexpected_index_list") or []:
            rid = bad.get("id")
            value = bad.get(column)
            record_id = None if rid is None or pd.isna(rid) else str(rid)
            if meta.get("rules_in_value"):  # one cell lists every rule the record broke
                broken = [cell.partition("\t")[::2] for cell in str(value).split("\n")]
            elif meta.get("detail_is_value"):
                broken = [(rule, str(value))]
            elif column in ("id", None) or isinstance(value, bool | np.bool_):
                broken = [(rule, "")]
            else:
                broken = [(rule, _preview(value))]
            violations += [
                Violation(
                    file=str(file), line=int(bad["line"]), record_id=record_id, rule=r, detail=d
                )
                for r, d in broken
            ]
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


class Leaks:
    """What must not leak into a text (probe prompts, or a release's eval prompts), indexed by
    :class:`flows.core.leaks.LeakIndex`: the same text after normalisation, contained in the text or
    containing it, or a near-duplicate."""

    def __init__(self, references: Iterable[Any], threshold: float = DEFAULT_THRESHOLD):
        kept = [(i, r) for i, r in enumerate(references) if isinstance(r, str) and r.strip()]
        self.positions = [i for i, _ in kept]  # where each indexed reference was given
        self.references = [r for _, r in kept]
        self.index = LeakIndex(self.references, threshold=threshold)

    def find(self, texts: Iterable[tuple[str, Any]]) -> tuple[int, str] | None:
        """(position of the reference as given, detail) of the first text of ``(what, text)``
        that leaks one, or None."""
        for what, text in texts:
            if isinstance(text, str) and text and not bad_character(text):
                leak = self.index.find(text)
                if leak is not None:
                    shown_ref = _preview(self.references[leak.reference]).removeprefix("got ")
                    detail = f"{what} {leak.describe()}: {shown_ref}"
                    return self.positions[leak.reference], detail
        return None


def _release_violations(
    gx,
    context,
    release_dir: Path,
    probes: Leaks,
    limits: dict[str, int],
    min_records: dict[str, int],
) -> tuple[list[Violation], dict[str, int]]:
    threshold = probes.index.threshold
    if not release_dir.is_dir():
        what = "is not a folder" if release_dir.exists() else "does not exist"
        rule = f"{what} (a release is a folder with {' and '.join(RELEASE_FILES)})"
        return [Violation(file=str(release_dir), line=None, record_id=None, rule=rule)], {}
    violations = links_outside(release_dir)
    unsafe = {v.file for v in violations}  # never read through a link that leaves the folder
    checked: dict[str, int] = {}
    frames: dict[str, pd.DataFrame] = {}
    for fname in RELEASE_FILES:
        file = release_dir / fname
        if str(file) in unsafe:
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
            rule = (
                f"needs at least {need} records, has {len(records)}"
                if records
                else "file is empty (no records)"
            )
            violations.append(Violation(file=str(file), line=None, record_id=None, rule=rule))
            continue
        df = release_rows(records, limits)
        df["probe_leak"] = [
            (found := probes.find([("prompt", p), ("completion", c)])) and found[1]
            for p, c in zip(df["prompt"], df["completion"], strict=True)
        ]
        frames[fname] = df
    train, evals = frames.get("train.jsonl"), frames.get("eval.jsonl")
    if evals is not None:
        evals["train_leak"] = None
        if train is not None:  # an eval prompt in a train prompt or completion, or near one
            eval_prompts = Leaks(evals["prompt"], threshold)
            for line, p, c in zip(train["line"], train["prompt"], train["completion"], strict=True):
                found = eval_prompts.find([("prompt", p), ("completion", c)])
                if found is None:
                    continue
                same = evals["prompt"] == evals.at[found[0], "prompt"]  # every copy of it
                for row in evals.index[same & evals["train_leak"].isna()]:
                    evals.at[row, "train_leak"] = f"train.jsonl line {line}: {found[1]}"
    for fname, df in frames.items():
        suite = _release_suite(gx, f"{release_dir.name}-{fname}", eval_file=fname != "train.jsonl")
        violations += _run_suite(gx, context, release_dir / fname, df, suite)
    return violations, checked


def release_content_hash(folder: Path) -> str:
    """SHA-256 of what a release teaches: the records of each split without their ids, as
    canonical JSON (sorted keys, NFC text) in sorted order. Two releases that differ only in ids,
    record order, key order or spacing hash alike. Raises what :func:`read_jsonl` raises."""
    digest = hashlib.sha256()
    for fname in RELEASE_FILES:
        rows = sorted(
            unicodedata.normalize(
                "NFC",
                json.dumps(
                    {k: v for k, v in r.items() if k != "id"},
                    sort_keys=True,
                    ensure_ascii=False,
                    separators=(",", ":"),
                ),
            )
            for _, r in read_jsonl(folder / fname)
        )
        digest.update(f"{fname}\0{len(rows)}\0".encode())
        digest.update("\n".join(rows).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def learned_release_violations(
    workspace: Path, release_dir: Path, champion: ChampionRef
) -> tuple[list[Violation], list[str]]:
    """The release must not be one the champion has learned: not the workspace copy of one (the
    version step wrote it over the learned one: a changed release needs a new name), and not
    identical in content to one. Also the learned releases that can be read, for their probes."""
    violations: list[Violation] = []
    readable: list[str] = []
    here = Path(os.path.realpath(release_dir))
    try:
        own = None if links_outside(release_dir) else release_content_hash(release_dir)
    except (OSError, DataError):
        own = None  # the release rules report why
    for name in champion.releases:
        folder = workspace / "releases" / name
        where = dict(file=str(release_dir), line=None, record_id=None)
        if Path(os.path.realpath(folder)) == here:
            rule = (
                "the champion has already learned a release of this name "
                "(a new release needs a new name)"
            )
            violations.append(Violation(**where, rule=rule, detail=f"release {name!r}"))
            continue
        try:
            learned = release_content_hash(folder)
        except (OSError, DataError) as exc:
            violations.append(
                Violation(
                    file=str(folder),
                    line=None,
                    record_id=None,
                    rule="a release the champion has learned cannot be read from the workspace "
                    "(restore it with dvc checkout or dvc pull)",
                    detail=str(exc),
                )
            )
            continue
        readable.append(name)
        if learned == own:
            violations.append(
                Violation(
                    **where,
                    rule="identical in content to a release the champion has already learned",
                    detail=f"release {name!r}, content hash {own[:12]}",
                )
            )
    return violations, readable


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
        Leaks(probe_prompts),
        {"max_prompt_chars": max_prompt_chars, "max_completion_chars": max_completion_chars},
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
    from flows.core.lm_eval_source import read_source

    try:
        records = read_source(path)
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


def _rehearsal_violations(path: Path, probes: Leaks) -> list[Violation]:
    """Rehearsal prompts that break :class:`RehearsalPrompt`, and those that are probe prompts:
    rehearsing them would fake retention."""
    try:
        records = read_jsonl(path)
    except DataError as exc:
        return [Violation(file=exc.file, line=exc.line, record_id=None, rule=exc.rule)]
    if not records:
        return [Violation(file=str(path), line=None, record_id=None, rule="file is empty")]
    found = []
    for line, r in records:
        rid = r.get("id")
        where = dict(file=str(path), line=line, record_id=str(rid) if rid is not None else None)
        errors = record_errors(RehearsalPrompt, r)
        found += [Violation(**where, rule=rule, detail=detail) for rule, detail in errors]
        leak = None if errors else probes.find([("prompt", r["prompt"])])
        if leak is not None:
            found.append(
                Violation(
                    **where,
                    rule="rehearsal prompt is a probe prompt (probe leaked into training)",
                    detail=leak[1],
                )
            )
    return found


class ValidateStep(BaseModel):
    """What the validate step reads: the ``data`` section's limits, the workspace (releases
    learned), the probe sources and, for a strategy that rehearses prompts, its prompt file,
    resolved from ``params.yaml`` once (:meth:`from_params`)."""

    model_config = ConfigDict(frozen=True)

    data: DataConfig
    workspace: Path
    probe_sources: list[Path]
    rehearsal_prompts: Path | None  # None: the strategy rehearses no prompts

    @classmethod
    def from_params(cls, params: Params) -> ValidateStep:
        from flows.steps.finetune import FinetuneStep
        from flows.steps.probes import ProbesStep

        return cls(
            data=params.data,
            workspace=params.workspace_dir,
            probe_sources=ProbesStep.from_params(params).sources,
            rehearsal_prompts=FinetuneStep.from_params(params).rehearsal_prompts,
        )


def validate_step(step: ValidateStep, release_dir: Path, champion: ChampionRef) -> ValidationReport:
    """Every rule, whichever driver asks (the flow, the DVC stage, ``forgetless validate``).

    The release is not one ``champion`` has learned (by workspace folder or content hash); the
    release suites with the limits and record minimums of ``data``; no release prompt that
    is a probe prompt of ``champion`` (probe sources and the eval items of the releases it
    learned); the probe rules on every file of ``probes.sources``; and, for a strategy that
    rehearses prompts, no rehearsal prompt that is a probe prompt.
    """
    from flows.steps.probes import learned_probe_items

    release_dir = Path(release_dir)
    cfg = step.data
    gx, context = _gx_context()
    violations, readable = learned_release_violations(step.workspace, release_dir, champion)
    if not RELEASE_NAME.fullmatch(release_dir.name):
        violations.append(
            Violation(
                file=str(release_dir),
                line=None,
                record_id=None,
                rule=RELEASE_NAME_RULE,
                detail=_preview(release_dir.name),
            )
        )
    checked: dict[str, int] = {}
    learned = champion.model_copy(update={"releases": readable})
    prompts = [item["prompt"] for item in learned_probe_items(step.workspace, learned)]
    for source in step.probe_sources:
        found, records = _probe_source_violations(gx, context, source)
        violations += found
        if records:
            checked[source.name] = len(records)
        prompts += [r["prompt"] for _, r in records if isinstance(r.get("prompt"), str)]
    probes = Leaks(prompts, cfg.leak_threshold)
    found, release_checked = _release_violations(
        gx,
        context,
        release_dir,
        probes,
        {
            "max_prompt_chars": cfg.max_prompt_chars,
            "max_completion_chars": cfg.max_completion_chars,
        },
        {"train": cfg.min_train_records, "eval": cfg.min_eval_records},
    )
    violations += found
    checked |= release_checked
    if step.rehearsal_prompts is not None:
        violations += _rehearsal_violations(step.rehearsal_prompts, probes)
    violations.sort(key=lambda v: (v.file, v.line or 0))
    return ValidationReport(
        release=release_dir.name, passed=not violations, violations=violations, checked=checked
    )
