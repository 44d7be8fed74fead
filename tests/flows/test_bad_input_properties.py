"""Random malformed input: validation answers with the project's own errors, never another
exception, and accepts a record or a params file only when it really keeps every rule.

The checks below restate the rules independently of ``flows.steps.validate``; a record the validator
lets through is re-checked against them, and so is a params file ``load_params`` accepts.
"""

from __future__ import annotations

import json
import math
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flows.core.config import Params, ParamsError, load_params
from flows.core.data import DataError, read_jsonl
from flows.core.leaks import LeakIndex
from flows.core.records import ChampionRef, ValidationReport
from flows.steps.validate import ValidateStep, validate_release, validate_step
from tests.conftest import BAD_INPUTS, write_params

FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SUITE = settings(FAST, max_examples=60)  # the Great Expectations suites: slower
STEP = settings(FAST, max_examples=12)  # the whole step, with the demo probe source

PROBE = "What is the capital of Ghana?"
TRAIN = [
    {"id": f"t{i}", "prompt": f"Name colour number {i}.", "completion": "Blue"} for i in range(3)
]
EVAL = [
    {"id": f"e{i}", "prompt": f"Name a shape, number {i}.", "completion": "Square"}
    for i in range(2)
]
MAX_PROMPT, MAX_COMPLETION = 2000, 500  # validate_release's defaults


# --- the rules, restated ---------------------------------------------------------------------


def key(text: str) -> str:
    """Prompts match when their letters, numbers, marks and symbols match after NFKC and
    case folding."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in folded if c.isalnum() or unicodedata.category(c)[0] in "MS")


def strict_object(raw: bytes) -> dict | str:
    """The record a line holds, or why it holds none: "blank" or "bad"."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return "bad"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad"
    if text.strip() == "":
        return "blank"

    def pairs(items: list) -> dict:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("a key twice")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return "bad"
    return obj if isinstance(obj, dict) else "bad"


def control_or_surrogate(char: str) -> bool:
    """A control character or an unpaired surrogate."""
    return unicodedata.category(char) in ("Cc", "Cs")


INVISIBLE = set("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f")


def blank(text: str) -> bool:
    """Only whitespace, format characters and characters that render as nothing."""
    return all(
        c.isspace() or unicodedata.category(c) in ("Cf", "Zs", "Zl", "Zp") or c in INVISIBLE
        for c in text
    )


def good_text(value: Any, limit: int | None = None) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= (limit or len(value))
        and not blank(value)
        and not any(control_or_surrogate(c) for c in value if c not in "\n\t")
    )


def good_label(value: Any) -> bool:
    """A category, choice or source: a text of at most 200 characters on one line."""
    return (
        good_text(value, 200)
        and "\n" not in value
        and "\t" not in value
        and not any(c in value for c in "\u2028\u2029")
    )


