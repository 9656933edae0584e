"""The package's shape: imports follow the data flow, ArviZ has one door, import stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

# README's picture, in order: a module may import only from modules before it
ORDER = ["config", "arrays", "data", "networks", "priors", "likelihoods", "guides", "model", "evaluate", "ais", "objectives",
         "checkpoint", "distributed", "graphs", "training", "runs", "toys", "settings", "fits", "mcmc", "comparison",
         "inspection", "report", "cli"]


def _package_imports(path: Path) -> set[str]:
    """Names of pyro_vae modules that ``path`` imports (relative imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [a.name for a in node.names])
    return names


def test_every_module_is_placed_and_none_imports_upward():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "arviz_bridge"}
    assert modules == set(ORDER)
    upward = [(m, n) for m in ORDER for n in _package_imports(PACKAGE / f"{m}.py")
              if n in ORDER and ORDER.index(n) >= ORDER.index(m)]
    assert not upward


def _imports_arviz(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "arviz" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "arviz":
            return True
    return False


def test_only_arviz_bridge_imports_arviz():
    assert [p.name for p in sorted(PACKAGE.glob("*.py")) if _imports_arviz(p)] == ["arviz_bridge.py"]


@pytest.mark.parametrize("module", ["pyro_vae", "pyro_vae.cli", "pyro_vae.inspection"])
def test_import_loads_neither_pyplot_nor_arviz(module):
    # pyplot alone takes ~0.5 s to import: a command loads it only when it draws (`evaluate` never)
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('matplotlib.pyplot', 'arviz') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
