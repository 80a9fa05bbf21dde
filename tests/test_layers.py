"""The house is one-way: folders are layers, imports go down only, no circle, one door to DeepSpeed/Accelerate.

Every import is read from the source (module level and inside functions), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_subspace.core.paths import CHECKOUT as ROOT

# Layers, bottom up: a module may import its own layer and the ones below it.
LAYERS = ["core", "data", "evaluation", "training", "commands"]
COMMANDS = {"train", "evaluate", "generate", "plan", "predict", "__main__"}
FRAMEWORKS = {"deepspeed", "accelerate"}  # only the engine opens this door
PURE = {"dist_subspace.core.simplex", "dist_subspace.core.arch"}  # the math and the architecture table: torch only


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a package module, read from its path: ``dist_subspace.<layer>.*``, or a command (a module at
    the package's top, or the study). Anything else at the top is a loose module and has no layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package's own __init__ (it re-exports core names)
    if parts[1] in ("core", "data", "evaluation", "training"):
        return parts[1]
    if parts[1] == "study" or parts[1] in COMMANDS:
        return "commands"
    raise AssertionError(f"{module} lies loose at the package's top: put it in a layer's folder, or name it a command")


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports (anywhere in it): project modules resolved to a module of ``known`` (``from
    pkg import submodule`` counts the submodule), others by their top-level name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module itself
                found.add(node.module)
    return {name if name in known else name.split(".")[0] for name in found}


def graph() -> dict[str, set[str]]:
    files = [*sorted((ROOT / "dist_subspace").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    names = {module_name(p): p for p in files}
    return {name: imports(path, set(names)) for name, path in names.items()}


GRAPH = graph()
PACKAGE = {m: deps for m, deps in GRAPH.items() if m.split(".")[0] == "dist_subspace"}


def test_the_tree_shows_the_layers_every_top_level_module_is_a_command():
    """A newcomer tells the core from a command by the tree: the package's top holds only commands."""
    top = sorted(p.stem for p in (ROOT / "dist_subspace").glob("*.py") if p.stem != "__init__")
    assert set(top) == COMMANDS, f"loose at the top: {sorted(set(top) - COMMANDS)}"
    for module in PACKAGE:
        layer(module)  # raises for a module outside the layers


def test_every_package_module_sits_in_a_layer_and_imports_only_downward():
    upward = []
    for module, deps in PACKAGE.items():
        for dep in deps:
            if dep.startswith("dist_subspace.") and LAYERS.index(layer(dep)) > LAYERS.index(layer(module)):
                upward.append(f"{module} ({layer(module)}) imports {dep} ({layer(dep)})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    """Tarjan's strongly connected components over package and benchmark modules: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v] & GRAPH.keys():
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_one_door_to_deepspeed_and_accelerate_and_none_to_the_benchmarks():
    doors = sorted(m for m, deps in GRAPH.items() if deps & FRAMEWORKS)
    assert doors == ["dist_subspace.training.engine"]
    assert not [m for m, deps in PACKAGE.items() if any(d.split(".")[0] == "benchmarks" for d in deps)]


def test_the_math_and_the_architecture_table_import_no_framework():
    stdlib = set(sys.stdlib_module_names)
    for module in PURE:
        outside = {d for d in GRAPH[module] if d not in stdlib and d != "torch" and not d.startswith("__future__")}
        assert not outside, f"{module} imports {outside}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """A lazy import (inside a function) is an import: the rules above cannot be dodged that way."""
    assert "dist_subspace.training.engine" in imports(ROOT / "dist_subspace/training/recipe.py", set(GRAPH))
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from dist_subspace.training import engine\n")
    deps = imports(planted, set(GRAPH))
    assert "dist_subspace.training.engine" in deps and layer("dist_subspace.core.model") == "core"


@pytest.mark.parametrize("command", ["dist_subspace.plan", "dist_subspace.__main__"])
def test_light_commands_load_neither_deepspeed_nor_datasets_nor_matplotlib(command):
    code = f"import json, sys, {command}; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    heavy = set(json.loads(out.strip().splitlines()[-1])) & {"deepspeed", "datasets", "matplotlib"}
    assert not heavy, heavy
