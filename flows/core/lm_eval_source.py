"""Probe sources given as lm-evaluation-harness task configurations over local data files.

A YAML file in ``probes.sources`` is read as an lm-eval task (its task guide: ``dataset_path:
json`` with ``dataset_kwargs.data_files``) and turned into probe items scored ``loglik``, which
``flows/scoring/scoring.py`` computes as lm-eval's multiple choice does, so that the project's accuracy on
those items equals lm-eval's own ``acc`` (``tests/flows/test_lm_eval_source.py`` runs both).

The part of the format read here, zero-shot multiple choice:

    task: capitals-mc                       # the probe task's name
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/capitals.jsonl}}
    test_split: test                        # or validation_split
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"       # a field name or a Jinja2 template
    doc_to_choice: "{{choices}}"            # a field, a template giving a list, or a list
    doc_to_target: "{{label}}"              # an index into the choices, or the choice itself
    target_delimiter: " "                   # optional

A relative data file is read from the YAML file's folder here (lm-eval reads it from its working
directory: give an absolute path to use one configuration in both). Templates are rendered the
way lm-eval renders them (Jinja2, strict undefined, trailing newlines
kept). Anything else (few-shot examples, a description, generation, Python ``!function``
hooks) is refused with the key named, rather than read differently from lm-eval.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from flows.core.data import DataError, read_jsonl
from flows.core.files import read_text
from flows.core.safe_yaml import YamlError, load_yaml, shown

MAX_BYTES = 1_000_000  # a task configuration is a few hundred bytes

READ = {
    "task",
    "dataset_path",
    "dataset_kwargs",
    "test_split",
    "validation_split",
    "output_type",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "target_delimiter",
}
IGNORED = {"tag", "metadata", "metric_list", "num_fewshot", "fewshot_delimiter", "description"}


def is_task_config(path: Path) -> bool:
    return Path(path).suffix in (".yaml", ".yml")


MAX_RENDERED_CHARS = 100_000  # a template may not build a text longer than this


def _sandbox():
    """Jinja's sandbox (no Python internals from a probe source's template), with ``*`` and
    ``**`` bounded so that ``{{ 'a' * 10**9 }}`` is refused instead of filling memory."""
    from jinja2.sandbox import SandboxedEnvironment, SecurityError

    class Sandbox(SandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):  # noqa: ANN001, ANN201
            if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError(f"exponent {right} is too large for a template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                    if sized and len(seq) * n > MAX_RENDERED_CHARS:
                        raise SecurityError("a template may not build a text this long")
            return super().call_binop(context, operator, left, right)

    return Sandbox


def _render(template: str, doc: dict[str, Any], path: Path, line: int) -> str:
    from jinja2 import BaseLoader, StrictUndefined, TemplateError

    env = _sandbox()(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(template).render(**doc)
    except TemplateError as exc:
        raise DataError(path, line, f"template {shown(template)}: {exc}") from None
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
        raise DataError(path, line, f"template {shown(template)} fails: {exc}") from None


def _field(spec: Any, doc: dict, path: Path, line: int, literal: bool) -> Any:
    """lm-eval's ``doc_to_*`` on one document: a field, a template, or a value as it is."""
    if not isinstance(spec, str):
        return spec
    if spec in doc:
        return doc[spec]
    text = _render(spec, doc, path, line)
    if literal and text.isdigit():
        return ast.literal_eval(text)
    if literal and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
    return text


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = load_yaml(read_text(path, MAX_BYTES), MAX_BYTES)
    except YamlError as exc:
        raise DataError(path, exc.line, f"not an lm-eval task configuration: {exc.rule}") from None
    if not isinstance(config, dict):
        raise DataError(path, None, "an lm-eval task configuration is a mapping")
    unknown = sorted(set(config) - READ - IGNORED)
    if unknown:
        raise DataError(
            path, None, f"lm-eval keys not supported here: {unknown} (read: {sorted(READ)})"
        )
    if config.get("output_type") != "multiple_choice":
        raise DataError(path, None, "output_type must be multiple_choice")
    if config.get("dataset_path") != "json":
        raise DataError(path, None, "dataset_path must be json (local data files)")
    if config.get("num_fewshot", 0) or config.get("description"):
        raise DataError(path, None, "few-shot examples and descriptions are not supported")
    for key in ("task", "doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in config:
            raise DataError(path, None, f"{key} is required")
    return config


def data_file(path: Path, config: dict[str, Any]) -> Path:
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise DataError(path, None, "test_split (or validation_split) is required")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if not isinstance(files, str):
        raise DataError(path, None, f"dataset_kwargs.data_files needs one file for split {split}")
    return (Path(path).parent / files).resolve()


def probe_records(path: Path) -> list[dict[str, Any]]:
    """The task's documents as probe items (``scoring: loglik``), in file order."""
    path = Path(path)
    config = read_config(path)
    source = data_file(path, config)
    task = str(config["task"])
    delimiter = config.get("target_delimiter", " ")
    items = []
    for n, (line, doc) in enumerate(read_jsonl(source)):
        choices = _field(config["doc_to_choice"], doc, source, line, literal=True)
        if isinstance(choices, dict):
            choices = list(choices.values())
        target = _field(config["doc_to_target"], doc, source, line, literal=True)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(source, line, "doc_to_choice must give a list of strings")
        if isinstance(target, str) and target in choices:
            target = choices.index(target)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise DataError(source, line, f"doc_to_target {target!r} is not one of the choices")
        items.append(
            {
                "id": f"{task}-{n:05d}",
                "prompt": str(_field(config["doc_to_text"], doc, source, line, literal=False)),
                "answers": [choices[target]],
                "choices": choices,
                "task": task,
                "category": task,
                "scoring": "loglik",
                "delimiter": delimiter,
            }
        )
    return items


def read_source(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) pairs of a probe source: a JSONL file, or an lm-eval task configuration
    (then the line is the document's number in its data file)."""
    if is_task_config(path):
        return [(n, r) for n, r in enumerate(probe_records(path), start=1)]
    return read_jsonl(path)
