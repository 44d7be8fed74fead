"""The import graph keeps the layers the docs draw (docs/architecture.md).

Every ``import`` and ``from ... import`` of the project's code is read from the source (also
those inside functions) and checked against two rules:

- no import circle between modules;
- a module imports only from its own sub-package or from one below it in ``LAYERS``: the steps
  never import production, a driver or the CLI; nothing imports a driver but the CLI;
  ``cf_strategies`` never imports ``flows``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from flows import LAYERS
from tests.imports import PACKAGES, ROOT, imports_of, module_name


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports. A package's ``__init__`` runs
    before any module in it, so a module's own packages are not edges."""
    graph = {name: imports_of(path) - {name} for name, path in project_modules().items()}
    return {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "flows" and len(parts) > 1 else None


def direction_errors(graph: dict[str, set[str]]) -> list[str]:
    errors = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if module.startswith("cf_strategies") and dep.startswith("flows"):
                errors.append(f"{module} imports {dep}: cf_strategies never imports flows")
            mine, theirs = layer(module), layer(dep)
            if mine is None or theirs is None:
                continue
            if mine not in LAYERS or theirs not in LAYERS:
                errors.append(f"{module} or {dep} is in no declared layer: add it to LAYERS")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                errors.append(f"{module} ({mine}) imports {dep} ({theirs}), a layer above it")
    return errors


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_imports_point_down_the_layers():
    assert direction_errors(import_graph()) == []


def test_every_module_of_flows_is_in_a_layer():
    loose = [m for m in project_modules() if m.count(".") == 1 and m.startswith("flows.")]
    assert all(m.removeprefix("flows.") in LAYERS for m in loose), loose


def whole_params_readers(folder: Path) -> list[str]:
    """Functions of ``folder`` that take the whole ``Params``, except ``from_params``: the
    constructor of a step's own config record, which a driver calls once."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                takes = any(
                    a.annotation is not None and ast.unparse(a.annotation) == "Params" for a in args
                )
                if takes and node.name != "from_params":
                    found.append(f"{path.name}:{node.lineno} {node.name}")
    return found


def test_steps_take_their_own_config_not_the_whole_params():
    """Only the drivers (and the CLI and production, which drive steps) hold the whole Params;
    a step receives its own section and resolved paths (``XStep.from_params``)."""
    assert whole_params_readers(ROOT / "flows" / "steps") == []
    assert whole_params_readers(ROOT / "flows" / "scoring") == []
    assert whole_params_readers(ROOT / "flows" / "registry") == []


def test_the_params_check_finds_a_step_that_takes_params(tmp_path):
    (tmp_path / "step.py").write_text(
        "class S:\n    @classmethod\n    def from_params(cls, params: Params): ...\n\n"
        "def run(params: Params, x: int) -> None: ...\n"
    )
    assert whole_params_readers(tmp_path) == ["step.py:5 run"]


def test_each_sub_package_says_what_lives_there():
    for name in LAYERS:
        doc = ast.get_docstring(ast.parse((ROOT / "flows" / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 3, name


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"flows.core.a": {"flows.steps.b"}, "flows.steps.b": set()}, "a layer above it"),
        ({"flows.steps.a": {"flows.drivers.b"}, "flows.drivers.b": set()}, "a layer above it"),
        ({"cf_strategies.x": {"flows.core.a"}, "flows.core.a": set()}, "never imports flows"),
    ],
)
def test_the_check_catches_a_wrong_direction(graph, expected):
    assert any(expected in e for e in direction_errors(graph))


def test_the_check_catches_a_circle():
    graph = {"flows.core.a": {"flows.core.b"}, "flows.core.b": {"flows.core.c"}}
    graph["flows.core.c"] = {"flows.core.a"}
    assert circles(graph) == [["flows.core.a", "flows.core.b", "flows.core.c"]]