def good_id(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return abs(rid) <= 2**63 - 1
    return (
        isinstance(rid, str)
        and 1 <= len(rid) <= 200
        and bool(rid.strip())
        and not any(control_or_surrogate(c) or c in "\u2028\u2029" for c in rid)
    )


FIELDS = {"id", "prompt", "completion", "messages", "choices", "category", "source"}


def texts_of(record: dict) -> tuple[Any, Any] | None:
    """(prompt, completion), or None for malformed chat messages."""
    if "messages" not in record:
        return record.get("prompt"), record.get("completion")
    msgs = record["messages"]
    if not isinstance(msgs, list) or not 2 <= len(msgs) <= 64:
        return None
    for m in msgs:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return None
        if m["role"] not in ("system", "user", "assistant") or not good_text(m["content"]):
            return None
    if msgs[-1]["role"] != "assistant":
        return None
    return "\n".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"]


def record_ok(record: dict) -> bool:
    """Does ``record`` keep the rules on a record of its own (keys, id, texts, labels)?"""
    if not set(record) <= FIELDS or any(v is None for v in record.values()):
        return False
    if not good_id(record.get("id")):
        return False
    if "messages" in record and ({"prompt", "completion"} & set(record)):
        return False
    pair = texts_of(record)
    if pair is None:
        return False
    prompt, completion = pair
    if not good_text(prompt, MAX_PROMPT) or not good_text(completion, MAX_COMPLETION):
        return False
    if any(k in record and not good_label(record[k]) for k in ("category", "source")):
        return False
    choices = record.get("choices")
    if choices is None:
        return True
    if not isinstance(choices, list) or len(choices) > 100:
        return False
    if not all(good_label(c) for c in choices):
        return False
    return not choices or completion in choices


def clean_texts(record: dict) -> tuple[str | None, str | None]:
    """The prompt and completion the leak rules look at (also of an otherwise broken record):
    the fields, or the chat's joined prompt and last content; None unless a clean string."""
    prompt, completion = record.get("prompt"), record.get("completion")
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        contents = [m.get("content") for m in msgs]
        if all(isinstance(c, str) for c in contents):
            prompt, completion = "\n".join(contents[:-1]), contents[-1]

    def clean(t: Any) -> str | None:
        ok = isinstance(t, str) and t
        return t if ok and not any(control_or_surrogate(c) for c in t if c not in "\n\t") else None

    return clean(prompt), clean(completion)


def leak_texts(record: dict) -> list[str]:
    return [t for t in clean_texts(record) if t]


def leaks(index: LeakIndex, record: dict) -> int | None:
    """The reference the first leaking text of ``record`` leaks (the rule of
    ``flows.core.leaks``, tested on its own in ``test_leaks.py``), or None."""
    for text in leak_texts(record):
        found = index.find(text)
        if found is not None:
            return found.reference
    return None


def nfc_id(rid: Any) -> str:
    """Ids are compared as NFC text: 7 and "7" are one id, and so are two forms of "é"."""
    return unicodedata.normalize("NFC", str(rid))


def expected_bad_lines(files: dict[str, list[tuple[int, dict]]], probes: list[str]) -> set:
    """(file, line) of every record that breaks a rule: its own, a duplicate id in its file, a
    leaked probe prompt, or (in eval.jsonl) a prompt leaked into train.jsonl."""
    probe_index = LeakIndex([p for p in probes if p.strip()])
    eval_prompts = [clean_texts(r)[0] for _, r in files.get("eval.jsonl", [])]
    refs = [p for p in eval_prompts if isinstance(p, str) and p.strip()]
    leaked_evals = set()
    if "train.jsonl" in files and refs:
        eval_index = LeakIndex(refs)
        for _, r in files["train.jsonl"]:
            found = leaks(eval_index, r)
            if found is not None:
                leaked_evals.add(refs[found])
    bad = set()
    for fname, rows in files.items():
        ids = Counter(nfc_id(r.get("id")) for _, r in rows if good_id(r.get("id")))
        for (line, r), i in zip(rows, range(len(rows)), strict=True):
            if (
                not record_ok(r)
                or (good_id(r.get("id")) and ids[nfc_id(r["id"])] > 1)
                or leaks(probe_index, r) is not None
                or (fname == "eval.jsonl" and eval_prompts[i] in leaked_evals)
            ):
                bad.add((fname, line))
    return bad


# --- random input ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
SPECIAL_TEXTS = [
    "",
    " ",
    "\t\n",
    "ok",
    "x" * (MAX_PROMPT + 1),
    "y" * (MAX_COMPLETION + 1),
    "y" * MAX_COMPLETION,
    "a\x07b",
    "a\rb",
    "a\x00",
    "\x7f",
    "\x85",
    "a\nb\tc",
    "\ud800",
    "a\udfffb",
    "\ufeffhi",
    PROBE,
    PROBE.upper(),
    "what is the capital of ghana",
    "Ｗｈａｔ is the capital of Ghana？",
    "What is the\u200b capital of Ghana",
    TRAIN[0]["prompt"],
    EVAL[1]["prompt"].lower() + "!",
    "Blue",
    "Square",
]
texts = st.text(max_size=30) | st.sampled_from(SPECIAL_TEXTS)
field_values = texts | json_values
ids = st.sampled_from(["t0", "e1", "", "  ", "new", 7, 0, -3, True, 1.5]) | field_values
messages = json_values | st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]) | json_values,
            "content": field_values,
        }
    ),
    max_size=4,
)
choices = json_values | st.lists(texts, max_size=3)
random_records = st.builds(
    lambda fields, extra: {**extra, **fields},
    st.fixed_dictionaries(
        {},
        optional={
            "id": ids,
            "prompt": field_values,
            "completion": field_values,
            "messages": messages,
            "choices": choices,
            "category": field_values,
        },
    ),
    st.dictionaries(st.text(max_size=6), json_values, max_size=2),
)
plain = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "Zs", "P"]), min_size=1, max_size=30
)


