"""The package's structure: data flows one way through the stages, and no module imports
itself back through another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "batch_classify"
STAGES = ("core", "inputs", "pipeline", "models", "output", "results", "run", "bench", "commands")
"""From the bottom up: a module may import its own stage and the stages before it, never a later one."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The batch_classify modules a file imports (``top_level_only``: those run at import time,
    not inside functions)."""
    names: set[str] = set()

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # imported for type checkers only, never run
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batch_classify"):
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("batch_classify"))
            elif not top_level_only or not top or isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "handlers", "finalbody"):
                    inside = getattr(node, field, None) or []
                    visit(inside, top and isinstance(node, (ast.If, ast.Try, ast.With)))

    visit(ast.parse(path.read_text()).body, True)
    return names


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_module_belongs_to_a_stage():
    loose = [m for m in _modules() if m.count(".") >= 1 and _stage(m) is None]
    assert loose == ["batch_classify.__main__"]


def test_no_stage_imports_a_later_one():
    backwards = []
    for module, path in _modules().items():
        own = _stage(module)
        for imported in _imports(path, top_level_only=False):
            theirs = _stage(imported)
            if own and theirs and STAGES.index(theirs) > STAGES.index(own):
                backwards.append(f"{module} imports {imported}")
    assert backwards == []


def test_no_import_cycle():
    modules = _modules()
    graph = {m: {i for i in _imports(p, top_level_only=False) if i in modules and i != m}
             for m, p in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycles.append(" -> ".join([*path[path.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
