"""Every kind of bad input is rejected before training, naming file, line or record, and rule.

One table of bad releases, each built from a good one (a copy of the demo release
``wiki-topics-1``): ``validate_step`` must report the expected rule at the expected place, and
the release folder must be byte-identical afterwards. A few cases also go through
``forgetless validate``. Then a table of bad ``params.yaml`` files through ``load_params``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows.cli.main import main
from flows.core.config import ParamsError, load_params
from flows.core.records import ChampionRef, ValidationReport
from flows.steps.validate import ValidateStep, ValidationFailed, validate_step
from tests.conftest import BAD_INPUTS, write_params

GOOD = "wiki-topics-1"
LEARNED = "wiki-topics-2"  # the release the champion has learned, in the cases that need one


@dataclass
class Ctx:
    """What a case may use or change: temporary folder, demo data, workspace, champion."""

    tmp: Path
    demo: Path
    workspace: Path
    learned: list[str] = field(default_factory=list)


Build = Callable[[Path, Ctx], Path | None]  # may return another folder to validate


@dataclass(frozen=True)
class Bad:
    name: str
    build: Build
    rule: str  # a part of the rule text
    file: str  # relative to the release folder; "" names the folder itself
    line: int | None = None
    record: str | None = None


# --- building bad releases -------------------------------------------------------------------


def raw_lines(folder: Path, fname: str) -> list[bytes]:
    return (folder / fname).read_bytes().splitlines()


def record(folder: Path, fname: str, lineno: int) -> dict:
    return json.loads(raw_lines(folder, fname)[lineno - 1])


def set_line(folder: Path, fname: str, lineno: int, content: dict | str | bytes) -> None:
    """Replace line ``lineno`` (1-based) with a record, a text or raw bytes."""
    if isinstance(content, dict):
        content = json.dumps(content, ensure_ascii=False)
    if isinstance(content, str):
        content = content.encode("utf-8")
    lines = raw_lines(folder, fname)
    lines[lineno - 1] = content
    (folder / fname).write_bytes(b"\n".join(lines) + b"\n")


def edit(fname: str, lineno: int, **changes) -> Build:
    """Line ``lineno`` with some fields changed (``None`` removes the field)."""

    def build(release: Path, ctx: Ctx) -> None:
        rec = record(release, fname, lineno)
        for key, value in changes.items():
            if value is None:
                rec.pop(key, None)
            else:
                rec[key] = value
        set_line(release, fname, lineno, rec)

    return build


def text_of(fname: str, lineno: int, key: str, change: Callable[[str], str]) -> Build:
    """Line ``lineno`` with one text field changed by ``change``."""

    def build(release: Path, ctx: Ctx) -> None:
        rec = record(release, fname, lineno)
        rec[key] = change(rec[key])
        set_line(release, fname, lineno, rec)

    return build


def line_is(fname: str, lineno: int, content: dict | str | bytes) -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        set_line(release, fname, lineno, content)

    return build


def bom(fname: str, lineno: int) -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        set_line(release, fname, lineno, b"\xef\xbb\xbf" + raw_lines(release, fname)[lineno - 1])

    return build


def file_is(fname: str, content: bytes) -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        (release / fname).write_bytes(content)

    return build


def first_lines(fname: str, n: int) -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        (release / fname).write_bytes(b"\n".join(raw_lines(release, fname)[:n]) + b"\n")

    return build


def removed(fname: str) -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        (release / fname).unlink()

    return build


def same_id(fname: str, first: int, second: int, rid: object = "dup") -> Build:
    def build(release: Path, ctx: Ctx) -> None:
        set_line(release, fname, first, {**record(release, fname, first), "id": rid})
        set_line(release, fname, second, {**record(release, fname, second), "id": str(rid)})

    return build


def eval_copies_train(change: Callable[[str], str]) -> Build:
    """Eval line 4 asks train line 10's prompt, changed by ``change``."""

    def build(release: Path, ctx: Ctx) -> None:
        prompt = change(record(release, "train.jsonl", 10)["prompt"])
        set_line(release, "eval.jsonl", 4, {**record(release, "eval.jsonl", 4), "prompt": prompt})

    return build


def probe_prompt(demo: Path) -> str:
    return json.loads((demo / "probes" / "general_knowledge.jsonl").open().readline())["prompt"]


