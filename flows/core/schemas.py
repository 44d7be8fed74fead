"""The declared schema of every record the pipeline reads, as strict pydantic models.

- :class:`ReleaseRecord`: a line of a release's ``train.jsonl`` / ``eval.jsonl``;
- :class:`ProbeItem`: a line of a probe source (or a document of an lm-eval task config);
- :class:`RehearsalPrompt`: a line of the rehearsal prompts file (``train.rehearsal_prompts``).

Strict: a value must have its field's JSON type (no ``"7"`` for 7, no 1 for ``true``), and an
unknown or misspelt key is an error. Every text is checked the same way (:func:`text_problem`):
no unpaired surrogate, no control character other than newline and tab (none at all in ids and
labels), not blank (whitespace or invisible characters only), within its length bound. Ids are
compared after Unicode NFC (:func:`id_key`), so ``"é"`` written precomposed and decomposed is one
id. :func:`record_errors` turns pydantic's errors into the project's rule phrases, one
``(rule, detail)`` per broken rule. ``docs`` show the JSON Schema of each model
(``Model.model_json_schema()``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flows.core.safe_yaml import shown

MAX_ID_CHARS = 200
MAX_LABEL_CHARS = 200  # a category, a choice, a task name, a role
MAX_CHOICES = 100
MAX_ANSWERS = 100
MAX_MESSAGES = 64
MAX_PROBE_PROMPT_CHARS = 8000
MAX_PROBE_ANSWER_CHARS = 2000
MAX_DELIMITER_CHARS = 16
MAX_ID_INT = 2**63 - 1

# A text may hold newlines and tabs, but no other control character (C0, DEL, C1) and no
# unpaired surrogate (JSON can escape one; it cannot be written as UTF-8).
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_LABEL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
# characters that render as nothing: not letters a reader could see
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800", "\u180e", "\u034f"}


def bad_character(text: Any, label: bool = False) -> str | None:
    """Where a text holds a character it may not hold, e.g. "U+0007 at character 12"."""
    if not isinstance(text, str):
        return None
    found = (_BAD_LABEL_CHAR if label else _BAD_CHAR).search(text)
    if found is None:
        return None
    kind = "unpaired surrogate " if "\ud800" <= found.group() <= "\udfff" else ""
    return f"{kind}U+{ord(found.group()):04X} at character {found.start() + 1}"


def is_blank(text: str) -> bool:
    """Only whitespace, format characters (zero-width space, joiners, BOM, bidi marks) and
    characters that render as nothing (Hangul fillers, braille blank)."""
    return all(
        ch.isspace() or unicodedata.category(ch) in ("Cf", "Zs", "Zl", "Zp") or ch in _INVISIBLE
        for ch in text
    )


def text_problem(text: str, label: bool = False) -> str | None:
    """The first text rule ``text`` breaks, in words, or None."""
    where = bad_character(text, label)
    if where:
        kind = "a line break or control character" if label else "a control character"
        rule = f"contains {kind} other than newline or tab, or an unpaired surrogate"
        return f"{rule if not label else f'contains {kind} or an unpaired surrogate'} ({where})"
    if text and is_blank(text):
        return "must not be blank (whitespace or invisible characters only)"
    return None


def _checked(label: bool):
    def check(value: str) -> str:
        problem = text_problem(value, label)
        if problem:
            raise PydanticCustomError("text_rule", problem)
        return value

    return AfterValidator(check)


def _id(value: str | int) -> str | int:
    if isinstance(value, int):
        if abs(value) > MAX_ID_INT:
            raise PydanticCustomError("id_rule", "an integer id must fit in 64 bits")
        return value
    if not value.strip() or bad_character(value, label=True):
        raise PydanticCustomError("id_rule", "id must not be blank or hold control characters")
    return value


def id_key(value: Any) -> str:
    """The id as uniqueness compares it: NFC text; ``7`` and ``"7"`` are the same id."""
    return unicodedata.normalize("NFC", str(value))


Id = Annotated[
    Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | int, AfterValidator(_id)
]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS), _checked(label=True)]

# a task names MLflow metrics (retention.<task>), whose names allow word characters, spaces,
# '.', '-' (and '/', ':', left out here: a path-like or Windows-unsafe name is refused late)
_TASK = re.compile(r"\w[\w .-]{0,99}")


def _task(value: str) -> str:
    if not _TASK.fullmatch(value):
        raise PydanticCustomError("task_rule", "got {value}", {"value": shown(value, 60)})
    return value


TaskName = Annotated[Label, AfterValidator(_task)]
Text = Annotated[str, Field(min_length=1), _checked(label=False)]


class _Strict(BaseModel):
    """Strict types, no unknown keys; an optional field is left out, never ``null``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            raise PydanticCustomError("null", "is null: leave the field out instead")
        return value


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ReleaseRecord(_Strict):
    """``{"id", "prompt", "completion"}`` or ``{"id", "messages"}`` (chat: the last message is
    the assistant's completion, the others joined by newlines are the prompt), with optional
    ``choices`` (the answer set of a classification release: it must hold the completion),
    ``category`` and ``source`` (where the record came from). Prompt and completion lengths are
    bounded by ``data.max_prompt_chars`` / ``data.max_completion_chars`` (validation context)."""

    id: Id
    prompt: Text | None = None
    completion: Text | None = None
    messages: Annotated[list[Message], Field(min_length=2, max_length=MAX_MESSAGES)] | None = None
    choices: Annotated[list[Label], Field(max_length=MAX_CHOICES)] | None = None
    category: Label | None = None
    source: Label | None = None

    @property
    def prompt_text(self) -> str:
        if self.messages is not None:
            return "\n".join(m.content for m in self.messages[:-1])
        return self.prompt or ""

    @property
    def completion_text(self) -> str:
        return self.messages[-1].content if self.messages is not None else self.completion or ""

    @model_validator(mode="after")
    def _one_format(self, info: ValidationInfo) -> ReleaseRecord:
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise PydanticCustomError(
                    "format", "give messages, or prompt and completion, not both"
                )
            if self.messages[-1].role != "assistant":
                raise PydanticCustomError(
                    "messages_rule", "the last message must be the assistant's"
                )
        else:
            if self.prompt is None:
                raise PydanticCustomError("prompt_missing", "a prompt (or messages) is required")
            if self.completion is None:
                raise PydanticCustomError(
                    "completion_missing", "a completion (or final assistant message) is required"
                )
        limits = info.context or {}
        for what, text, key in (
            ("prompt", self.prompt_text, "max_prompt_chars"),
            ("completion", self.completion_text, "max_completion_chars"),
        ):
            top = limits.get(key)
            if top is not None and len(text) > top:
                raise PydanticCustomError(
                    f"{what}_length",
                    f"{what} length must be 1..{top} characters (got {len(text)})",
                )
        if self.choices and self.completion_text not in self.choices:
            raise PydanticCustomError(
                "answer_not_in_choices", "the completion must be one of the record's choices"
            )
        return self


