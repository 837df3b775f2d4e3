"""The project's declarations agree with each other: pyproject, conda.yaml, MLproject, TrainConfig, CLIs."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import fields

import yaml

from smids_ml.cli import COMMANDS
from smids_ml.config import TrainConfig
from tests.conftest import ROOT
from tests.helpers import canonical, direct_requirements, lock_mismatches, locked_versions

ENTRY_POINTS = {"main", "train", "tune", "evaluate", "predict", "report", "explore", "synth", "cv", "pretrain"}


def mlproject():
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_conda_yaml_mirrors_pyproject_dependencies_and_installs_them_from_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == ["-c constraints.txt", *project]
    assert "torch==2.14.1" in project and "torchvision==0.29.1" in project


def test_the_environment_is_the_locks():
    """A stale or hand-mended environment fails here, in one line a package, not in a user's run a week later."""
    mismatches = lock_mismatches()
    assert not mismatches, "; ".join(mismatches) + " (make setup installs the lock; make lock re-resolves it)"


def test_the_lock_satisfies_pyproject():
    """pyproject.toml changed without `make lock`: its ranges and the lock's pins disagree."""
    pins = locked_versions(ROOT / "constraints.txt")
    for req in direct_requirements():
        assert canonical(req.name) in pins, f"{req.name} is not in constraints.txt: run make lock"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), \
            f"{req}: constraints.txt pins {pins[canonical(req.name)]}: run make lock"


def test_mlproject_train_parameters_are_trainconfig_fields_with_the_same_defaults():
    params = mlproject()["entry_points"]["train"]["parameters"]
    for f in (f for f in fields(TrainConfig) if f.metadata["cli"]):
        assert f.name in params, f.name
        declared = params[f.name]["default"]
        expected = "" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        assert str(declared) == str(expected), f.name


def test_mlproject_tune_defaults_are_the_tune_commands_own():
    from smids_ml.config import TUNE_DEFAULTS

    params = mlproject()["entry_points"]["tune"]["parameters"]
    for name, default in TUNE_DEFAULTS.items():
        assert params[name]["default"] == default, name


def test_the_tune_commands_space_names_are_the_spaces():
    from smids_ml.config import SPACE_NAMES
    from smids_ml.spaces import SPACES

    assert SPACE_NAMES == tuple(SPACES)


def test_every_entry_point_command_parses_with_its_defaults():
    project = mlproject()
    assert project["conda_env"] == "conda.yaml"
    assert set(project["entry_points"]) == ENTRY_POINTS
    for name, entry in project["entry_points"].items():
        values = {k: ("models:/best/1" if k == "model_uri" else "img.png" if k == "inputs" else "crops" if k == "folder"
                      else spec.get("default", ""))
                  for k, spec in entry.get("parameters", {}).items()}
        command = entry["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()})
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"], command
        module = argv[2]
        click_command = importlib.import_module(module).main
        context = click_command.make_context(module, argv[3:])  # raises on an unknown or malformed flag
        assert context.params is not None
        if name in ("main", "train", "tune", "cv"):
            mentioned = set(re.findall(r"\{(\w+)\}", entry["command"]))
            assert {f.name for f in fields(TrainConfig) if f.metadata["cli"]} <= mentioned, name


def test_cli_group_lists_every_command():
    for name, (module, attribute, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), attribute)), name


def test_readme_quick_start_has_exactly_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", quick, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["make demo", "make test"]


def test_group_help_imports_neither_torch_nor_mlflow():
    code = ("import sys; from click.testing import CliRunner; from smids_ml.cli import main; "
            "out = CliRunner().invoke(main, ['--help']).output; "
            "assert 'predict' in out and 'torch' not in sys.modules and 'mlflow' not in sys.modules, out")
    subprocess.run([sys.executable, "-c", code], check=True)
