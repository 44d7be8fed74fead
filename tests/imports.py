"""The project's imports read from the source with ``ast`` (at the top of a module or inside a
function): the DVC stages' deps (tests/flows/test_dvc_deps.py) and the layers of flows/
(tests/test_architecture.py) are both checked on them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "cf_strategies")


def module_file(name: str) -> Path | None:
    """``flows.core.data`` → ``flows/core/data.py`` (or a package's ``__init__.py``); None outside."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def with_parents(name: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imports_of(file: Path) -> set[str]:
    """The project modules ``file`` imports, anywhere in it."""
    package = module_name(file) if file.name == "__init__.py" else module_name(file.parent)
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            module = node.module if not node.level else ".".join(filter(None, [base, node.module]))
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # submodules
    found = set().union(*(with_parents(n) for n in names)) if names else set()
    return {n for n in found if module_file(n)}
