"""The house: clipqa's imports point down the floors (README, Layout) and never form a cycle.

Every import counts, also one inside a function: a cycle hidden in a function body is still two modules that
need each other.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Floor of each module (README, Layout). An import may point to a lower floor or, without a cycle, along its own.
FLOORS = {
    # 0: names and types everyone shares
    "errors": 0, "metrics": 0, "paths": 0, "config": 0, "signals": 0, "schedule": 0, "train_state": 0,
    # 1: the parts
    "data": 1, "demo_data": 1, "pretrained": 1, "image_tokens": 1, "cpu_kernels": 1, "packed_text": 1,
    "tiny_pretrain": 1, "model": 1, "freeze": 1, "evaluation": 1, "features": 1, "tracking": 1, "plots": 1, "report": 1,
    "optuna_study": 1, "download": 1, "wups": 1, "devices": 1,
    # 2: set-up, checkpoints, the training loop
    "build": 2, "checkpoint": 2, "loop": 2,
    # 3: the run function
    "run": 3, "inference": 3,
    # 4: entry points (train.py and the Hydra plugins import from here and below)
    "cli": 4, "sweep": 4, "pyfunc": 4, "__init__": 4,
}  # fmt: skip


def imports_of(path: Path) -> set[str]:
    """The clipqa modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clipqa":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("clipqa.")}
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    return {p.stem: imports_of(p) - {p.stem} for p in sorted(package.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


GRAPH = import_graph(ROOT / "clipqa")


def test_every_module_has_a_floor():
    assert set(GRAPH) == set(FLOORS), "place new modules in FLOORS (and the README's Layout)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_floors(module):
    upward = {dep: FLOORS[dep] for dep in GRAPH[module] if FLOORS[dep] > FLOORS[module]}
    assert not upward, f"clipqa.{module} (floor {FLOORS[module]}) imports from higher floors: {upward}"


def test_the_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves: a cycle through a function-level import is found, and so is an upward import."""
    (tmp_path / "model.py").write_text("from clipqa.errors import ClipqaError\n")
    (tmp_path / "errors.py").write_text("def f():\n    from clipqa import model\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) in (["errors", "model", "errors"], ["model", "errors", "model"])
    assert any(FLOORS[dep] > FLOORS[m] for m, deps in graph.items() for dep in deps)
