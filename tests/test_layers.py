"""The import contract (pyproject's [tool.importlinter]: the package's layers, and no cycle) catches what it is there
for, and docs/architecture.md draws what it says: `make test` runs it on the package; these tests break a copy of the
package on purpose, and hold the page's layer picture and imports table against the contract and the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import grimp
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


def architecture_section() -> str:
    page = (ROOT / "docs" / "architecture.md").read_text()
    return page.split("## Who calls whom", 1)[1].split("\n## ", 1)[0]


def test_the_architecture_page_draws_the_contracts_layers():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = [set(layer.replace(":", " ").split()) for layer in next(c for c in contract if c["id"] == "layers")["layers"]]
    modules = set().union(*layers)
    picture = architecture_section().split("```text\n", 1)[1].split("```", 1)[0]
    drawn = [set(re.findall(r"\b[a-z_]+\b", block)) & modules for block in re.split(r"\n\s*│\n\s*▼\n", picture)]
    assert drawn == layers


def test_the_architecture_pages_imports_table_is_the_codes():
    graph = grimp.build_graph("smids_ml", cache_dir=None)
    left_out = {"smids_ml", "smids_ml.config", "smids_ml.console"}
    imports = {module.removeprefix("smids_ml."): {m.removeprefix("smids_ml.")
                                                  for m in graph.find_modules_directly_imported_by(module) - left_out}
               for module in graph.modules - left_out}
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", architecture_section(), re.M))
    assert {name: set(re.findall(r"`(\w+)`", cell)) & set(imports) for name, cell in rows.items()} == \
        {name: imports[name] for name in rows}
    assert {name for name, imported in imports.items() if imported} <= set(rows)  # every module that imports one
