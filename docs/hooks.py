"""MkDocs hooks: the parts of the docs that are generated from the code, so they cannot drift.

- ``configuration.md``: the marker ``<!-- config-reference -->`` becomes one table per section of
  :class:`flows.core.config.Params` (key, type, default, bounds, description). A description is
  the field's own, else the comment after the key in the repository's ``params.yaml``; a key
  with neither is a warning, which fails ``mkdocs build --strict``.
- ``architecture.md``: the marker ``<!-- flows-tree -->`` becomes the tree of ``flows/``: each
  sub-package with its ``__init__`` docstring, each module with its docstring's first sentence.
- every page: a link into the repository (``<repo_url>/blob/main/PATH``) must name a path that
  exists, since MkDocs does not check absolute links.
- the images of ``benchmarks/results/`` are served at ``results/``, where
  ``benchmarks/README.md`` (included whole in ``benchmarks.md``) links to them.

Every problem is logged to ``mkdocs.plugins.forgetless`` as a warning: under ``strict: true``
MkDocs aborts the build on it.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from flows import LAYERS

log = logging.getLogger("mkdocs.plugins.forgetless")

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MARKER = "<!-- config-reference -->"
TREE_MARKER = "<!-- flows-tree -->"
# Params fields that are not keys of params.yaml: load_params sets ``root`` from the file's
# folder and refuses it when written.
NOT_IN_FILE = frozenset({"root"})
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")


# --- params.yaml: the comment of every key ---------------------------------------------------


def _split_comment(text: str) -> tuple[str, str | None]:
    """``value   # comment`` split at the first ``#`` outside quotes that follows a space."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), None


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?:\s|$)(?P<rest>.*)$")