def leaks_probe(fname: str, lineno: int, change: Callable[[str], str]) -> Build:
    """Line ``lineno`` asks a probe's prompt, changed by ``change``."""

    def build(release: Path, ctx: Ctx) -> None:
        prompt = change(probe_prompt(ctx.demo))
        set_line(release, fname, lineno, {**record(release, fname, lineno), "prompt": prompt})

    return build


def typo(text: str) -> str:
    """A typo in a word of the template ("capital" -> "cpaital"); one in the name that makes
    the item ("Afghanistan") cannot be told from another name, and is not a leak."""
    assert "capital" in text
    return text.replace("capital", "cpaital", 1)


def probe_as_completion(release: Path, ctx: Ctx) -> None:
    rec = record(release, T, 7)
    rec.pop("choices", None)
    set_line(release, T, 7, {**rec, "completion": probe_prompt(ctx.demo)})


def eval_as_train_completion(release: Path, ctx: Ctx) -> None:
    """Train line 10's completion is eval line 4's prompt."""
    rec = record(release, T, 10)
    rec.pop("choices", None)
    set_line(release, T, 10, {**rec, "completion": record(release, E, 4)["prompt"][:500]})


def renamed(name: str) -> Build:
    """The release folder under another name (a copy: the original stays for the snapshot)."""

    def build(release: Path, ctx: Ctx) -> Path:
        target = release.parent / name
        shutil.copytree(release, target)
        return target

    return build


def learn(ctx: Ctx, name: str, source: Path) -> Path:
    """Put ``source`` in the workspace as release ``name`` the champion has learned."""
    folder = ctx.workspace / "releases" / name
    shutil.copytree(source, folder)
    ctx.learned.append(name)
    return folder


def leaks_learned_eval_item(release: Path, ctx: Ctx) -> None:
    learned = learn(ctx, LEARNED, ctx.demo / "releases" / LEARNED)
    prompt = record(learned, "eval.jsonl", 1)["prompt"].upper()
    set_line(release, "train.jsonl", 6, {**record(release, "train.jsonl", 6), "prompt": prompt})


def reformatted_copy_of_learned(release: Path, ctx: Ctx) -> None:
    """The learned release again: other line order, key order, spacing and ids."""
    learn(ctx, LEARNED, ctx.demo / "releases" / LEARNED)
    for fname in ("train.jsonl", "eval.jsonl"):
        recs = [json.loads(x) for x in raw_lines(ctx.demo / "releases" / LEARNED, fname)]
        out = [
            json.dumps(dict(reversed(list({**r, "id": f"again-{i}"}.items()))), indent=None)
            for i, r in enumerate(reversed(recs))
        ]
        (release / fname).write_text("\n".join(out) + "\n\n")


def learned_release_under_its_name(release: Path, ctx: Ctx) -> Path:
    """The release folder the version step wrote over the learned release of the same name."""
    return learn(ctx, GOOD, release)


def outside(ctx: Ctx, name: str, content: bytes = b"secret\n") -> Path:
    target = ctx.tmp / "elsewhere" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return target


def release_file_links_outside(release: Path, ctx: Ctx) -> None:
    target = outside(ctx, "train.jsonl", (release / "train.jsonl").read_bytes())
    (release / "train.jsonl").unlink()
    (release / "train.jsonl").symlink_to(target)


def extra_file_links_outside(release: Path, ctx: Ctx) -> None:
    (release / "notes.txt").symlink_to(outside(ctx, "notes.txt"))


def relative_link_escapes(release: Path, ctx: Ctx) -> None:
    outside(ctx, "eval.jsonl", (release / "eval.jsonl").read_bytes())
    (release / "eval.jsonl").unlink()
    (release / "eval.jsonl").symlink_to(Path("..") / "elsewhere" / "eval.jsonl")


def folder_links_outside(release: Path, ctx: Ctx) -> None:
    (release / "extra").symlink_to(outside(ctx, "x.txt").parent, target_is_directory=True)


def nested_link_outside(release: Path, ctx: Ctx) -> None:
    (release / "docs").mkdir()
    (release / "docs" / "readme").symlink_to(outside(ctx, "readme"))


def dangling_link_outside(release: Path, ctx: Ctx) -> None:
    (release / "gone").symlink_to(ctx.tmp / "nowhere" / "gone")


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def no_punctuation(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c.isspace())


def chat(system: str, user: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]


