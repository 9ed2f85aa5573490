"""The Optuna sweeper plugin stands alone: it depends on Hydra and Optuna (and the standard library, OmegaConf, and
what Optuna brings: SQLAlchemy; matplotlib if installed), never on clipqa. Any Hydra app can then install and use it.

Every import counts, also one inside a function. That the plugin *runs* without clipqa is tests/sweeper/test_apps.py
(its sweeps run with ``import clipqa`` blocked).
"""

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT

PLUGIN = ROOT / "hydra_plugins" / "clipqa_optuna_sweeper"
ALLOWED = {"hydra", "omegaconf", "optuna", "sqlalchemy", "matplotlib"} | set(sys.stdlib_module_names)
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in PLUGIN.rglob("*.py"))


def imported_roots(path: Path) -> set[str]:
    """The top-level packages ``path`` imports (relative imports: the plugin itself, left out)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_scan_sees_imports_in_functions_too():
    assert imported_roots(PLUGIN / "_storage.py") >= {"optuna", "urllib", "random"}  # optuna: inside functions


@pytest.mark.parametrize("path", MODULES)
def test_no_module_of_the_plugin_imports_clipqa(path):
    roots = imported_roots(ROOT / path)
    assert "clipqa" not in roots, f"{path} imports clipqa: the plugin must work for any Hydra app"
    assert roots <= ALLOWED, f"{path} imports {sorted(roots - ALLOWED)}: the plugin depends on Hydra and Optuna only"
    assert "clipqa." not in (ROOT / path).read_text(), (
        f"{path} names a clipqa module (a string _target_ is an import too)"
    )


@pytest.mark.parametrize("path", MODULES)
def test_no_module_of_the_plugin_is_a_second_manual(path):
    assert len((ROOT / path).read_text().splitlines()) <= 360, path
