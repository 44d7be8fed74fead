"""Reading releases and probe items. A release is a folder with ``train.jsonl`` and ``eval.jsonl``.

A release record is ``{"id", "prompt", "completion"}`` or ``{"id", "messages": [...]}`` (chat:
the last message is the assistant's completion), with optional ``choices`` (the answer set, for
classification) and ``category``. A probe item is ``{"id", "prompt", "answers", "task",
"category"}`` with optional ``choices``; ``scoring`` is ``generate`` (greedy answer must contain
an accepted answer), ``rouge_l`` (greedy answer close to an accepted answer by ROUGE-L: a release's
items without choices), ``choice`` (highest mean log-likelihood choice must be an accepted answer)
or ``loglik`` (lm-evaluation-harness's multiple choice: the raw prompt, ``delimiter``, the
choice with the highest summed log-likelihood; ``flows/scoring/scoring.py``).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.core.files import DataError, read_lines, walk
from flows.core.records import Violation

__all__ = ["DataError"]  # raised by every reader here; defined with the safe file reading

RELEASE_FILES = ("train.jsonl", "eval.jsonl")
# a release's folder name names its task, its DVC folder, its metrics and its landing URL
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RELEASE_NAME_RULE = (
    "a release name must be 1..100 letters, digits, '.', '_' or '-', starting with a letter "
    "or digit (the folder's name names the task, its DVC folder and its metrics)"
)
CHOICE_KINDS = ("choice", "loglik")  # scoring kinds that rank an item's choices by likelihood
GENERATION_KINDS = ("generate", "rouge_l")  # scoring kinds that read a greedy answer


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; blank lines are skipped, anything else must be a JSON object.

    A line must be UTF-8 without a byte-order mark and strict JSON: no ``NaN``/``Infinity``, no
    key twice in an object. Anything else is a :class:`DataError` naming the line.
    """
    records = []
    for lineno, raw in read_lines(path):
        if raw.startswith(codecs.BOM_UTF8):
            raise DataError(
                path, lineno, "starts with a UTF-8 byte-order mark (save as UTF-8 without BOM)"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                path,
                lineno,
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                "of the line)",
            ) from None
        if not line.strip():
            continue
        records.append((lineno, _parse_record(path, lineno, line)))
    return records


def _parse_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(path, lineno, f"not valid JSON ({exc.msg})") from None
    except _NotJson as exc:
        raise DataError(path, lineno, f"not valid JSON ({exc})") from None
    except ValueError:  # int() refuses a number this long
        raise DataError(path, lineno, "not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise DataError(path, lineno, "not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, "a record must be a JSON object")
    return obj


class _NotJson(Exception):
    """Accepted by Python's JSON reader, but not JSON (or ambiguous)."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _NotJson(f"duplicate key {key!r} in an object")
        obj[key] = value
    return obj


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@dataclass(frozen=True)
class Example:
    """One prompt with what counts as a right answer; release records and probes alike."""

    id: str
    messages: list[dict[str, str]]  # the prompt, as chat messages
    completion: str  # the training target (first accepted answer for probes)
    answers: list[str]
    task: str
    category: str = ""
    choices: list[str] = field(default_factory=list)
    scoring: str = "generate"
    delimiter: str = " "  # loglik: between the prompt and a choice (lm-eval's target_delimiter)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


def release_example(record: dict[str, Any], task: str) -> Example:
    """A validated release record as an Example (the release name is the task). A record with
    ``choices`` is scored by the first choice its answer names; one without by ROUGE-L against
    its completion (``rouge_l``), so that a free-text answer is judged by its closeness and a
    short answer by being that answer, not by a sentence that happens to contain it."""
    if "messages" in record:
        *prompt, last = record["messages"]
        messages, completion = list(prompt), last["content"]
    else:
        messages, completion = [{"role": "user", "content": record["prompt"]}], record["completion"]
    return Example(
        id=str(record["id"]),
        messages=messages,
        completion=completion,
        answers=[completion],
        task=task,
        category=str(record.get("category", "")),
        choices=list(record.get("choices") or []),
        scoring="generate" if record.get("choices") else "rouge_l",
    )


def probe_example(record: dict[str, Any]) -> Example:
    answers = list(record["answers"])
    return Example(
        id=str(record["id"]),
        messages=[{"role": "user", "content": record["prompt"]}],
        completion=answers[0],
        answers=answers,
        task=str(record["task"]),
        category=str(record.get("category", "")),
        choices=list(record.get("choices") or []),
        scoring=str(record.get("scoring", "generate")),
        delimiter=str(record.get("delimiter", " ")),
    )


def as_probe_record(ex: Example) -> dict[str, Any]:
    """An Example written back as a probe item (a promoted release's held-out item)."""
    return {
        "id": ex.id,
        "prompt": ex.prompt_text,
        "answers": ex.answers,
        "task": ex.task,
        "category": ex.category,
        "choices": ex.choices,
        "scoring": ex.scoring,
    }


def load_release(folder: Path, split: str) -> list[Example]:
    return [release_example(r, folder.name) for _, r in read_jsonl(folder / f"{split}.jsonl")]


def load_probes(path: Path) -> list[Example]:
    return [probe_example(r) for _, r in read_jsonl(path)]


def links_outside(folder: Path) -> list[Violation]:
    """Symbolic links anywhere in ``folder`` (not followed) whose target lies outside it; a folder
    too deep or too large to walk (:func:`flows.core.files.walk`) is reported instead."""
    root = Path(os.path.realpath(folder))
    found = []
    try:
        for path in walk(folder):
            if not path.is_symlink():
                continue
            try:
                target = Path(os.path.realpath(path))
            except OSError as exc:
                found.append(
                    Violation(
                        file=str(path),
                        line=None,
                        record_id=None,
                        rule=f"symbolic link cannot be resolved ({exc.strerror})",
                    )
                )
                continue
            if not target.is_relative_to(root):
                found.append(
                    Violation(
                        file=str(path),
                        line=None,
                        record_id=None,
                        rule="symbolic link points outside the release folder",
                        detail=f"-> {target}",
                    )
                )
    except DataError as exc:
        found.append(Violation(file=exc.file, line=None, record_id=None, rule=exc.rule))
    return found