def params_comments(text: str) -> dict[str, str]:
    """The comment of every key of a params file, by dotted key (``train.lora.r``).

    A key's comment is the text after ``#`` on its line, continued by the comment-only lines
    that follow it indented deeper than the key; sections nest by indentation. Comments before
    any key, and comment lines at or left of the last key's indentation, belong to no key.
    """
    comments: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []  # (indentation, key) of the open sections
    current: tuple[int, str] | None = None  # the key a comment-only line may continue
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            current = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            if current is not None and indent > current[0]:
                comments.setdefault(current[1], []).append(stripped.lstrip("#").strip())
            else:
                current = None
            continue
        match = KEY_LINE.match(line)
        if not match:  # a list item or a flow value continued: no key here
            current = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([key for _, key in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        _, comment = _split_comment(match["rest"])
        comments[dotted] = [comment] if comment else []
        current = (indent, dotted)
    return {key: " ".join(part for part in parts if part) for key, parts in comments.items()}


def params_values(text: str) -> dict[str, Any]:
    """The values a params file sets, by dotted key (sections flattened), read as the pipeline
    reads them (YAML 1.2 numbers, no duplicate keys)."""
    from flows.core.safe_yaml import load_yaml

    def flatten(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            out[prefix + str(key)] = value
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
        return out

    data = load_yaml(text) or {}
    return flatten(data, "") if isinstance(data, dict) else {}


# --- pydantic fields: type, default, bounds --------------------------------------------------


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested section (``train.lora``), or None for a plain value."""
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def type_name(annotation: Any) -> str:
    """A type as a reader of params.yaml sees it: ``int``, ``path | null``, ``"fail" | "decide"``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _count(n: int, unit: str) -> str:
    return f"{n} {unit[:-1] if n == 1 else unit}"


def _rules(metadata: list[Any], sized: str) -> list[str]:
    """Bounds and patterns of one level of constraints; ``sized`` names what a length counts."""
    rules = []
    for item in metadata:
        for cls, attr, word in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<")):
            if isinstance(item, cls):
                rules.append(f"{word} {getattr(item, attr)}")
        if isinstance(item, MinLen):
            rules.append(f"at least {_count(item.min_length, sized)}")
        if isinstance(item, MaxLen):
            rules.append(f"at most {_count(item.max_length, sized)}")
        if getattr(item, "pattern", None):
            rules.append(f"matches `{item.pattern}`")
    return rules


def _inner_rules(annotation: Any, sized: str) -> list[str]:
    """Constraints written inside the type: ``NonEmptyStr | None``, ``list[NonEmptyStr]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _rules(list(args[1:]), sized) + _inner_rules(args[0], sized)
    if origin in (Union, types.UnionType):
        return [rule for a in args for rule in _inner_rules(a, sized)]
    if origin is list and args:
        return [f"each item {rule}" for rule in _inner_rules(args[0], "characters")]
    if origin is dict and len(args) == 2:
        return [f"each value {rule}" for rule in _inner_rules(args[1], "characters")]
    return []


def bounds(field: FieldInfo) -> str:
    """The field's bounds (ge/gt/le/lt, lengths, patterns) as ``≥ 1, < 1``; "" when none."""
    plain = field.annotation
    while get_origin(plain) in (Union, types.UnionType, Annotated):
        plain = next(a for a in get_args(plain) if a is not type(None))
    sized = "items" if get_origin(plain) in (list, dict) else "characters"
    return ", ".join(_rules(field.metadata, sized) + _inner_rules(field.annotation, sized))


def shown(value: Any) -> str:
    """A value as it would be written in params.yaml (JSON for lists and mappings)."""
    value = to_jsonable_python(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, ensure_ascii=False)


def _code(text: str) -> str:
    """``text`` as a code span (longer fences when it holds backticks)."""
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def cell(text: str) -> str:
    """Prose for a table cell: ``<``, ``>`` and ``|`` escaped outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


# --- the configuration reference -------------------------------------------------------------


def first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _doc_first_paragraph(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    own = doc and doc is not BaseModel.__doc__ and "__doc__" in model.__dict__
    return _rst_to_markdown(first_paragraph(doc)) if own else ""


def config_reference(
    model: type[BaseModel], params_text: str, skip: frozenset[str] = NOT_IN_FILE
) -> tuple[str, list[str]]:
    """Markdown tables of every key of ``model`` (one table per section, nested sections after
    their parent), and the dotted keys that have no description (neither the field's own nor a
    comment in ``params_text``). Top-level fields named in ``skip`` are left out."""
    comments = params_comments(params_text)
    values = params_values(params_text)
    missing: list[str] = []
    blocks: list[str] = []

    def table(section: type[BaseModel], prefix: str, title: str) -> None:
        rows, nested = [], []
        for name, field in section.model_fields.items():
            dotted = prefix + name
            if not prefix and name in skip:
                continue
            if sub := _section(field.annotation):
                nested.append((sub, dotted))
                continue
            description = field.description or comments.get(dotted, "")
            if not description:
                missing.append(dotted)
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = _code(shown(value))
                if dotted in values and shown(values[dotted]) != shown(value):
                    default += f" (params.yaml: {_code(shown(values[dotted]))})"
            rows.append(
                f"| {_code(dotted)} | {_code(type_name(field.annotation))} | {default} "
                f"| {cell(bounds(field))} | {cell(description)} |"
            )
        about = _doc_first_paragraph(section) or comments.get(prefix.rstrip("."), "")
        lines = [f"### {title}", ""]
        if about and prefix:
            lines += [cell(about), ""]
        if rows:
            lines += ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
            lines += rows
        blocks.append("\n".join(lines))
        for sub, dotted in nested:
            table(sub, dotted + ".", f"`{dotted}`")

    table(model, "", "Top level")
    return "\n\n".join(blocks) + "\n", missing


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``, sections included (``train``, ``train.lora``, ``train.lora.r``)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if sub := _section(field.annotation):
            keys += all_keys(sub, f"{prefix}{name}.")
    return keys


# --- the tree of flows/ ----------------------------------------------------------------------


def _rst_to_markdown(text: str) -> str:
    """Docstring markup as markdown: ``code`` and :role:`target` become code spans."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (``e.g.`` does not end one)."""
    paragraph = first_paragraph(doc)
    for match in re.finditer(r"[.!?](?=\s|$)", paragraph):
        before = paragraph[: match.start()].rsplit(" ", 1)[-1]
        if before.lower() not in ("e.g", "i.e", "cf", "vs"):
            return paragraph[: match.end()]
    return paragraph


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path))) or ""