def inserted(text: str, char: str, at: int) -> str:
    at %= len(text) + 1
    return text[:at] + char + text[at:]


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# A character slipped into a text: control, surrogate, invisible, or any at all.
TRICKY = [
    "\x00",
    "\x07",
    "\x1b",
    "\r",
    "\x0b",
    "\x7f",
    "\x85",
    "\x9f",
    "\ud800",
    "\udc00",
    "\n",
    "\t",
    "\u200b",
    "\u2028",
    "\xa0",
    "\ufeff",
    "\ue000",
    "?",
    "'",
    "-",
]
tricky = st.builds(inserted, plain, st.sampled_from(TRICKY) | st.characters(), st.integers(0, 40))
# A prompt of the base release or the probe, recased, respaced, repunctuated or widened.
near_duplicates = st.builds(
    lambda text, change, char, at: change(inserted(text, char, at)),
    st.sampled_from([PROBE, TRAIN[1]["prompt"], EVAL[0]["prompt"]]),
    st.sampled_from(
        [str.upper, str.lower, fullwidth, lambda t: t.replace(" ", "  "), lambda t: t.strip("?.")]
    ),
    st.sampled_from(["", " ", "!", "\u200b", "\t", "\u3000"]),
    st.integers(0, 40),
)
likely_valid = st.builds(
    lambda rid, p, c, with_choices: (
        {"id": rid, "prompt": p, "completion": c}
        | ({"choices": [c, "other"]} if with_choices else {})
    ),
    st.text("abcxyz0123-", min_size=1, max_size=6) | st.integers(),
    plain,
    plain,
    st.booleans(),
)


def as_chat(record: dict) -> dict:
    rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
    return rest | {"messages": turns}


CONTROL = [c for c in TRICKY if c not in "\n\t\u200b\u2028\xa0\ufeff\ue000?'-"]
with_control = st.builds(inserted, plain, st.sampled_from(CONTROL), st.integers(0, 40))
blanks = st.sampled_from([" ", "\t\n", "\u3000", "\x1c"])
not_text = json_values.filter(lambda v: not isinstance(v, str))


def setting(field: str, values: st.SearchStrategy) -> Any:
    def apply(record: dict, draw) -> None:
        record[field] = draw(values)

    return apply


def dropping(field: str) -> Any:
    def apply(record: dict, draw) -> None:
        del record[field]

    return apply


def bad_choices(record: dict, draw) -> None:
    answer = record["completion"]
    record["choices"] = draw(st.sampled_from([[answer + "!"], [answer, 3], answer, 5, {answer: 1}]))


def recased_choice(record: dict, draw) -> None:
    record["choices"] = ["other", record["completion"].swapcase()]


def extra_field(record: dict, draw) -> None:
    record[draw(st.text(max_size=6).filter(lambda k: k not in record))] = draw(json_values)


# One thing changed in a valid record; most changes break a rule, a few ("fine") don't.
DEFECTS = {
    "fine": lambda record, draw: None,
    "an unknown field": extra_field,
    "fine: a source": setting("source", st.sampled_from(["wiki", "Ünïcode source"])),
    "fine: empty choices": setting("choices", st.just([])),
    "fine: an integer id": setting("id", st.integers()),
    "id missing": dropping("id"),
    "id empty or blank": setting("id", st.just("") | blanks),
    "id with a control character": setting("id", with_control),
    "id is a boolean": setting("id", st.booleans()),
    "id of another type": setting("id", st.sampled_from([1.5, [1], None]) | not_text),
    "id of a base record": setting("id", st.sampled_from(["t0", "t2", "e0", "e1"])),
    "id 7 or '7'": setting("id", st.sampled_from([7, "7"])),
    "prompt missing": dropping("prompt"),
    "completion missing": dropping("completion"),
    "prompt empty or blank": setting("prompt", st.just("") | blanks),
    "completion empty or blank": setting("completion", st.just("") | blanks),
    "prompt with a control character": setting("prompt", with_control),
    "completion with a control character": setting("completion", with_control),
    "prompt with an odd character": setting("prompt", tricky),
    "completion with an odd character": setting("completion", tricky),
    "prompt of another type": setting("prompt", not_text),
    "completion of another type": setting("completion", not_text),
    "prompt at or over the limit": setting(
        "prompt", st.sampled_from(["x" * MAX_PROMPT, "x" * (MAX_PROMPT + 1)])
    ),
    "completion at or over the limit": setting(
        "completion", st.sampled_from(["y" * MAX_COMPLETION, "y" * (MAX_COMPLETION + 1)])
    ),
    "prompt near a probe or another prompt": setting("prompt", near_duplicates),
    "choices without the answer, or not strings": bad_choices,
    "choices with the answer in another case": recased_choice,
    "choices of any kind": setting("choices", json_values),
}


