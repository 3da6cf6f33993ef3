"""The module import graph of scalept and preprocessing (every import, at module level or inside a
function, and the stages that scalept.steps loads by name) has no cycle, stage and model code never
import orchestration, and only preprocessing imports the other package."""
from __future__ import annotations

import ast
from pathlib import Path

from scalept.steps import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scalept", "preprocessing", "hydra_plugins")
ORCHESTRATION = {"scalept.launch", "scalept.local_ranks", "scalept.slurm_jobs",
                 "hydra_plugins.scalept_slurm.sweep_launcher"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _executed_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _executed_nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in _executed_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join(package + ([node.module] if node.module else []))
                for alias in node.names:  # `from pkg import module` depends on the module, not on pkg
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    graph["scalept.steps"] |= set(STAGES.values())  # loaded by name (importlib), a dependency all the same
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
    assert "scalept.steps" in graph["scalept.launch"] and "scalept.plan" in graph["scalept.steps"]
    assert "preprocessing.preprocess" in graph["scalept.steps"]  # a stage loaded by name
    assert "preprocessing.synthetic.road" in graph["preprocessing.synthetic.street"]  # a relative import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) is None


def test_stages_and_model_never_import_orchestration():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("scalept.model", "scalept.data", "scalept.training", "preprocessing")) or name in (
                "scalept.train", "scalept.infer", "scalept.fuse", "scalept.steps", "scalept.distributed"):
            assert not targets & ORCHESTRATION, f"{name} imports {targets & ORCHESTRATION}"


def test_stages_meet_only_in_files():
    """A stage reads what the stage before it wrote through the file modules (tiles, shards, checkpoint)."""
    graph = import_graph()
    stages = {"scalept.train", "scalept.infer", "scalept.fuse", "preprocessing.preprocess"}
    for name in stages:
        assert not graph[name] & stages, f"{name} imports {graph[name] & stages}"


def test_the_packages_depend_one_way_preprocessing_on_scalept():
    """preprocessing builds on scalept's formats; no scalept module imports preprocessing (steps names it)."""
    graph = import_graph()
    graph["scalept.steps"] -= set(STAGES.values())  # the by-name edges are the one place scalept meets it
    for name, targets in graph.items():
        if not name.startswith("preprocessing"):
            assert not {t for t in targets if t.startswith("preprocessing")}, f"{name} imports preprocessing"
