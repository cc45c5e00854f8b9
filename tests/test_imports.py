"""The package's import structure: no cycles, entry points that do not import each other, and no
module that exits or needs configs at import.

Every import statement counts, also those inside functions: a lazy import hides a cycle from the
interpreter but not from a reader."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cspexp

PACKAGE_DIR = Path(cspexp.__file__).resolve().parent
# The modules a user runs (`python -m …`); each is a leaf of the import graph.
ENTRY_POINTS = ("cspexp.cli", "cspexp.train", "cspexp.bench", "cspexp.prompt", "cspexp.aggregate", "cspexp.convert",
                "cspexp.predict", "cspexp.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The cspexp modules `path` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a → b → … → a, or None (iterative DFS, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
            elif colour[child] == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "cspexp"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("def f():\n    from cspexp.sub import y\n")
    (pkg / "sub" / "y.py").write_text("from . import x\n")
    known = {"cspexp", "cspexp.sub", "cspexp.sub.x", "cspexp.sub.y"}
    assert imported_modules(pkg / "sub" / "x.py", "cspexp.sub.x", known) == {"cspexp.sub.y"}
    assert imported_modules(pkg / "sub" / "y.py", "cspexp.sub.y", known) == {"cspexp.sub.x"}


def test_no_import_cycles_inside_cspexp():
    graph = import_graph()
    assert len(graph) > 40  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_import_no_other_entry_point(entry):
    graph = import_graph()
    others = set(ENTRY_POINTS) - {entry}
    reached, todo = set(), [entry]
    while todo:
        for child in graph[todo.pop()] - reached:
            reached.add(child)
            todo.append(child)
    assert not reached & others, f"{entry} imports {sorted(reached & others)}"


def test_importing_every_module_neither_exits_nor_needs_the_configs(tmp_path):
    """With CSPEXP_CONFIG_DIR pointing nowhere, every module still imports (the check runs when an
    entry point starts, with a one-line error)."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('imported', len(sys.argv) - 1)\n"
    names = [n for n in sorted(modules()) if not n.endswith("__main__")]
    env = {"CSPEXP_CONFIG_DIR": str(tmp_path / "nowhere"), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"imported {len(names)}"
    run = subprocess.run([sys.executable, "-m", "cspexp", "dataset.n=1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: cspexp's configs were not found at ")