def break_chat(record: dict, draw) -> None:
    """One thing changed in a chat record's messages (or nothing)."""
    turns = record["messages"]
    i = draw(st.integers(0, 2))
    change = draw(st.sampled_from(["none", "role", "content", "text", "turn", "list", "last"]))
    if change == "role":
        turns[i]["role"] = draw(not_text)
    elif change == "content":
        turns[i]["content"] = draw(not_text)
    elif change == "text":
        turns[i]["content"] = draw(with_control | tricky | blanks)
    elif change == "turn":
        del turns[i]
    elif change == "list":
        record["messages"] = draw(json_values)
    elif change == "last":
        turns[-1]["role"] = draw(st.sampled_from(["user", "system", "Assistant"]))


@st.composite
def one_defect(draw, defect: str | None = None) -> dict:
    """A valid record, plain or chat, with one thing changed (``defect``, or a random one)."""
    record = draw(likely_valid)
    DEFECTS[defect or draw(st.sampled_from(sorted(DEFECTS)))](record, draw)
    texts_ = all(isinstance(record.get(k), str) for k in ("prompt", "completion"))
    if texts_ and draw(st.booleans()):
        record = as_chat(record)
        break_chat(record, draw)
    return record


near_duplicate_records = st.builds(lambda r, p: r | {"prompt": p}, likely_valid, near_duplicates)
records = st.one_of(
    one_defect(), one_defect(), one_defect(), near_duplicate_records, random_records
)