T, E = "train.jsonl", "eval.jsonl"
CTRL = "contains a control character"
OVERLAP = "eval leaked into training"
LEAK = "probe leaked into the release"
TYPE_ID = "id must be a non-empty string (no control characters) or an integer"
CHOICES = "choices must be a list of strings"
MSGS = "messages must be a list of {role, content}"
NOT_JSON = "not valid JSON"
NOT_OBJECT = "a record must be a JSON object"
NOT_UTF8 = "not valid UTF-8"
BOM = "UTF-8 byte-order mark"
OUTSIDE = "symbolic link points outside the release folder"

CASES = [
    # the file's encoding and syntax
    Bad("invalid JSON", line_is(T, 5, "{not json"), NOT_JSON, T, 5),
    Bad("truncated JSON", line_is(T, 5, '{"id": "x", "prompt": "p"'), NOT_JSON, T, 5),
    Bad("trailing comma", line_is(E, 2, '{"id": "x", "prompt": "p",}'), NOT_JSON, E, 2),
    Bad("NaN is not JSON", line_is(T, 5, '{"id": "x", "prompt": NaN}'), NOT_JSON, T, 5),
    Bad("nested too deeply", line_is(T, 5, "[" * 100_000), NOT_JSON, T, 5),
    Bad("integer too long", line_is(T, 5, "1" * 5000), NOT_JSON, T, 5),
    Bad("duplicate key", line_is(T, 5, '{"id": "a", "id": "b"}'), "duplicate key 'id'", T, 5),
    Bad("invalid UTF-8", line_is(T, 7, b'{"id": "x", "prompt": "\xff"}'), NOT_UTF8, T, 7),
    Bad("Latin-1 text", line_is(E, 3, b'{"id": "x", "prompt": "caf\xe9"}'), NOT_UTF8, E, 3),
    Bad("cut multi-byte", line_is(T, 240, b'{"id": "x", "prompt": "\xe2\x82"}'), NOT_UTF8, T, 240),
    Bad("BOM at the start", bom(T, 1), BOM, T, 1),
    Bad("BOM in eval.jsonl", bom(E, 1), BOM, E, 1),
    Bad("BOM mid-file (concatenated files)", bom(T, 9), BOM, T, 9),
    Bad("array record", line_is(T, 5, "[1, 2]"), NOT_OBJECT, T, 5),
    Bad("string record", line_is(T, 5, '"a prompt"'), NOT_OBJECT, T, 5),
    Bad("null record", line_is(E, 5, "null"), NOT_OBJECT, E, 5),
    # missing or misnamed fields
    Bad("missing id", edit(T, 4, id=None), "every record needs an id", T, 4),
    Bad("missing prompt", edit(T, 4, prompt=None), "a prompt (or messages) is required", T, 4),
    Bad("missing completion", edit(E, 4, completion=None), "a completion (or final", E, 4),
    Bad(
        "misnamed fields",
        line_is(T, 8, {"id": "q8", "question": "Which?", "answer": "Arts"}),
        "a prompt (or messages) is required",
        T,
        8,
        "q8",
    ),
    Bad("messages not a list", line_is(T, 8, {"id": "m", "messages": "hi"}), MSGS, T, 8, "m"),
    Bad(
        "messages without the assistant",
        line_is(T, 8, {"id": "m", "messages": [{"role": "user", "content": "hi"}]}),
        MSGS,
        T,
        8,
        "m",
    ),
    Bad(
        "message without content",
        line_is(T, 8, {"id": "m", "messages": [{"role": "user"}, {"role": "assistant"}]}),
        MSGS,
        T,
        8,
        "m",
    ),
    # wrong types
    Bad("id is a boolean", edit(T, 4, id=True), TYPE_ID, T, 4),
    Bad("id is a float", edit(T, 4, id=1.5), TYPE_ID, T, 4),
    Bad("id is an object", edit(T, 4, id={"n": 1}), TYPE_ID, T, 4),
    Bad("id is empty", edit(E, 4, id=""), TYPE_ID, E, 4),
    Bad("id is blank", edit(E, 4, id="  "), TYPE_ID, E, 4),
    Bad("id with a control character", edit(T, 4, id="a\x07"), TYPE_ID, T, 4),
    Bad("id with a newline", edit(T, 4, id="a\nb"), TYPE_ID, T, 4),
    Bad(
        "id is an unpaired surrogate",
        line_is(T, 8, '{"id": "\\ud800", "prompt": "Colour?", "completion": "Arts"}'),
        TYPE_ID,
        T,
        8,
    ),
    Bad("prompt is a number", edit(T, 4, prompt=7), "prompt must be a string", T, 4),
    Bad("prompt is a list", edit(T, 4, prompt=["a"]), "prompt must be a string", T, 4),
    Bad("completion is a list", edit(T, 4, completion=["Arts"]), "completion must be a str", T, 4),
    Bad(
        "chat answer is a number",
        line_is(
            T,
            8,
            {
                "id": "m",
                "messages": [*chat("s", "u", "a")[:2], {"role": "assistant", "content": 3}],
            },
        ),
        "completion must be a string",
        T,
        8,
        "m",
    ),
    Bad(
        "chat question is a number",
        line_is(
            T,
            8,
            {
                "id": "m",
                "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}],
            },
        ),
        MSGS,
        T,
        8,
        "m",
    ),
    Bad("choices is a string", edit(T, 4, choices="ArtsHistory"), CHOICES, T, 4),
    Bad("choices is a number", edit(T, 4, choices=5), CHOICES, T, 4),
    Bad("choices hold numbers", edit(T, 4, choices=[1, 2], completion="1"), CHOICES, T, 4),
    Bad("choices is an object", edit(T, 4, choices={"Arts": 1}), CHOICES, T, 4),
    # empty files, empty, blank and oversized texts
    Bad("empty train.jsonl", file_is(T, b""), "file is empty", T),
    Bad("eval.jsonl of blank lines", file_is(E, b"\n\n  \n"), "file is empty", E),
    Bad("too few records", first_lines(E, 2), "needs at least 4 records, has 2", E),
    Bad("empty prompt", edit(T, 4, prompt=""), "prompt length must be 1..2000", T, 4),
    Bad("blank prompt", edit(T, 4, prompt=" \n\t "), "prompt must not be blank", T, 4),
    Bad("empty completion", edit(E, 4, completion=""), "completion length must be 1..500", E, 4),
    Bad("blank completion", edit(E, 4, completion="  "), "completion must not be blank", E, 4),
    Bad("oversized prompt", edit(T, 4, prompt="x" * 2001), "prompt length must be 1..2000", T, 4),
    Bad("oversized completion", edit(T, 4, completion="y" * 501), "length must be 1..500", T, 4),
    Bad(
        "oversized chat prompt",
        line_is(T, 8, {"id": "m", "messages": chat("s" * 1000, "u" * 1000, "a")}),
        "prompt length must be 1..2000",
        T,
        8,
        "m",
    ),
    # control characters (only \n and \t may appear in a text)
    Bad("BEL in a prompt", text_of(T, 4, "prompt", lambda t: t + "\x07"), f"prompt {CTRL}", T, 4),
    Bad("NUL in a prompt", text_of(T, 4, "prompt", lambda t: "\x00" + t), f"prompt {CTRL}", T, 4),
    Bad("CR in a prompt", text_of(E, 4, "prompt", lambda t: t + "\r"), f"prompt {CTRL}", E, 4),
    Bad("DEL in a prompt", text_of(T, 4, "prompt", lambda t: t + "\x7f"), f"prompt {CTRL}", T, 4),
    Bad("C1 (NEL) in a prompt", text_of(T, 4, "prompt", lambda t: t + "\x85"), CTRL, T, 4),
    Bad("ESC in a completion", edit(T, 4, completion="\x1b[31mArts"), f"completion {CTRL}", T, 4),
    Bad(
        "vertical tab in a system message",
        line_is(T, 8, {"id": "m", "messages": chat("Be\x0bbrief.", "Name a colour.", "Blue")}),
        f"prompt {CTRL}",
        T,
        8,
        "m",
    ),
    Bad(
        "unpaired surrogate",
        line_is(T, 8, '{"id": "s", "prompt": "a\\ud800b", "completion": "Arts"}'),
        "unpaired surrogate",
        T,
        8,
        "s",
    ),
    # duplicates and overlaps
    Bad("duplicate ids in train", same_id(T, 3, 9), "ids must be unique", T, 9, "dup"),
    Bad("duplicate ids in eval", same_id(E, 2, 30), "ids must be unique", E, 30, "dup"),
    Bad("duplicate ids 7 and '7'", same_id(T, 3, 9, 7), "ids must be unique", T, 9, "7"),
    Bad("eval prompt in train", eval_copies_train(lambda p: p), OVERLAP, E, 4),
    Bad("eval prompt in train, recased", eval_copies_train(str.upper), OVERLAP, E, 4),
    Bad(
        "eval prompt in train, other spacing and punctuation",
        eval_copies_train(lambda p: "  " + no_punctuation(p).replace(" ", "   ") + " !"),
        OVERLAP,
        E,
        4,
    ),
    # probe items leaking into the training data
    Bad("probe prompt in train", leaks_probe(T, 5, lambda p: p), LEAK, T, 5),
    Bad("probe prompt in eval", leaks_probe(E, 5, lambda p: p), LEAK, E, 5),
    Bad("probe prompt recased", leaks_probe(T, 5, lambda p: p.upper()), LEAK, T, 5),
    Bad(
        "probe prompt respaced",
        leaks_probe(T, 5, lambda p: "\t" + p.replace(" ", "  ")),
        LEAK,
        T,
        5,
    ),
    Bad("probe prompt without punctuation", leaks_probe(T, 5, no_punctuation), LEAK, T, 5),
    Bad(
        "probe prompt, other punctuation",
        leaks_probe(T, 5, lambda p: p.replace("?", " ?!…")),
        LEAK,
        T,
        5,
    ),
    Bad("probe prompt in full-width letters", leaks_probe(T, 5, fullwidth), LEAK, T, 5),
    Bad(
        "probe prompt with a zero-width space",
        leaks_probe(T, 5, lambda p: p.replace("capital", "capi\u200btal")),
        LEAK,
        T,
        5,
    ),
    Bad("probe prompt with a prefix", leaks_probe(T, 5, lambda p: "Quick quiz: " + p), LEAK, T, 5),
    Bad("probe prompt with a suffix", leaks_probe(E, 5, lambda p: p + " Think first."), LEAK, E, 5),
    Bad(
        "probe prompt with an instruction appended",
        leaks_probe(T, 5, lambda p: p + "\nAnswer in one word."),
        LEAK,
        T,
        5,
    ),
    Bad(
        "probe prompt with a Cyrillic look-alike",
        leaks_probe(T, 5, lambda p: p.replace("a", "\u0430", 1)),
        LEAK,
        T,
        5,
    ),
    Bad(
        "probe prompt with a Greek look-alike",
        leaks_probe(T, 5, lambda p: p.replace("o", "\u03bf")),
        LEAK,
        T,
        5,
    ),
    Bad("probe prompt as a completion", probe_as_completion, LEAK, T, 7),
    Bad("probe prompt with a typo", leaks_probe(T, 5, typo), LEAK, T, 5),
    Bad(
        "eval prompt in train with a prefix",
        eval_copies_train(lambda p: "Read this. " + p),
        OVERLAP,
        E,
        4,
    ),
    Bad("eval prompt as a train completion", eval_as_train_completion, OVERLAP, E, 4),
    Bad("learned eval item in train", leaks_learned_eval_item, LEAK, T, 6),
    # the release's name names its task, DVC folder and metrics
    Bad("a release name with a space", renamed("my release"), "a release name must be", ""),
    Bad("a release name with a newline", renamed("rel\nx"), "a release name must be", ""),
    Bad("a release name of markup", renamed("[b]rel"), "a release name must be", ""),
    # the champion already learned this release
    Bad("identical to a learned release", reformatted_copy_of_learned, "identical in content", ""),
    Bad("a learned release again", learned_release_under_its_name, "already learned", ""),
    # the folder
    Bad("missing train.jsonl", removed(T), "file is missing", T),
    Bad("missing eval.jsonl", removed(E), "file is missing", E),
    Bad("train.jsonl links outside", release_file_links_outside, OUTSIDE, T),
    Bad("eval.jsonl links ../ outside", relative_link_escapes, OUTSIDE, E),
    Bad("extra file links outside", extra_file_links_outside, OUTSIDE, "notes.txt"),
    Bad("sub-folder links outside", folder_links_outside, OUTSIDE, "extra"),
    Bad("nested link outside", nested_link_outside, OUTSIDE, "docs/readme"),
    Bad("dangling link outside", dangling_link_outside, OUTSIDE, "gone"),
    # choices
    Bad(
        "answer not among choices",
        edit(T, 4, completion="Sports"),
        "the completion must be one of the record's choices",
        T,
        4,
    ),
    # strict schema: unknown keys, labels, invisible text, Unicode
    Bad("a misspelt key", edit(T, 4, categroy="Arts"), "unknown field 'categroy'", T, 4),
    Bad("category is a list", edit(T, 4, category=["Arts"]), "category must be a string", T, 4),
    Bad(
        "category is null",
        line_is(T, 8, {"id": "c", "prompt": "P?", "completion": "A", "category": None}),
        "category must be a string",
        T,
        8,
        "c",
    ),
    Bad("category is a number", edit(T, 4, category=3), "category must be a string", T, 4),
    Bad(
        "category of 10,000,000 characters",
        edit(T, 4, category="a" * 10**7),
        "line is longer than 1000000 bytes",
        T,
        4,
    ),
    Bad("category of 201 characters", edit(T, 4, category="a" * 201), "category must", T, 4),
    Bad("category with a newline", edit(T, 4, category="Ar\nts"), "category contains", T, 4),
    Bad(
        "category with a lone surrogate",
        line_is(T, 8, '{"id": "s", "prompt": "P?", "completion": "A", "category": "\\ud800"}'),
        "category contains an unpaired surrogate",
        T,
        8,
        "s",
    ),
    Bad(
        "choice with a lone surrogate",
        line_is(
            T, 8, '{"id": "s", "prompt": "P?", "completion": "A", "choices": ["A", "\\udfff"]}'
        ),
        "choices contains an unpaired surrogate",
        T,
        8,
        "s",
    ),
    Bad(
        "choice with a control character",
        edit(T, 4, choices=["Arts", "Hi\x07story"]),
        "choices contains",
        T,
        4,
    ),
    Bad("101 choices", edit(T, 4, choices=["Arts", *map(str, range(100))]), "choices must", T, 4),
    Bad("prompt of zero-width spaces", edit(T, 4, prompt="\u200b\u200d\ufeff"), "blank", T, 4),
    Bad("completion of Hangul fillers", edit(E, 4, completion="\u3164\u3164"), "blank", E, 4),
    Bad(
        "a role nobody knows",
        line_is(
            T,
            8,
            {
                "id": "m",
                "messages": [
                    {"role": "robot", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ],
            },
        ),
        MSGS,
        T,
        8,
        "m",
    ),
    Bad(
        "ids equal after NFC",
        lambda r, c: (edit(T, 3, id="caf\u00e9")(r, c), edit(T, 9, id="cafe\u0301")(r, c))[0],
        "ids must be unique",
        T,
        9,
    ),
    Bad("integer id beyond 64 bits", edit(T, 4, id=2**70), TYPE_ID, T, 4),
    Bad(
        "answer among choices only ignoring case",
        edit(T, 4, completion="arts", choices=["Arts", "People"]),
        "the completion must be one of the record's choices",
        T,
        4,
    ),
]


# --- the checks ------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under ``folder`` (links not followed): its kind, and its bytes or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", path.read_bytes())
    return out


@pytest.fixture
def ctx(tmp_path, demo_dir) -> Ctx:
    return Ctx(tmp=tmp_path, demo=demo_dir, workspace=tmp_path / "workspace")


@pytest.fixture
def good_release(tmp_path, demo_dir) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(demo_dir / "releases" / GOOD, folder)
    return folder


def params_file_for(ctx: Ctx) -> Path:
    """params.yaml with the demo probes; validation never loads the model, a stub will do."""
    model = ctx.tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return write_params(ctx.tmp, model, ctx.demo, workspace=str(ctx.workspace))


def champion_of(ctx: Ctx) -> ChampionRef:
    return ChampionRef(
        version="1" if ctx.learned else None, model_dir=ctx.tmp, releases=list(ctx.learned)
    )


def squeeze(text: str) -> str:
    """Text without whitespace (the console wraps long lines)."""
    return "".join(text.split())


def assert_rejected_at(report: ValidationReport, case: Bad, release: Path) -> None:
    """The report fails with ``case.rule`` at the case's file, line and record."""
    assert not report.passed, f"{case.name}: accepted"
    want = release / case.file if case.file else release
    hits = [
        v
        for v in report.violations
        if case.rule in v.rule
        and Path(v.file) == want
        and v.line == case.line
        and (case.record is None or v.record_id == case.record)
    ]
    assert hits, (case, [str(v) for v in report.violations])
    message = str(ValidationFailed(report, limit=10_000))
    place = f"{want}:{case.line}" if case.line else str(want)
    assert place in message and case.rule in message
    if case.record:
        assert f"(record {case.record!r})" in message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_release_is_rejected_and_left_untouched(case, ctx, good_release):
    release = case.build(good_release, ctx) or good_release
    before = snapshot(release)
    BAD_INPUTS["bad release (validate_step)"] += 1
    report = validate_step(
        ValidateStep.from_params(load_params(params_file_for(ctx))), release, champion_of(ctx)
    )
    assert_rejected_at(report, case, release)
    assert snapshot(release) == before, "validation changed the release folder"


def test_the_table_starts_from_a_valid_release(ctx, good_release):
    """The cases start from a release that passes, also against a learned release."""
    learn(ctx, LEARNED, ctx.demo / "releases" / LEARNED)
    report = validate_step(
        ValidateStep.from_params(load_params(params_file_for(ctx))), good_release, champion_of(ctx)
    )
    assert report.passed, [str(v) for v in report.violations]
    assert report.checked["train.jsonl"] == 240 and report.checked["eval.jsonl"] == 60


def test_unusual_but_valid_input_passes(ctx, good_release):
    """Newlines and tabs in texts, CRLF line ends, blank lines, integer ids, a source field,
    empty choices, chat records and a link that stays inside the folder are all fine."""
    set_line(good_release, T, 3, {**record(good_release, T, 3), "prompt": "Two\nlines\tand a tab"})
    set_line(good_release, T, 4, {**record(good_release, T, 4), "id": 4, "source": "wiki"})
    set_line(good_release, T, 5, {**record(good_release, T, 5), "choices": []})
    set_line(good_release, T, 6, {"id": "chat", "messages": chat("Be brief.", "Colour?", "Blue")})
    crlf = (good_release / E).read_bytes().replace(b"\n", b"\r\n") + b"\r\n\n"
    (good_release / "data").mkdir()
    (good_release / "data" / E).write_bytes(crlf)
    (good_release / E).unlink()
    (good_release / E).symlink_to(Path("data") / E)
    report = validate_step(
        ValidateStep.from_params(load_params(params_file_for(ctx))), good_release, champion_of(ctx)
    )
    assert report.passed, [str(v) for v in report.violations]


# --- through ``forgetless validate`` ---------------------------------------------------------

CLI_CASES = [
    c
    for c in CASES
    if c.name
    in {
        "invalid JSON",
        "invalid UTF-8",
        "BOM at the start",
        "missing prompt",
        "BEL in a prompt",
        "duplicate ids in train",
        "probe prompt in full-width letters",
        "missing eval.jsonl",
        "train.jsonl links outside",
    }
]


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory) -> Path:
    """One workspace (and MLflow store) for the command-line cases: no champion in it."""
    return tmp_path_factory.mktemp("bad-input-cli") / "workspace"


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_forgetless_validate_rejects(case, tmp_path, demo_dir, cli_workspace, capsys):
    ctx = Ctx(tmp=tmp_path, demo=demo_dir, workspace=cli_workspace)
    release = tmp_path / "release"
    shutil.copytree(demo_dir / "releases" / GOOD, release)
    release = case.build(release, ctx) or release
    before = snapshot(release)
    BAD_INPUTS["bad release (forgetless validate)"] += 1
    code = main(["--params", str(params_file_for(ctx)), "validate", str(release)])
    printed = squeeze(capsys.readouterr().out)
    assert code == 1, printed
    want = release / case.file if case.file else release
    assert squeeze(f"{want}:{case.line}" if case.line else str(want)) in printed
    assert squeeze(case.rule) in printed
    assert snapshot(release) == before