class ProbeItem(_Strict):
    """``{"id", "prompt", "answers", "task"}`` with optional ``category``, ``choices`` (two or
    more, holding every answer, for ``choice``/``loglik`` scoring), ``scoring`` and
    ``delimiter`` (loglik: between the prompt and a choice)."""

    id: Id
    prompt: Annotated[Text, Field(max_length=MAX_PROBE_PROMPT_CHARS)]
    answers: Annotated[
        list[Annotated[Text, Field(max_length=MAX_PROBE_ANSWER_CHARS)]],
        Field(min_length=1, max_length=MAX_ANSWERS),
    ]
    task: TaskName
    category: Label | None = None
    choices: Annotated[list[Label], Field(max_length=MAX_CHOICES)] | None = None
    scoring: Literal["generate", "rouge_l", "choice", "loglik"] = "generate"
    delimiter: Annotated[str, Field(max_length=MAX_DELIMITER_CHARS)] = " "

    @model_validator(mode="after")
    def _choices_hold_answers(self) -> ProbeItem:
        if bad_character(self.delimiter):
            raise PydanticCustomError("text_rule", "delimiter contains a control character")
        if self.scoring in ("choice", "loglik") and len(self.choices or []) < 2:
            raise PydanticCustomError(
                "choices_rule", "choice probes need 2+ choices that contain every answer"
            )
        if self.choices and not set(self.answers) <= set(self.choices):
            raise PydanticCustomError(
                "choices_rule", "choice probes need 2+ choices that contain every answer"
            )
        return self

    def as_record(self) -> dict[str, Any]:
        """The item as the probe steps use it: the id as NFC text, the category as text."""
        record = self.model_dump(exclude_none=True)
        record["id"] = id_key(self.id)
        record["category"] = self.category or ""
        return record


class RehearsalPrompt(_Strict):
    """``{"prompt"}`` with an optional ``id``: a general prompt the model answers itself
    (self-rehearsal) or that measures general knowledge (EWC, SI, HLR importance)."""

    id: Id | None = None
    prompt: Annotated[Text, Field(max_length=MAX_PROBE_PROMPT_CHARS)]


