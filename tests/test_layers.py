"""The import contract (pyproject's [tool.importlinter]: the layers of docs/architecture.md, and no cycle) catches
what it is there for: `make test` runs it on the package; these tests break a copy of the package on purpose."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT


@pytest.fixture
def package_copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "smids_ml", tmp_path / "smids_ml", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def import_in_a_function(module: Path, statement: str) -> None:
    """Add an import inside a function: the contract sees those as well as a module's own."""
    with module.open("a") as handle:
        handle.write(f"\n\ndef _deliberate():\n    {statement}\n")


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """The project's contract checked on the package under `folder`."""
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                          cwd=folder, env={**os.environ, "PYTHONPATH": str(folder)}, capture_output=True, text=True)


def test_an_import_up_the_layers_breaks_the_contract(package_copy):
    import_in_a_function(package_copy / "smids_ml" / "config.py", "from smids_ml.engine import resolve_device")
    result = lint_imports(package_copy)
    assert result.returncode == 1, result.stdout
    assert "smids_ml.config is not allowed to import smids_ml.engine" in result.stdout


def test_a_cycle_inside_one_layer_breaks_the_contract(package_copy):
    import_in_a_function(package_copy / "smids_ml" / "explain.py", "from smids_ml.predict import predict_inputs")
    result = lint_imports(package_copy)
    assert result.returncode == 1, result.stdout
    assert "each layer imports only the layers below it KEPT" in result.stdout  # predict and explain share a layer
    assert "No cycles are allowed in smids_ml" in result.stdout
