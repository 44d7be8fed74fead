"""Every DVC stage lists as deps every project module its step runs, so that ``dvc repro`` reruns
a stage whenever code that can change its output changes.

A stage ``X`` runs ``forgetless step X``: the branch ``name == "X"`` of ``flows.drivers.stages.run_stage``
and what it calls. Its modules are ``flows/drivers/stages.py``, the modules of the names that branch (and
the code of ``run_stage`` around the branches) uses, and every project module those import,
at the top or inside a function, read from the source with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from flows.core.records import STAGES
from tests.imports import PACKAGES, ROOT, imports_of, module_file, with_parents


def closure(modules: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = set().union(*(with_parents(m) for m in modules))
    while todo:
        name = todo.pop()
        if name in seen or not module_file(name):
            continue
        seen.add(name)
        todo |= imports_of(module_file(name)) - seen
    return seen


def stage_roots() -> dict[str, set[str]]:
    """Per stage: ``flows.drivers.stages`` and the modules of the names its branch of ``run_stage`` uses."""
    tree = ast.parse((ROOT / "flows" / "drivers" / "stages.py").read_text())
    origin = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    } | {
        alias.asname or alias.name: alias.name
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    run_stage = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_stage"
    )

    def modules(nodes) -> set[str]:
        used = {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}
        return {origin[n] for n in used if n in origin and module_file(origin[n])}

    branches: dict[str, list[ast.stmt]] = {}
    around: list[ast.stmt] = []
    for stmt in run_stage.body:
        node = stmt
        while isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            stage = node.test.comparators[0]
            assert isinstance(stage, ast.Constant) and isinstance(node.test.left, ast.Name)
            branches[stage.value] = node.body
            node = node.orelse[0] if len(node.orelse) == 1 else ast.Module(node.orelse, [])
        if node is stmt:
            around.append(stmt)
        elif isinstance(node, ast.Module):
            around += node.body
    common = modules(around)
    return {
        stage: {"flows.drivers.stages"} | common | modules(body) for stage, body in branches.items()
    }


def stage_modules(roots: set[str]) -> set[Path]:
    """The files a stage runs: its roots and what they import, but not everything
    ``flows.drivers.stages`` imports for the other stages."""
    names = closure(roots - {"flows.drivers.stages"}) | with_parents("flows.drivers.stages")
    return {module_file(n).relative_to(ROOT) for n in names}


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_pipeline_step_is_a_stage_with_its_branch(dvc_stages):
    assert list(dvc_stages) == STAGES
    assert set(stage_roots()) == set(STAGES)
    for name, stage in dvc_stages.items():
        assert stage["cmd"].startswith(f"forgetless step {name} "), stage["cmd"]


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_depends_on_every_module_it_runs(name, dvc_stages):
    deps = [Path(d) for d in dvc_stages[name]["deps"] if d.split("/")[0] in PACKAGES]
    needed = stage_modules(stage_roots()[name])

    def covered(file: Path) -> bool:
        return any(file == d or d in file.parents for d in deps)

    missing = sorted(str(f) for f in needed if not covered(f))
    assert not missing, f"stage {name!r} runs these modules but does not list them: {missing}"
    unused = sorted(str(d) for d in deps if not any(f == d or d in f.parents for f in needed))
    assert not unused, f"stage {name!r} lists deps it does not run: {unused}"


def test_imports_are_found_at_any_depth():
    """The walk sees imports inside functions (the validate step's are) and submodules."""
    validate = closure({"flows.steps.validate"})
    assert {
        "flows.steps.probes",
        "flows.steps.finetune",
        "flows.steps.evaluate",
        "cf_strategies.ewc",
    } <= validate
    assert "flows.steps.register" not in validate and "flows.drivers.stages" not in validate
