"""The cleaner's layout: small modules, and an honest import graph (module level, no cycle, no importlib, no exporter).

Imports hidden in functions or done by name through importlib are invisible to import graphs and
to mypy; that is how `cli` and `act_cli` once imported each other unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("cleaner", "shared")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(project modules imported, imports not at module level) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found: set[str] = set()
    hidden: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        ours = {n for n in names if n in known or n.split(".")[0] in ("exporter", *PACKAGES)}
        found |= {n for n in ours if n in known}
        if ours and id(node) not in top_level:
            hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found, hidden


def test_every_project_import_is_at_module_level_and_none_goes_through_importlib() -> None:
    sources = _sources()
    hidden = [h for path in sources.values() for h in _imports(path, set(sources))[1]]
    assert hidden == []
    by_name = [str(p.relative_to(ROOT)) for p in sources.values() if "importlib" in p.read_text(encoding="utf-8")]
    assert by_name == []


def test_the_cleaner_and_shared_import_no_cycle_and_never_the_exporter() -> None:
    sources = _sources()
    graph = {name: _imports(path, set(sources))[0] - {name} for name, path in sources.items()}
    assert not [name for name, path in sources.items() if "exporter" in {d.split(".")[0] for d in graph[name]}]
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_cleaner_module_is_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in (ROOT / "cleaner").rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}