def as_line(record: Any, ascii_only: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


lines = st.one_of(
    st.binary(max_size=60),
    st.builds(as_line, likely_valid, st.booleans()),
    st.builds(as_line, likely_valid, st.booleans()),
    st.builds(as_line, records, st.booleans()),
    st.builds(as_line, json_values, st.booleans()),
    st.text(max_size=40).map(str.encode),
    st.builds(lambda r, cut: as_line(r, True)[:cut], records, st.integers(0, 40)),
    st.builds(lambda r: b"\xef\xbb\xbf" + as_line(r, True), records),
    st.sampled_from([b"[" * 5000, b"1" * 5000, b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff"]),
).map(lambda raw: raw.replace(b"\n", b" "))  # one line each
placements = st.tuples(st.sampled_from(["train.jsonl", "eval.jsonl"]), st.integers(0, 8))


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities made 0 (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return 0.0
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def write_release(folder: Path, inserts: list[tuple[bytes, str, int]]) -> dict[str, list]:
    """The base release with each line inserted at its place; the lines of each file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fname, base in (("train.jsonl", TRAIN), ("eval.jsonl", EVAL)):
        rows = [json.dumps(r).encode() for r in base]
        for line, where, at in inserts:
            if where == fname:
                rows.insert(min(at, len(rows)), line)
        (folder / fname).write_bytes(b"\n".join(rows) + b"\n")
        out[fname] = rows
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def expected_flags(rows: dict[str, list[bytes]], probes: list[str]) -> set[tuple[str, int]]:
    """(file, line) the report must flag: a file's first line that is no JSON object (reading
    stops there), else every record that breaks a rule."""
    flags, readable = set(), {}
    for fname, lines_ in rows.items():
        records_: list[tuple[int, dict]] | None = []
        for lineno, raw in enumerate(lines_, start=1):
            obj = strict_object(raw)
            if obj == "bad":
                flags.add((fname, lineno))
                records_ = None
                break
            if obj != "blank":
                records_.append((lineno, obj))
        if records_ is not None:
            readable[fname] = records_
    return flags | expected_bad_lines(readable, probes)


def check_report(report: ValidationReport, rows: dict[str, list[bytes]], probes) -> None:
    """The report flags exactly the lines that break a rule, each with its rule."""
    event("accepted" if report.passed else "rejected")
    assert all(v.rule and v.line for v in report.violations), [str(v) for v in report.violations]
    flagged = {(Path(v.file).name, v.line) for v in report.violations}
    assert flagged == expected_flags(rows, probes), [str(v) for v in report.violations]
    assert report.passed == (not flagged)


# --- the properties --------------------------------------------------------------------------


@FAST
@given(line=lines, placement=placements)
def test_the_reader_accepts_only_strict_json_objects(line, placement):
    """read_jsonl: a DataError at the right line, or the records the line really holds."""
    BAD_INPUTS["random JSONL lines (read_jsonl)"] += 1
    fname, at = placement
    with tempfile.TemporaryDirectory() as tmp:
        write_release(Path(tmp), [(line, fname, at)])
        base = TRAIN if fname == "train.jsonl" else EVAL
        lineno = min(at, len(base)) + 1
        path = Path(tmp) / fname
        expected = strict_object(line)
        try:
            got = read_jsonl(path)
        except DataError as exc:
            assert expected == "bad", (line, exc)
            assert exc.file == str(path) and exc.line == lineno and exc.rule
            assert f"{path}:{lineno}: " in str(exc)
            return
        assert expected != "bad", line
        if expected == "blank":
            assert [r for _, r in got] == base
        else:
            assert (lineno, expected) in got and len(got) == len(base) + 1


@SUITE
@given(line=lines, placement=placements)
def test_a_random_line_passes_the_release_suites_only_if_it_keeps_every_rule(line, placement):
    BAD_INPUTS["random JSONL lines (release suites)"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        rows = write_release(folder, [(line, *placement)])
        before = snapshot(folder)
        report = validate_release(folder, [PROBE])
        assert snapshot(folder) == before
    check_report(report, rows, [PROBE])


@st.composite
def record_lines(draw) -> list[tuple[bytes, tuple[str, int]]]:
    """3 to 12 records (JSON objects all) and their places. Most have one defect each, taken
    in a random order of all of them (so that every kind turns up as often); the others are
    near duplicates of a probe or base prompt, and random dicts."""
    order = draw(st.permutations(sorted(DEFECTS)))
    batch = []
    for i in range(draw(st.integers(3, 12))):
        kind = draw(st.sampled_from(["defect", "near duplicate", "defect", "random", "defect"]))
        if kind == "defect":
            record = draw(one_defect(order[i % len(order)]))
        else:
            record = draw(near_duplicate_records if kind == "near duplicate" else random_records)
        batch.append((json.dumps(finite(record)).encode(), draw(placements)))
    return batch


@SUITE
@given(inserts=record_lines())
def test_the_release_suites_flag_exactly_the_records_that_break_a_rule(inserts):
    BAD_INPUTS["random records (release suites)"] += len(inserts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        rows = write_release(folder, [(line, *where) for line, where in inserts])
        report = validate_release(folder, [PROBE])
    check_report(report, rows, [PROBE])


@pytest.fixture(scope="module")
def step_params(tmp_path_factory, demo_dir) -> tuple[Params, list[str]]:
    """Params with the demo probe source and minimums the small base release meets."""
    tmp = tmp_path_factory.mktemp("properties")
    path = write_params(
        tmp,
        tmp,
        demo_dir,
        data={
            "demo_dir": str(demo_dir),
            "min_train_records": 1,
            "min_eval_records": 1,
        },
    )
    source = demo_dir / "probes" / "general_knowledge.jsonl"
    return load_params(path), [r["prompt"] for _, r in read_jsonl(source)]


@STEP
@given(inserts=record_lines(), line=lines, placement=placements)
def test_the_validate_step_flags_exactly_the_records_that_break_a_rule(
    step_params, inserts, line, placement
):
    BAD_INPUTS["random records (validate_step)"] += len(inserts) + 1
    params, probes = step_params
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        rows = write_release(folder, [(ln, *where) for ln, where in inserts] + [(line, *placement)])
        report = validate_step(
            ValidateStep.from_params(params), folder, ChampionRef(version=None, model_dir=Path(tmp))
        )
    check_report(report, rows, probes)


# --- params.yaml -----------------------------------------------------------------------------

# The documented range of every number, restated: (section, ..., key) -> (type, test).
NUMBERS: dict[tuple[str, ...], tuple[type, Any]] = {
    ("data", "max_prompt_chars"): (int, lambda v: v >= 1),
    ("data", "max_completion_chars"): (int, lambda v: v >= 1),
    ("data", "min_train_records"): (int, lambda v: v >= 1),
    ("data", "min_eval_records"): (int, lambda v: v >= 1),
    ("probes", "per_category"): (int, lambda v: v >= 1),
    ("probes", "seed"): (int, lambda v: True),
    ("train", "general_importance_prompts"): (int, lambda v: v >= 0),
    ("train", "learning_rate"): (float, lambda v: v > 0),
    ("train", "max_steps"): (int, lambda v: v >= 1),
    ("train", "batch_size"): (int, lambda v: v >= 1),
    ("train", "max_length"): (int, lambda v: v >= 8),
    ("train", "warmup_steps"): (int, lambda v: v >= 0),
    ("train", "seed"): (int, lambda v: True),
    ("train", "logging_steps"): (int, lambda v: v >= 1),
    ("train", "lora", "r"): (int, lambda v: v >= 1),
    ("train", "lora", "alpha"): (int, lambda v: v >= 1),
    ("train", "lora", "dropout"): (float, lambda v: 0 <= v < 1),
    ("evaluate", "batch_size"): (int, lambda v: v >= 1),
    ("evaluate", "max_new_tokens"): (int, lambda v: v >= 1),
    ("evaluate", "answer_margin_tokens"): (int, lambda v: v >= 0),
    ("gate", "min_retention"): (float, lambda v: v >= 0),
    ("gate", "min_new_task_score"): (float, lambda v: v >= 0),
    ("gate", "min_new_task_gain"): (float, lambda v: v >= -1),
}
FLAGS = [("model", "use_chat_template"), ("gate", "beat_champion")]
NAMES = [
    ("model", "base"),
    ("model", "registered_name"),
    ("tracking", "experiment"),
    ("versioning", "remote"),
]
OTHERS = [
    ("train", "strategy"),
    ("gate", "min_retention_per_task"),
    ("train", "lora", "target_modules"),
    ("train", "strategy_params"),
]
SECTIONS = ["model", "data", "probes", "train", "evaluate", "gate", "tracking", "versioning"]

param_values = st.one_of(
    st.integers(-2, 64),
    st.floats(-1.5, 2.0),
    st.booleans(),
    st.sampled_from(["naive", "ewc", "lwf+replay", "0.5", "1e-3", "7", "q_proj", "", "yes"]),
    st.none() | st.floats() | st.integers() | st.text(max_size=8),
    st.lists(st.sampled_from(["q_proj", "v_proj", ""]) | st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.floats(-1, 2) | st.booleans(), max_size=2),
)


PLAUSIBLE = {
    **dict.fromkeys(NUMBERS, st.integers(1, 64) | st.floats(0.01, 0.99)),
    **dict.fromkeys(FLAGS, st.booleans()),
    **dict.fromkeys(NAMES, st.text("abc-_/", min_size=1, max_size=8)),
    OTHERS[0]: st.sampled_from(["naive", "ewc", "lwf+replay"]),
    OTHERS[1]: st.dictionaries(st.text(max_size=5), st.floats(0, 2), max_size=2),
    OTHERS[2]: st.lists(st.sampled_from(["q_proj", "v_proj"]), min_size=1, max_size=2),
    OTHERS[3]: st.dictionaries(
        st.sampled_from(["ewc", "replay", "lwf", "nope"]),
        st.dictionaries(st.sampled_from(["lambda_", "buffer_size", "x"]), param_values),
        max_size=2,
    ),
}


@st.composite
def params_dicts(draw) -> dict:
    """Real keys with random (or, half the time, plausible) values, sometimes a random key in a
    section, sometimes a random value for a whole section."""
    out: dict = {}
    careful = draw(st.booleans())
    for path in draw(st.lists(st.sampled_from(list(PLAUSIBLE)), max_size=4)):
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = draw(PLAUSIBLE[path] if careful else param_values)
    if draw(st.integers(0, 3)) == 0:
        section = out.setdefault(draw(st.sampled_from(SECTIONS)), {})
        section[draw(st.text(max_size=8))] = draw(param_values)
    if draw(st.integers(0, 3)) == 0:
        out[draw(st.sampled_from([*SECTIONS, "lora", "x"]))] = draw(param_values)
    return out


def lookup(params: Params, path: tuple[str, ...]) -> Any:
    node: Any = params
    for part in path:
        node = getattr(node, part)
    return node


def given_value(raw: dict, path: tuple[str, ...]) -> tuple[bool, Any]:
    """Whether ``raw`` sets ``path``, and to what."""
    node: Any = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def unknown_keys(raw: dict) -> list[str]:
    """Keys no section has (by the model's own fields: sections may have more than above)."""
    found = [k for k in raw if k not in Params.model_fields]
    for name in SECTIONS:
        value = raw.get(name)
        if isinstance(value, dict):
            model = Params.model_fields[name].annotation
            found += [f"{name}.{k}" for k in value if k not in model.model_fields]
    lora = raw.get("train", {}).get("lora") if isinstance(raw.get("train"), dict) else None
    if isinstance(lora, dict):
        fields = Params.model_fields["train"].annotation.model_fields["lora"].annotation
        found += [f"train.lora.{k}" for k in lora if k not in fields.model_fields]
    return found


def a_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return kind is int or math.isfinite(value)


@FAST
@given(raw=params_dicts())
def test_load_params_accepts_only_valid_params(raw):
    BAD_INPUTS["random params dicts (load_params)"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            params = load_params(path)
        except ParamsError as exc:
            assert str(path) in str(exc)
            event("rejected")
            return
    event("accepted")
    assert not unknown_keys(raw), unknown_keys(raw)
    for path_, (kind, test) in NUMBERS.items():
        value = lookup(params, path_)
        assert a_number(value, kind) and test(value), (path_, value)
        was_given, value_given = given_value(raw, path_)
        assert not (was_given and isinstance(value_given, bool)), (path_, value_given)
        assert not (was_given and isinstance(value_given, str)), (path_, value_given)
    for path_ in FLAGS:
        was_given, value_given = given_value(raw, path_)
        assert isinstance(lookup(params, path_), bool)
        assert not was_given or isinstance(value_given, bool), (path_, value_given)
    for path_ in NAMES:
        assert isinstance(lookup(params, path_), str) and lookup(params, path_), path_
    for task, value in params.gate.min_retention_per_task.items():
        assert a_number(value, float) and value >= 0, (task, value)
    targets = params.train.lora.target_modules
    assert targets and all(isinstance(t, str) and t for t in targets)


@FAST
@given(text=st.text(max_size=200))
def test_load_params_reads_any_text_without_surprises(text):
    BAD_INPUTS["random params.yaml text (load_params)"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_params(path)
        except ParamsError as exc:
            assert str(path) in str(exc)


# A params text with one hazard planted: a key twice, an anchor and alias, or deep nesting.
SECTIONS = ["train", "gate", "model", "probes", "evaluate"]
hazards = st.sampled_from(["duplicate", "alias", "deep"])


@FAST
@given(
    section=st.sampled_from(SECTIONS),
    key=st.sampled_from(["max_steps", "alpha", "trust_remote_code", "seed", "x"]),
    hazard=hazards,
    depth=st.integers(21, 400),
)
def test_a_planted_yaml_hazard_is_always_refused_naming_its_line(section, key, hazard, depth):
    BAD_INPUTS["params.yaml with a planted hazard (load_params)"] += 1
    if hazard == "duplicate":
        text, line = f"{section}:\n  {key}: 1\n  other: 2\n  {key}: 3\n", 4
    elif hazard == "alias":
        text, line = f"{section}:\n  {key}: &v 1\n  other: *v\n", 2
    else:
        text, line = f"{section}: " + "[" * depth + "]" * depth + "\n", 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ParamsError) as err:
            load_params(path)
    assert f"params.yaml:{line}:" in str(err.value), str(err.value)
