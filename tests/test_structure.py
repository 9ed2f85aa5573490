"""The house: clipqa's packages are floors, imports point down them, and no two modules need each other.

The rule is per package (docs/architecture.md): a module may import from its own package (without a cycle) or from a
package on a lower floor; the shared modules at the top of ``clipqa/`` (errors, metrics, paths, config) are the
ground floor, the entry points (cli, ``__init__``) the roof. Every import counts, also one inside a function: a cycle
hidden in a function body is still two modules that need each other.
"""

import ast
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT

# Floor of each package (and of the top-level modules). A new package or top-level module must be placed here.
FLOORS = {
    "errors": 0, "metrics": 0, "paths": 0, "config": 0,      # ground: names and types everyone shares
    "overrides": 0,                                           # ... and which command-line choices took effect
    "data": 1, "tracking": 1,                                 # parts that need nothing of clipqa's but the ground
    "models": 2,                                              # the architecture (its tiny pretraining reads the demo)
    "evaluation": 3, "report": 3,                             # scoring a model; comparing runs
    "training": 4,                                            # one run: builders, loop, checkpoints, run function
    "inference": 5, "sweep": 5,                               # using a trained run; a multirun in MLflow
    "cli": 6, "__init__": 6,                                  # entry points
}  # fmt: skip


def unit_of(module: str) -> str:
    """``clipqa.models.model`` -> ``models``; ``clipqa.errors`` -> ``errors``."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """The clipqa modules (dotted, without the ``clipqa.`` prefix) ``path`` imports, at the top or in functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clipqa":
            if node.module == "clipqa":
                found |= {a.name for a in node.names}
            else:
                sub = node.module[len("clipqa.") :]
                # `from clipqa.models import model` imports the module clipqa.models.model
                pkg = ROOT / "clipqa" / sub.replace(".", "/")
                found |= {f"{sub}.{a.name}" if (pkg / f"{a.name}.py").exists() else sub for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("clipqa.") :] for a in node.names if a.name.startswith("clipqa.")}
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module (dotted, relative to clipqa) -> the modules it imports."""
    graph = {}
    for p in sorted(package.rglob("*.py")):
        rel = p.relative_to(package).with_suffix("")
        name = ".".join(rel.parts[:-1]) if rel.name == "__init__" and len(rel.parts) > 1 else ".".join(rel.parts)
        graph[name] = imports_of(p) - {name}
    return graph


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


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_every_package_and_top_level_module_has_a_floor():
    assert {m.split(".")[0] for m in GRAPH} == set(FLOORS), "place new packages/modules in FLOORS (and docs)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_floors(module):
    upward = {dep: floor(dep) for dep in GRAPH[module] if floor(dep) > floor(module)}
    assert not upward, f"clipqa.{module} (floor {floor(module)}) imports from higher floors: {upward}"


def test_the_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_packages_import_each_other_without_a_cycle():
    """Two packages on one floor may not lean on each other either (evaluation <-> report, inference <-> sweep)."""
    packages = {}
    for module, deps in GRAPH.items():
        packages.setdefault(module.split(".")[0], set()).update(d.split(".")[0] for d in deps)
    packages = {p: deps - {p} for p, deps in packages.items()}
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))


def test_the_top_level_stays_small():
    """clipqa/ holds its subpackages and a handful of shared modules (the issue's ~8)."""
    top = [p.name for p in (ROOT / "clipqa").glob("*.py")]
    assert len(top) <= 8, top


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "clipqa").rglob("*.py")))
def test_no_module_is_a_second_manual(path):
    """A module over ~350 lines holds more than one concern: split it by what it holds."""
    assert len((ROOT / path).read_text().splitlines()) <= 360, path


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves: a cycle through a function-level import is found, and so is an upward import."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.py").write_text(
        "from clipqa.errors import ClipqaError\nfrom clipqa.training import run\n"
    )
    (tmp_path / "errors.py").write_text("def f():\n    from clipqa.models.model import ClipQA\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) in (["errors", "models.model", "errors"], ["models.model", "errors", "models.model"])
    assert any(floor(dep) > floor(m) for m, deps in graph.items() for dep in deps)


@pytest.mark.parametrize("package", ["data", "models", "evaluation", "training"])
def test_model_and_loop_code_never_import_mlflow(package):
    """Tracking goes through clipqa.tracking (the loop sees a Tracker): a direct mlflow call in the loop or the model
    would bypass its queued writes, outage handling and credential scrubbing."""
    for path in sorted((ROOT / "clipqa" / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n.split(".")[0] == "mlflow" for n in names), f"{path.relative_to(ROOT)} imports mlflow"
