"""The README and docs/ pages stay true to the tree: every relative link and image exists, every ``python -m X``
(and launcher ``-m X`` / ``--module X``) names a module that can run, every ``dist-subspace <command>`` is a
command, and the README stays short.

Modules are found without importing them (nor their packages: ``dist_subspace/__init__.py`` pulls in torch), so
this file runs in well under a second.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MODULE = re.compile(
    r"\bpython3? -m ([A-Za-z_][\w.]*)"  # python -m X (also .venv/bin/python -m X)
    r"|--module ([A-Za-z_][\w.]*)"  # deepspeed --module X
    r"|\b(?:torchrun|accelerate launch)\b[^`\n]*? -m ([A-Za-z_][\w.]*)"  # torchrun / accelerate launch ... -m X
)
COMMAND = re.compile(r"\bdist-subspace ([a-z_]+(?:\|[a-z_]+)*)")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def link_targets(text: str) -> list[str]:
    """Relative link and image targets of a markdown text, without their ``#fragment`` (code is not searched)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto: ... and anchors within the page
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    return [target for target in link_targets(text) if not (path.parent / target).exists()]


def module_targets(text: str) -> set[str]:
    return {next(group for group in match if group).rstrip(".") for match in MODULE.findall(text)}


def find_module(name: str) -> ModuleSpec | None:
    """The spec of ``name`` found on the path alone: no package of it is imported (unlike
    ``importlib.util.find_spec``, which imports ``dist_subspace`` and so torch to find ``dist_subspace.train``)."""
    parts = name.split(".")
    spec = PathFinder.find_spec(parts[0], [str(ROOT), *sys.path])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec


def runnable(name: str) -> bool:
    """``python -m name`` can run: a module, or a package with a ``__main__``."""
    spec = find_module(name)
    if spec is None:
        return False
    return spec.submodule_search_locations is None or find_module(f"{name}.__main__") is not None


def commands() -> set[str]:
    """The keys of ``COMMANDS`` in dist_subspace/__main__.py, read from the source."""
    tree = ast.parse((ROOT / "dist_subspace" / "__main__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("dist_subspace/__main__.py defines no COMMANDS dict")


def test_the_checks_can_fail():
    """Planted mistakes are caught, so a green run means something."""
    planted = "see [the plan](docs/no_such_page.md#top), [ok](README.md), ![img](nowhere.png) and [web](https://x.org)"
    assert broken_links(ROOT / "README.md", planted) == ["docs/no_such_page.md", "nowhere.png"]
    assert link_targets("`[not a link](in/code.md)` and [anchor](#layout)") == []
    text = "`python -m dist_subspace.bench`, `deepspeed --module dist_subspace.train`, `torchrun -m benchmarks.nope`"
    assert module_targets(text) == {"dist_subspace.bench", "dist_subspace.train", "benchmarks.nope"}
    assert not runnable("dist_subspace.bench") and not runnable("benchmarks.nope")
    assert runnable("dist_subspace.train") and runnable("dist_subspace.study") and runnable("benchmarks.bench")
    assert not runnable("dist_subspace.data")  # a package without __main__
    assert COMMAND.findall("`dist-subspace train|plan`, `dist-subspace frob X`") == ["train|plan", "frob"]
    assert module_targets("`pytest tests/test_families.py -m distributed`") == set()  # a marker, not a module


def test_there_are_pages():
    assert len(PAGES) > 5 and all(page.exists() for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_image_exists(page):
    assert not broken_links(page), f"{page_id(page)} links to missing files: {broken_links(page)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_m_target_is_a_runnable_module(page):
    missing = sorted(name for name in module_targets(page.read_text()) if not runnable(name))
    assert not missing, f"{page_id(page)} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_dist_subspace_command_exists(page):
    known = commands()
    named = {name for match in COMMAND.findall(page.read_text()) for name in match.split("|")}
    assert named <= known, f"{page_id(page)} names unknown dist-subspace commands: {sorted(named - known)}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
