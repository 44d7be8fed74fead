"""Answers a model version has already given, so that no item is scored twice on one model.

A retrain scores its candidate on the test probes and the release's eval items; once promoted,
the next retrain scores the same model again as champion, on mostly the same probe items. The
cache keeps each answer under

    model key = sha256 of every file of the model folder (weights, tokenizer, strategy state,
                tasks.json: anything that changes an answer), and
    item key  = sha256 of what the model is asked and how: the messages, the scoring kind, the
                choices, max_new_tokens, the chat template flag, the task whose parameters
                answer it, and the dtype and device kind it answers in (greedy decoding always),

and stores the *output* only (the generated text, or the chosen choice): whether it is right is
judged again from the item's answers each time (``flows.scoring.scoring.is_correct``), so a corrected
answer list never meets a stale verdict. One JSON line per answer in
``<workspace>/cache/scores/<model key>.jsonl`` (the workspace's git ignores ``cache/``), appended
under a file lock; ``evaluate.score_cache: false`` turns it off. A model named by a hub id rather
than a local folder is never cached: its content cannot be hashed here.

An answer from the cache is the one the model gave in an earlier batch: greedy decoding on the
CPU is deterministic for a given batch, and across batch compositions a last-bit difference can
at most flip a near-tie, as it can between two runs without a cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from filelock import FileLock

from flows.core.data import CHOICE_KINDS, GENERATION_KINDS, Example
from flows.core.records import ScoringConditions
from flows.registry.serving import content_hash


def model_key(model_dir: Path) -> str:
    """sha256 of every file under ``model_dir`` (relative paths and contents, in path order)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a model folder: only local folders are cached")
    return content_hash(model_dir)


def item_key(
    ex: Example, route: str | None, max_new_tokens: int, chat: bool, conditions: ScoringConditions
) -> str:
    """What the model is asked, and under which settings: never the expected answers."""
    asked = {
        "dtype": conditions.dtype,
        "device": conditions.device,
        "messages": ex.messages,
        "scoring": ex.scoring,
        "choices": ex.choices if ex.scoring in CHOICE_KINDS else None,
        "delimiter": ex.delimiter if ex.scoring == "loglik" else None,
        "max_new_tokens": max_new_tokens if ex.scoring in GENERATION_KINDS else None,
        "chat": chat,
        "route": route,
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """The answers of one model version, read once and appended to as items are scored."""

    def __init__(self, folder: Path, model: str):
        self.path = Path(folder) / f"{model}.jsonl"
        self.answers: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:  # a line cut short by a crash is skipped: that item is scored again
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.answers[entry["key"]] = entry["output"]

    def lookup(self, keys: Iterable[str]) -> dict[str, str]:
        return {k: self.answers[k] for k in keys if k in self.answers}

    def store(self, outputs: Mapping[str, str]) -> None:
        new = {k: v for k, v in outputs.items() if k not in self.answers}
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"key": k, "output": v}) + "\n" for k, v in new.items())
        with FileLock(str(self.path) + ".lock"), self.path.open("a") as f:
            f.write(lines)
        self.answers.update(new)
