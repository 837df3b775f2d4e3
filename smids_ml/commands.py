"""The flags of `train` and `cv`, declared over light modules (click, `config`, `console`): click checks their types
(nan and inf included), then `config_from_options` every training flag, before torch and MLflow load, so a refused
flag is one line in a fraction of a second instead of seconds. Then the checks that need torch or a model
(`transfer.checked_config`: the device, an --init-from source), and the work: `train.run` and `cv.run`. Both imports
are deferred for that speed and point down the layers; `python -m smids_ml.train` and `.cv` run these commands."""

from __future__ import annotations

import click

from smids_ml import SmidsError
from smids_ml.config import CV_EXPERIMENT, TRAIN_EXPERIMENT, config_from_options, config_options
from smids_ml.console import Command, stops_cleanly


@click.command("train", cls=Command)
@config_options()
@click.option("--experiment", default=TRAIN_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--register-as", default=None, help="Register the model under this name in the model registry (with "
                                                 "several --label-column columns, one model each as NAME-<column>).")
@click.option("--alias", default=None, help="Alias to point at the registered version (e.g. champion).")
@click.option("--members", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many models (seeds --seed, --seed+1, ...) on the same split and log them as one "
                   "model that averages their probabilities; K times the training time.")
@click.option("--member-models", default="",
              help="Comma-separated architectures (e.g. smids_resnet,mobilenet_v3_small): --members seeds of each, "
                   "logged as one averaging model. Default: --model only.")
@click.option("--member-recipes", default="",
              help="Comma-separated recipes, each a preset with optional +field=value overrides (e.g. "
                   "default+tta=d4,fast): --members seeds of each, on this command's "
                   "data, split, seed and device, logged as one averaging model; each member keeps its own input "
                   "size. Training flags go in the recipes.")
@stops_cleanly("the run is marked FAILED")
def train(experiment, run_name, register_as, alias, members, member_models, member_recipes, **options):
    """Train one model (or an ensemble of --members; or one per --label-column) on a folder of class folders or a
    labels table, and log everything to MLflow."""
    if alias and not register_as:
        raise SmidsError("--alias needs --register-as")
    config_from_options(dict(options))  # every flag refused here, before torch and MLflow load
    from smids_ml import train as work
    from smids_ml.transfer import checked_config

    work.run(checked_config(options), experiment, run_name, register_as, alias, members, member_models, member_recipes)


@click.command("cv", cls=Command)
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Number of folds; each is the test set once. A --valid-frac part (none by default) is carved "
                   "from the other folds; --test-frac is not used.")
@config_options()
@click.option("--experiment", default=CV_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="Name of the parent run.")
@click.option("--register-as", default=None,
              help="Log the K fold models as one ensemble model (mean of probabilities) and register it under this "
                   "name.")
@click.option("--alias", default=None, help="Alias to point at the registered ensemble (e.g. champion).")
@stops_cleanly("the cross-validation run and its running fold are marked FAILED")
def cv(folds, experiment, run_name, register_as, alias, **options):
    """Stratified k-fold cross-validation: train and test one model per fold, report mean ± std."""
    if alias and not register_as:
        raise SmidsError("--alias needs --register-as")
    if options.get("split_column"):
        raise SmidsError(f"--split-column {options['split_column']}: cv makes every row a test row once, so a table's "
                         "own split cannot hold; drop the flag (train and tune honour it)")
    config_from_options(dict(options))  # every flag refused here, before torch and MLflow load
    from smids_ml import cv as work
    from smids_ml.transfer import checked_config

    work.run(checked_config(options), folds, experiment, run_name, register_as, alias)
