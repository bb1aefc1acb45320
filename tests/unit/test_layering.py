"""The package's layers, read from its import statements (module level and inside functions):
no import cycle, and no module pulling in a layer it does not need (a serving replica does not
import Ray Data or the training stack; models/ does not know the registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "platform" / "finch"


def module_name(path: Path) -> str:
    return ".".join(("finch", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def finch_imports(path: Path) -> set[str]:
    """The finch modules `path` imports; `from finch.serve import metrics` counts as finch.serve.metrics."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("finch"):
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("finch")}
    return imported


GRAPH = {module: finch_imports(path) for module, path in MODULES.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for other in GRAPH.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def test_the_graph_is_read_from_the_sources():
    assert "finch.data.pipeline" in GRAPH["finch.train.run"]  # a module-level import
    assert "finch.train.dpo" in GRAPH["finch.train.trainers"]  # an import inside a function
    assert "finch.serve.metrics" in GRAPH["finch.serve.api"]  # a module imported from its package


def test_no_import_cycle():
    assert [group for group in strongly_connected(GRAPH) if len(group) > 1] == []


@pytest.mark.parametrize(
    "module, never",
    [
        # A serving replica: vLLM and the API, not Ray Data, pandas pipelines, training or chat.
        ("finch.serve.app", {"finch.data.pipeline", "finch.chat", "finch.train.worker", "finch.train.trainers"}),
        *((module, {"finch.registry.store"}) for module in MODULES if module.startswith("finch.models.")),
        # The sweep report reads results; it does not need torch or Ray Train's worker.
        ("finch.tune.report", {"finch.train.worker", "finch.train.trainers"}),
        # Row building is plain Python: testable and usable without Ray.
        ("finch.data.examples", {"finch.data.pipeline"}),
    ],
)
def test_a_layer_does_not_reach_what_it_does_not_need(module, never):
    assert module in GRAPH
    assert reachable(module) & never == set()