_FIELD_RULES = {  # a pydantic error on a field (no custom rule) in the project's words
    "id": "id must be a non-empty string (no control characters) or an integer",
    "prompt": "prompt must be a string",
    "completion": "completion must be a string",
    "messages": "messages must be a list of {role, content} ending with the assistant "
    "(roles system, user or assistant; contents are strings)",
    "choices": f"choices must be a list of strings (at most {MAX_CHOICES}, "
    f"each 1..{MAX_LABEL_CHARS} characters on one line)",
    "category": f"category must be a string of 1..{MAX_LABEL_CHARS} characters on one line",
    "source": f"source must be a string of 1..{MAX_LABEL_CHARS} characters on one line",
    "answers": "answers must be a non-empty list of non-empty strings",
    "task": "task must be 1..100 letters, digits, '_', '.', '-' or spaces, starting with a "
    "letter or digit (it names MLflow metrics)",
    "scoring": "scoring must be 'generate', 'rouge_l', 'choice' or 'loglik'",
    "delimiter": f"delimiter must be a string of at most {MAX_DELIMITER_CHARS} characters",
}


def record_errors(
    model: type[BaseModel], record: dict[str, Any], context: dict[str, Any] | None = None
) -> list[tuple[str, str]]:
    """Every rule ``record`` breaks under ``model``, as ``(rule, detail)`` in the project's
    words; empty when it keeps them all."""
    required = []
    if model is ReleaseRecord and "prompt" not in record and "messages" not in record:
        required = [("a prompt (or messages) is required", "")]  # said even beside other errors
    try:
        model.model_validate(record, context=context)
    except ValidationError as exc:
        errors = _rules(model, exc, record, context or {})
        return errors + [r for r in required if r not in errors]
    return []


def _text_field(loc: list[str], record: dict[str, Any]) -> str:
    """The text a location names: a chat message's content is the prompt, or the completion
    when it is the last message."""
    if loc[0] != "messages":
        return loc[0]
    messages = record.get("messages")
    last = len(messages) - 1 if isinstance(messages, list) else -1
    return "completion" if len(loc) > 1 and loc[1] == str(last) else "prompt"


def _max_length(model: type[BaseModel], field: str) -> int | None:
    """The ``max_length`` a model declares for a field, if any."""
    info = model.model_fields.get(field)
    lengths = [m.max_length for m in (info.metadata if info else []) if hasattr(m, "max_length")]
    return lengths[0] if lengths else None


def _rules(
    model: type[BaseModel], exc: ValidationError, record: dict[str, Any], context: dict[str, Any]
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        kind = err["type"]
        if kind == "extra_forbidden":
            rule, detail = f"unknown field {shown(field, 60)}", "a misspelt or unsupported key"
        elif not loc:  # a rule of the whole record (format, lengths, choices)
            rule, detail = err["msg"], ""
        elif kind == "missing" and field == "id":
            rule, detail = "every record needs an id", ""
        elif kind == "missing" and len(loc) == 1:
            rule, detail = _FIELD_RULES.get(field, f"{field} is required"), "missing"
        elif kind == "string_unicode":
            rule = f"{_text_field(loc, record)} contains an unpaired surrogate"
            detail = "a \\ud800-\\udfff escape without its pair"
        elif field == "messages" and len(loc) == 3 and _text_field(loc, record) == "completion":
            rule, detail = "completion must be a string", f"{'.'.join(loc[1:])}: {err['msg']}"
        elif kind == "text_rule":
            name = _text_field(loc, record)
            rule, detail = f"{name} {err['msg'].split(' (')[0]}", err["msg"].partition(" (")[2][:-1]
        elif kind in ("string_too_short", "string_too_long") and field in ("prompt", "completion"):
            top = (
                err.get("ctx", {}).get("max_length")
                or context.get(f"max_{field}_chars")
                or _max_length(model, field)
            )
            rule = f"{field} length must be 1..{top or 'the limit'} characters"
            detail = f"got {len(err['input'])} characters" if isinstance(err["input"], str) else ""
        else:
            rule = _FIELD_RULES.get(field, f"{field}: {err['msg']}")
            where = ".".join(loc[1:])
            detail = f"{where}: {err['msg']}" if where else err["msg"]
            if kind != "id_rule" and field == "id":
                detail = f"got {shown(err['input'], 60)}"
        if (rule, detail) not in out:
            out.append((rule, detail))
    return out
