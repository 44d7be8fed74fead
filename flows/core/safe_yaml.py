"""YAML read without surprises: the params file, ``--set`` values and lm-eval task configs.

PyYAML's ``safe_load`` builds only plain values, but it lets the last of two equal keys win
silently (``trust_remote_code: false`` then ``true`` turns remote code on), expands aliases
without bound (a "billion laughs" file of a few hundred bytes becomes gigabytes), and recurses
once per nesting level. :func:`load_yaml` refuses all three before anything is built:

- a key twice in one mapping is an error naming the key and both lines;
- anchors and aliases (``&name``, ``*name``, and so ``<<`` merges) are refused: a params file is
  short enough to write out, and a refused alias cannot expand;
- nesting deeper than :data:`MAX_DEPTH` levels, and a text over ``max_bytes``, are refused.

``1e-3`` is read as the number YAML 1.2 says it is (PyYAML follows YAML 1.1, where it is the
string "1e-3"), so that a quoted ``'30'`` can be refused as a string where a number belongs.

Errors are :class:`YamlError` with the line (1-based) and the rule; values in messages are cut
to :data:`SHOWN_CHARS` characters (:func:`shown`).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 20  # params.yaml needs 4 (train.strategy_params.<name>.<option>)
MAX_BYTES = 1_000_000  # a params file is a few kilobytes
SHOWN_CHARS = 80


class YamlError(ValueError):
    """A YAML text that breaks a rule; ``line`` is 1-based (None when not known)."""

    def __init__(self, line: int | None, rule: str):
        self.line, self.rule = line, rule
        super().__init__(f"line {line}: {rule}" if line else rule)


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was."""
    return cut(repr(value), limit)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without duplicate keys, anchors, aliases, or unbounded nesting."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise YamlError(
                event.start_mark.line + 1,
                "anchors and aliases (&name, *name, <<) are not allowed: write the value out",
            )
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise YamlError(event.start_mark.line + 1, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise YamlError(
                    key_node.start_mark.line + 1, "a mapping key must be a plain value"
                ) from None
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise YamlError(
                    line,
                    f"duplicate key {shown(key)} (first on line {first_line[key]}, again on "
                    f"line {line}); YAML would keep only the last",
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 numbers PyYAML (YAML 1.1) reads as strings: 1e-3, 5E+2 (no dot before the exponent)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, max_bytes: int = MAX_BYTES) -> Any:
    """The value of one YAML document, under the rules of this module."""
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise YamlError(None, f"over {max_bytes} bytes")
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters here
        return loader.get_single_data()
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise YamlError(mark.line + 1 if mark else None, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(None, f"not valid YAML: {shown(str(exc))}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an int of 5000 digits
        raise YamlError(None, f"a value YAML cannot build: {shown(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()
