"""Whatever validation accepts, the next steps can use: for any generated probe item, release
record or rehearsal prompt, either validation rejects it naming file, line and rule, or probe
sampling, writing the data back and tokenizing all succeed on it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from flows.core.data import load_probes, load_release, probe_example, read_jsonl, write_jsonl
from flows.core.records import ValidationReport
from flows.registry.serving import format_prompt
from flows.steps.probes import probe_items, sampling_order, stratified
from flows.steps.validate import (
    Leaks,
    _rehearsal_violations,
    release_content_hash,
    validate_probe_source,
    validate_release,
)
from tests.conftest import BAD_INPUTS
from tests.flows.test_bad_input_properties import (
    EVAL,
    TRAIN,
    field_values,
    finite,
    ids,
    json_values,
    likely_valid,
    plain,
    random_records,
    texts,
    tricky,
)

CHECKED = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

labels = st.sampled_from(["capitals", "Ünïcode", "a" * 200, "a" * 201, "two\nlines"]) | texts
answer_lists = st.lists(texts, min_size=0, max_size=3) | json_values
probe_records = st.fixed_dictionaries(
    {},
    optional={
        "id": ids | st.lists(st.integers(), max_size=2),
        "prompt": field_values,
        "answers": answer_lists,
        "task": labels | json_values,
        "category": labels | st.none() | st.lists(texts, max_size=2),
        "choices": st.lists(labels, max_size=4) | json_values,
        "scoring": st.sampled_from(["generate", "choice", "loglik", "Choice", ""]) | json_values,
        "delimiter": st.sampled_from([" ", "\n", ": ", "\x07", "x" * 20]) | json_values,
        "extra": json_values,
    },
)


@st.composite
def likely_probe(draw) -> dict[str, Any]:
    """A probe item that is often valid: answers among the choices, a known scoring."""
    answer = draw(plain)
    record = {
        "id": draw(st.text("abc123-é", min_size=1, max_size=6) | st.integers(-(2**63), 2**63 - 1)),
        "prompt": draw(plain | tricky),
        "answers": [answer],
        "task": draw(plain),
        "category": draw(plain | labels),
    }
    if draw(st.booleans()):
        scoring = draw(st.sampled_from(["choice", "loglik"]))
        record |= {"choices": [answer, draw(plain | labels)], "scoring": scoring}
    return record


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def lines_of(records: list[Any]) -> bytes:
    return b"".join(
        json.dumps(finite(r), ensure_ascii=bool(i % 2)).encode("utf-8", "surrogatepass") + b"\n"
        for i, r in enumerate(records)
    )


def check_rejection(report: ValidationReport, path: Path) -> None:
    event("rejected")
    for v in report.violations:
        assert v.rule and v.file, v
        assert v.line or v.file != str(path) or "empty" in v.rule or "missing" in v.rule, v


@CHECKED
@given(
    records=st.lists(likely_probe(), min_size=1, max_size=3)
    | st.lists(likely_probe() | probe_records, min_size=1, max_size=6)
)
def test_an_accepted_probe_source_can_be_sampled_written_and_tokenized(records, tokenizer):
    BAD_INPUTS["random probe items (schema, then sampling and tokenizing)"] += len(records)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probes.jsonl"
        source.write_bytes(lines_of(records))
        report = validate_probe_source(source)
        if not report.passed:
            check_rejection(report, source)
            return
        event("accepted")
        items = probe_items(source)
        order = sampling_order(items, per_group=2, seed=0)
        chosen = stratified(items, per_group=2, seed=0)
        assert sum(len(o) for o, _ in order.values()) == len(items)
        written = write_jsonl(Path(tmp) / "probe_set.jsonl", chosen)
        for ex in load_probes(written):
            text = format_prompt(tokenizer, ex.messages, False)
            for piece in [text, *ex.answers, *ex.choices, ex.delimiter]:
                tokenizer(piece, add_special_tokens=False)
        assert [probe_example(r).id for r in chosen] == [str(r["id"]) for r in chosen]


@CHECKED
@given(
    extra=st.lists(likely_valid, min_size=1, max_size=4)
    | st.lists(likely_valid | random_records, min_size=1, max_size=4),
    category=plain | labels | json_values,
    choices=st.lists(plain | labels, max_size=3),
)
def test_an_accepted_release_can_be_loaded_hashed_written_and_tokenized(
    extra, category, choices, tokenizer
):
    BAD_INPUTS["random release records (schema, then loading and tokenizing)"] += len(extra) + 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        folder.mkdir()
        first = {**TRAIN[0], "category": category}
        if choices:
            first["choices"] = [TRAIN[0]["completion"], *choices]
        (folder / "train.jsonl").write_bytes(lines_of([first, *TRAIN[1:], *extra]))
        (folder / "eval.jsonl").write_bytes(lines_of(EVAL))
        report = validate_release(folder, [])
        if not report.passed:
            check_rejection(report, folder / "train.jsonl")
            return
        event("accepted")
        release_content_hash(folder)
        for split in ("train", "eval"):
            examples = load_release(folder, split)
            write_jsonl(Path(tmp) / f"{split}-copy.jsonl", [ex.__dict__ for ex in examples])
            for ex in examples:
                tokenizer(format_prompt(tokenizer, ex.messages, False) + ex.completion)
                for piece in [ex.category, *ex.choices]:
                    tokenizer(piece, add_special_tokens=False)


@CHECKED
@given(
    records=st.lists(
        st.fixed_dictionaries({"prompt": plain | texts | tricky}, optional={"id": ids})
        | st.fixed_dictionaries({"prompt": field_values}, optional={"id": ids, "x": json_values}),
        min_size=1,
        max_size=5,
    )
)
def test_accepted_rehearsal_prompts_can_be_tokenized(records, tokenizer):
    BAD_INPUTS["random rehearsal prompts (schema, then tokenizing)"] += len(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_bytes(lines_of(records))
        found = _rehearsal_violations(path, Leaks([]))
        if found:
            event("rejected")
            assert all(v.rule and v.line for v in found), found
            return
        event("accepted")
        for _, r in read_jsonl(path):
            msgs = [{"role": "user", "content": r["prompt"]}]
            tokenizer(format_prompt(tokenizer, msgs, False), add_special_tokens=False)