def flows_tree(
    flows_dir: Path, blob_url: str, order: tuple[str, ...] = LAYERS
) -> tuple[str, list[str]]:
    """A markdown list of the sub-packages of ``flows_dir`` in ``order`` (with their
    ``__init__`` docstring) and their modules (with their docstring's first sentence), linked to
    ``blob_url``; and what is wrong: a module or package without a docstring, a sub-package
    missing from ``order`` (listed last)."""
    missing: list[str] = []
    lines: list[str] = []
    found = {p.parent.name: p.parent for p in flows_dir.glob("*/__init__.py")}
    missing += [
        f"{name}/ is not in the layers {list(order)}" for name in sorted(set(found) - set(order))
    ]
    packages = [found[n] for n in order if n in found] + [
        found[n] for n in sorted(set(found) - set(order))
    ]
    for package in packages:
        doc = _docstring(package / "__init__.py")
        if not doc:
            missing.append(f"{package.name}/__init__.py has no docstring")
        rel = package.relative_to(flows_dir.parent).as_posix()
        about = _rst_to_markdown(" ".join(doc.split()))
        lines.append(f"- [**`{rel}/`**]({blob_url.replace('/blob/', '/tree/')}{rel}): {about}")
        for module in sorted(package.glob("*.py")):
            if module.name == "__init__.py":
                continue
            doc = _docstring(module)
            if not doc:
                missing.append(f"{package.name}/{module.name} has no docstring")
            sentence = _rst_to_markdown(first_sentence(doc))
            lines.append(f"    - [`{module.name}`]({blob_url}{rel}/{module.name}): {sentence}")
    return "\n".join(lines) + "\n", missing


# --- links into the repository ---------------------------------------------------------------


def repo_link_problems(markdown: str, repo_url: str, root: Path) -> list[str]:
    """Links to ``<repo_url>/blob/main/PATH`` or ``/tree/main/PATH`` whose PATH does not
    exist under ``root``."""
    base = re.escape(repo_url.rstrip("/"))
    problems = []
    for match in re.finditer(base + r"/(?:blob|tree)/main/([^\s)#\"'>]+)", markdown):
        if not (root / match[1]).exists():
            problems.append(f"{match[0]}: {match[1]} does not exist in the repository")
    return problems


# --- the hooks -------------------------------------------------------------------------------


def on_files(files, config):
    """Serve ``benchmarks/results/*.png`` (and other images) at ``results/``."""
    from mkdocs.structure.files import File

    results = ROOT / "benchmarks" / "results"
    for image in sorted(results.iterdir() if results.is_dir() else ()):
        if image.suffix.lower() in IMAGE_SUFFIXES:
            files.append(
                File(
                    f"results/{image.name}",
                    src_dir=str(results.parent),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the generated parts of a page and check its links into the repository."""
    page_name = page.file.src_uri
    repo_url = config["repo_url"].rstrip("/")
    if CONFIG_MARKER in markdown:
        from flows.core.config import Params

        text = (ROOT / "params.yaml").read_text(encoding="utf-8")
        reference, missing = config_reference(Params, text)
        for key in missing:
            log.warning(
                f"{page_name}: {key} has no description: give its field a description in "
                "flows/core/config.py or a comment after it in params.yaml"
            )
        markdown = markdown.replace(CONFIG_MARKER, reference)
    if TREE_MARKER in markdown:
        tree, missing = flows_tree(ROOT / "flows", f"{repo_url}/blob/main/")
        for problem in missing:
            log.warning(f"{page_name}: flows/{problem}")
        markdown = markdown.replace(TREE_MARKER, tree)
    for problem in repo_link_problems(markdown, repo_url, ROOT):
        log.warning(f"{page_name}: {problem}")
    return markdown