def test_forgetless_validate_rejects_bad_params(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  max_stepz: 3\n")
    BAD_INPUTS["bad params.yaml (forgetless validate)"] += 1
    assert main(["--params", str(params_file), "validate", str(tmp_path)]) == 2
    printed = squeeze(capsys.readouterr().out)
    assert squeeze(str(params_file)) in printed
    assert "train.max_stepz" in printed and "validkeyshere" in printed and "max_steps" in printed


# --- params.yaml -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BadParams:
    name: str
    text: str  # the params.yaml
    key: str  # the dotted key the message must name ("" for the whole file)
    expect: str  # a part of the message: what is valid


def setting(dotted: str, value: str, expect: str) -> BadParams:
    """params.yaml setting one dotted key to ``value`` (YAML)."""
    *sections, leaf = dotted.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    text += f"{'  ' * len(sections)}{leaf}: {value}\n"
    return BadParams(f"{dotted}: {value}", text, dotted, expect)


VALID_KEYS = "valid keys here:"
AT_LEAST_0, AT_LEAST_1 = "greater than or equal to 0", "greater than or equal to 1"
NON_EMPTY = "at least 1 character"
PARAMS_CASES = [
    # unknown keys: the message lists the valid ones
    BadParams("an unknown section", "trian:\n  max_steps: 3\n", "trian", VALID_KEYS),
    setting("train.max_stepz", "3", "max_steps"),
    setting("train.lora.rank", "4", "alpha"),
    setting("gate.min_retension", "0.9", "beat_champion"),
    setting("probes.per_categry", "4", "per_category"),
    # wrong types
    BadParams("a section that is a number", "train: 5\n", "train", "valid dictionary"),
    setting("train.max_steps", "many", "valid integer"),
    setting("train.max_steps", "2.5", "integer"),
    setting("train.max_steps", "true", "not true/false"),
    setting("train.learning_rate", "false", "not true/false"),
    setting("train.learning_rate", "[1]", "valid number"),
    setting("gate.min_retention_per_task", "{gk: true}", "not true/false"),
    setting("gate.beat_champion", "1", "valid boolean"),
    setting("gate.beat_champion", "maybe", "valid boolean"),
    setting("model.use_chat_template", "'yes'", "valid boolean"),
    setting("probes.sources", "probes.jsonl", "valid list"),
    setting("model.registered_name", "5", "valid string"),
    # numbers out of range (NaN and infinities included)
    setting("train.learning_rate", ".nan", "finite number"),
    setting("train.learning_rate", ".inf", "finite number"),
    setting("train.learning_rate", "0", "greater than 0"),
    setting("gate.min_retention", ".nan", "finite number"),
    setting("gate.min_retention", "-0.1", AT_LEAST_0),
    setting("gate.min_retention_per_task.gk", "-1", AT_LEAST_0),
    setting("gate.min_retention_per_task.gk", ".inf", "finite number"),
    setting("gate.min_new_task_score", "-1", AT_LEAST_0),
    setting("gate.min_new_task_gain", ".nan", "finite number"),
    setting("gate.min_new_task_gain", "-2", "greater than or equal to -1"),
    setting("train.lora.dropout", "1.5", "less than 1"),
    setting("train.lora.dropout", "-0.1", AT_LEAST_0),
    setting("train.lora.r", "0", AT_LEAST_1),
    setting("train.batch_size", "0", AT_LEAST_1),
    setting("train.max_length", "4", "greater than or equal to 8"),
    setting("train.warmup_steps", "-1", AT_LEAST_0),
    setting("probes.per_category", "0", AT_LEAST_1),
    setting("data.max_prompt_chars", "0", "greater than 0"),
    setting("data.min_train_records", "0", AT_LEAST_1),
    setting("evaluate.max_new_tokens", "0", AT_LEAST_1),
    # empty lists and names
    setting("train.lora.target_modules", "[]", "at least 1 item"),
    BadParams(
        "an empty LoRA target",
        "train:\n  lora: {target_modules: ['']}\n",
        "train.lora.target_modules.0",
        NON_EMPTY,
    ),
    setting("model.registered_name", "''", "should match pattern"),
    setting("model.registered_name", "../../elsewhere/lm", "should match pattern"),
    setting("model.registered_name", ".hidden", "should match pattern"),
    setting("model.base", "''", NON_EMPTY),
    setting("tracking.experiment", "''", NON_EMPTY),
    setting("versioning.remote", "''", NON_EMPTY),
    # strategies
    setting("train.strategy", "ewcc", "valid strategies:"),
    setting("train.strategy_params", "{ewcc: {}}", "valid strategies:"),
    # the file itself
    BadParams("not YAML", "train: [\n", "", "not valid YAML"),
    BadParams("a list, not sections", "- train\n", "", "the top level must be a mapping"),
]


@pytest.mark.parametrize("case", PARAMS_CASES, ids=[c.name for c in PARAMS_CASES])
def test_bad_params_are_rejected_naming_file_key_and_what_is_valid(case, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(case.text)
    BAD_INPUTS["bad params.yaml (load_params)"] += 1
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and case.expect in message, message
    if case.key:
        assert f"  {case.key}: " in message, message


def test_params_file_that_is_not_utf8_or_overrides_into_a_value_are_params_errors(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(b"workspace: \xff\xfe\n")
    with pytest.raises(ParamsError, match="not valid UTF-8"):
        load_params(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("train:\n  max_steps: 5\n")
    with pytest.raises(ParamsError, match="train.max_steps is a value, not a section"):
        load_params(good, {"train.max_steps.x": 1})
    with pytest.raises(ParamsError) as err:
        load_params(good, {"nonsense": 1})
    assert "valid keys here:" in str(err.value) and "root" not in str(err.value).split("here:")[1]
