"""The module import graph of scalept and preprocessing (every import, at module level or inside a
function) has no cycle, and stage and model code never import orchestration."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scalept", "preprocessing")
ORCHESTRATION = {"scalept.launch", "scalept.slurm_jobs"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "scalept.steps" in graph["scalept.launch"] and "scalept.fuse" in graph["scalept.steps"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) is None


def test_stages_and_model_never_import_orchestration():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("scalept.model", "scalept.data", "scalept.training", "preprocessing")) or name in (
                "scalept.train", "scalept.infer", "scalept.fuse", "scalept.steps", "scalept.distributed"):
            assert not targets & ORCHESTRATION, f"{name} imports {targets & ORCHESTRATION}"
