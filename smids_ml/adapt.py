"""Defaults that follow the data: one rule for every data set instead of a preset per data set.

The recipe was chosen on SMIDS (colour crops of 80-264 px, three balanced classes, ~1,400 training crops a
fold). Where a field is left to the data (`--image-size 0`, `--channels 0`, `--epochs 0`, `--class-weights
auto`, the defaults) it is read off what the data report measures, each value with its reason, logged in
the run's `adapted` param and printed; any flag given a value wins. On SMIDS every rule gives the values
that were measured there, so its recipe and compute are unchanged.
"""

from __future__ import annotations

import math

import click
import numpy as np

from smids_ml.config import TrainConfig
from smids_ml.data import Dataset, ImageError, open_image

# The SMIDS recipe: its input side, its length in epochs, and that length in optimizer steps on a fold of
# SMIDS (155 epochs of 45 batches of 32: ~1,440 crops); a smaller set trains as many steps, not as many epochs.
MAX_SIDE, BASE_EPOCHS, BASE_STEPS = 96, 155, 155 * 45
MIN_SIDE = 32
GREY_SAMPLE = 64  # crops decoded to tell a grey set from a colour one
IMBALANCE = 1.5  # largest class over smallest class from which the loss weighs classes


def is_grey(image) -> bool:
    """No colour: a one-channel mode, or RGB whose channels agree (within 2 levels, lossy formats) almost everywhere."""
    if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;"):
        return True
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    return float((pixels.max(axis=2) - pixels.min(axis=2) <= 2).mean()) > 0.99


def grey_set(dataset: Dataset, seed: int = 0) -> bool:
    """Whether a seeded sample of the data set's crops is grey throughout."""
    paths = dataset.manifest["path"].to_numpy()
    sample = np.random.default_rng(seed).permutation(len(paths))[:GREY_SAMPLE]
    for i in sample:
        try:
            if not is_grey(open_image(dataset.root / paths[i])):
                return False
        except ImageError:
            continue
    return True


def adapt(cfg: TrainConfig, dataset: Dataset, train_images: int | None = None) -> TrainConfig:
    """`cfg` with every field left to the data decided from `dataset`, trained on `train_images` crops a model
    (default: its train split), and the reasons in `cfg.adapted`. A config with nothing left is returned as is."""
    values, reasons = {}, []
    manifest = dataset.manifest
    if cfg.channels == 0:
        grey = grey_set(dataset, cfg.seed)
        values["channels"] = 1 if grey else 3
        reasons.append(f"channels={values['channels']} ({'grey' if grey else 'colour'} crops)")
    if cfg.image_size == 0:
        side = float(np.median(np.maximum(manifest["width"], manifest["height"])))
        values["image_size"] = int(min(MAX_SIDE, max(MIN_SIDE, 8 * round(side / 8))))
        reasons.append(f"image_size={values['image_size']} (median crop side {side:g} px; at most {MAX_SIDE})")
    if cfg.epochs == 0:
        n = train_images if train_images is not None else int((manifest["split"] == "train").sum())
        steps = max(1, math.ceil(n / cfg.batch))
        values["epochs"] = max(BASE_EPOCHS, math.ceil(BASE_STEPS / steps))
        why = (f"~{round(values['epochs'] * steps, -2):,} optimizer steps, like a SMIDS model; a small set trains "
               "more epochs" if values["epochs"] > BASE_EPOCHS
               else f"at least {BASE_EPOCHS} epochs and {BASE_STEPS:,} steps")
        reasons.append(f"epochs={values['epochs']} ({n} training crops, {steps} step{'s' if steps > 1 else ''} an "
                       f"epoch: {why})")
    if cfg.class_weights == "auto":
        counts = manifest["label"].value_counts()
        ratio = float(counts.max() / counts.min())
        values["class_weights"] = "sqrt" if ratio >= IMBALANCE else "none"
        reasons.append(f"class_weights={values['class_weights']} (largest class {ratio:.1f}× the smallest)")
    if not values:
        return cfg
    click.echo("from the data: " + "; ".join(reasons), err=True)
    return cfg.replace(**values, adapted="; ".join(filter(None, [cfg.adapted, *reasons])))
