"""Search spaces: named ones (the original study's two grids, a broad one for TPE) or a YAML/JSON file.

A space has `fixed` values (TrainConfig fields set for every trial) and `params` to search: TrainConfig's
tunable fields, and `epochs_scale`, a multiple of the recipe's epochs (SCALES). A param is either a list (grid
values, or categorical choices for TPE/random) or a range `{low, high, log: bool, int: bool}` (TPE/random only).

    fixed: {model: improved_cnn, optimizer: Adam}
    params:
      lr: [0.001, 0.0007, 0.0005]
      dropout_rate: {low: 0.2, high: 0.5}
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import optuna
import yaml

from smids_ml import SmidsError
from smids_ml.config import PRESETS, TrainConfig

# The original study's input, schedule and augmentation around its grids, from the `original`
# preset; run length (epochs, patience, image size, batch) stays the caller's.
ORIGINAL_RECIPE = {k: PRESETS["original"][k]
                   for k in ("channels", "resize", "scheduler", "label_smoothing", "rotation", "scale_shift")}

# Searched params that are not fields: a multiple of a field's value in the base recipe. Training length is searched
# as `epochs_scale` times the epochs given or decided from the data, since absolute epochs do not transfer between a
# 200-crop and a 3,000-crop set; the base recipe itself is scale 1 (the defaults trial).
SCALES = {"epochs_scale": "epochs"}
ADDED_LATER = {"epochs_scale"}  # params the named spaces gained later: a study that searched without them resumes so

SPACES = {
    # The original study's first round: 16 points on its simple CNN.
    "initial-grid": {
        "fixed": {**ORIGINAL_RECIPE, "model": "simple_cnn"},
        "params": {"lr": [1e-3, 3e-4], "weight_decay": [0.0, 1e-4], "optimizer": ["Adam", "SGD"],
                   "dropout_rate": [0.4, 0.5]},
    },
    # Its second round: 9 points on the CNN with batch normalisation, Adam, no weight decay.
    "improved-grid": {
        "fixed": {**ORIGINAL_RECIPE, "model": "improved_cnn", "optimizer": "Adam", "weight_decay": 0.0},
        "params": {"lr": [1e-3, 7e-4, 5e-4], "dropout_rate": [0.3, 0.35, 0.4]},
    },
    # For TPE on real crops: around the default recipe (AdamW, one-cycle), the knobs that move
    # cross-validated accuracy on SMIDS: architecture, smids_resnet's stem, peak lr, weight decay, input
    # size, augmentation and regularisation strength, and training length (half to twice the recipe's).
    "broad": {
        "fixed": {"optimizer": "AdamW", "scheduler": "onecycle"},
        "params": {
            "model": ["smids_resnet", "improved_cnn", "resnet18"],
            "stem": ["pool", "conv"],
            "lr": {"low": 5e-4, "high": 5e-3, "log": True},
            "weight_decay": {"low": 1e-3, "high": 0.2, "log": True},
            "dropout_rate": {"low": 0.0, "high": 0.4},
            "image_size": [64, 80, 96, 112],
            "channels": [3, 1],
            "resize": ["pad", "stretch"],
            "augment_strength": {"low": 0.5, "high": 1.5},
            "label_smoothing": {"low": 0.0, "high": 0.2},
            "epochs_scale": {"low": 0.5, "high": 2.0, "log": True},
        },
    },
}


def load_space(name_or_file: str | dict) -> dict:
    """A named space, one read from a YAML/JSON file, or a dict of that shape; checked against TrainConfig."""
    if isinstance(name_or_file, dict):
        space, name_or_file = name_or_file, "(given as a dict)"
        if not isinstance(space.get("params"), dict) or not space["params"]:
            raise SmidsError("a search space needs a non-empty mapping 'params' (and optionally 'fixed')")
    elif name_or_file in SPACES:
        space = SPACES[name_or_file]
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise SmidsError(f"--space {name_or_file!r} is neither a named space ({', '.join(SPACES)}) nor a file")
        try:
            text = path.read_text()
            space = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise SmidsError(f"cannot read search space {path}: {exc}") from None
        if not isinstance(space, dict) or not isinstance(space.get("params"), dict) or not space["params"]:
            raise SmidsError(f"search space {path} needs a non-empty mapping 'params' (and optionally 'fixed')")
    space = {"fixed": dict(space.get("fixed") or {}), "params": dict(space["params"])}
    known = {f.name for f in fields(TrainConfig) if f.metadata["tunable"]} | set(SCALES)
    unknown = (set(space["fixed"]) | set(space["params"])) - known
    if unknown:
        raise SmidsError(f"search space {name_or_file}: {', '.join(sorted(unknown))} cannot be searched; "
                         f"tunable parameters are {', '.join(sorted(known))}")
    for name, spec in space["params"].items():
        if not (isinstance(spec, list) and spec) and not (isinstance(spec, dict) and {"low", "high"} <= set(spec)):
            raise SmidsError(f"search space {name_or_file}: {name} must be a list of values or {{low, high}}")
    return space


def grid_of(space: dict) -> dict[str, list]:
    """The grid: every param must be a list of values."""
    ranges = [name for name, spec in space["params"].items() if not isinstance(spec, list)]
    if ranges:
        raise SmidsError(f"--sampler grid needs a list of values for {', '.join(ranges)} (they are ranges); "
                         "use --sampler tpe or random, or list the values")
    return space["params"]


def grid_size(space: dict) -> int:
    size = 1
    for values in grid_of(space).values():
        size *= len(values)
    return size


def point_outside(space: dict, values: dict) -> list[str]:
    """The searched params whose value in `values` the space cannot suggest, as `name=value`."""
    outside = []
    for name, spec in space["params"].items():
        value = values[name]
        inside = value in spec if isinstance(spec, list) else (
            not isinstance(value, bool) and isinstance(value, (int, float)) and spec["low"] <= value <= spec["high"]
            and (not spec.get("int") or float(value).is_integer()))
        if not inside:
            outside.append(f"{name}={value}")
    return outside


def base_value(base: TrainConfig, name: str):
    """What the base recipe is for a searched param: a field's value, or scale 1."""
    return 1.0 if name in SCALES else getattr(base, name)


def configure(base: TrainConfig, values: dict) -> TrainConfig:
    """`base` with a point's values (fixed and searched): fields replaced, each scale multiplying its field (at
    least 1), validated."""
    values = dict(values)
    scales = {SCALES[name]: float(values.pop(name)) for name in list(values) if name in SCALES}
    cfg = base.replace(**values)
    return cfg.replace(**{name: max(1, round(getattr(cfg, name) * scale)) for name, scale in scales.items()}).validate()


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Trial values for every searched param, plus the fixed ones."""
    values = dict(space["fixed"])
    for name, spec in space["params"].items():
        if isinstance(spec, list):
            values[name] = trial.suggest_categorical(name, spec)
        elif spec.get("int"):
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values
