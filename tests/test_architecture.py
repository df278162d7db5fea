"""The package's shape: no import cycles, small modules, and an engine that never asks which method runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "inflora"
GENERIC = ["engine.py", "training.py", "evaluation.py", "taskdata.py", "results.py", "checkpoint.py", "cli.py",
           "export/__init__.py", "export/runs.py", "export/writers.py", "export/loaded.py", "export/cli.py",
           "export/format.py"]
METHOD_WORDS = r"\.adapter\b|shared_head|memory_dims|stats_s|design_s|memory_s|getattr\(learner"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (functions and ``if TYPE_CHECKING`` blocks included). ``from X
    import a`` counts as importing ``X`` itself (a package's ``__init__`` runs) and ``X.a`` when that is a module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles() -> None:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                dfs(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])
    assert not cycles, cycles


def test_modules_stay_small() -> None:
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) >= 400}
    assert not big, big


def test_generic_rooms_do_not_know_the_methods() -> None:
    for rel in GENERIC:
        text = (SRC / rel).read_text()
        assert not re.search(METHOD_WORDS, text), rel
