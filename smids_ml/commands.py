"""The flags of `train`, `cv` and `tune`, declared over light modules (click, `config`, `console`): click checks their types
(nan and inf included), then `config_from_options` every training flag, before torch and MLflow load, so a refused
flag is one line in a fraction of a second instead of seconds. Then the checks that need torch or a model
(`transfer.checked_config`: the device, an --init-from source), and the work: `train.run`, `cv.run`, `tune.run`. Those
imports are deferred for that speed and point down the layers; `python -m smids_ml.train`, `.cv` and `.tune` run
these commands."""

from __future__ import annotations

import click

from smids_ml import SmidsError
from smids_ml.config import (CV_EXPERIMENT, DEFAULT_BUDGET_MINUTES, DEFAULT_ETA, DEFAULT_FINALISTS, DEFAULT_FOLDS,
                             DEFAULT_RANKING_FOLDS, DEFAULT_RUNGS, DEFAULT_TPE_TRIALS, HEARTBEAT_SECONDS, JOURNAL,
                             MIN_VALID_CROPS, RANKINGS, SPACE_NAMES, TRAIN_EXPERIMENT, TUNE_DEFAULTS, FiniteFloat,
                             config_from_options, config_options)
from smids_ml.console import Command, stops_cleanly


def checked(options: dict, defaults: dict | None = None):
    """A command's TrainConfig: every flag refused first, with only click and `config` loaded; then what needs torch
    or a model (`transfer.checked_config`: an --init-from source's fields, the device)."""
    config_from_options(dict(options), defaults)
    from smids_ml.transfer import checked_config

    return checked_config(options, defaults)


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
    cfg = checked(options)
    from smids_ml import train as work

    work.run(cfg, experiment, run_name, register_as, alias, members, member_models, member_recipes)


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
    cfg = checked(options)
    from smids_ml import cv as work

    work.run(cfg, folds, experiment, run_name, register_as, alias)


@click.command("tune", cls=Command)
@click.option("--sampler", type=click.Choice(["grid", "tpe", "random"]), default="tpe", show_default=True)
@click.option("--space", default="broad", show_default=True,
              help=f"Named search space ({', '.join(SPACE_NAMES)}) or a YAML/JSON file.")
@click.option("--n-trials", type=click.IntRange(min=0), default=None,
              help=f"Trials to run (0 or unset: the whole grid, or {DEFAULT_TPE_TRIALS} for tpe/random).")
@click.option("--timeout", type=FiniteFloat(min=0), default=None,
              help="Stop starting trials after this many seconds (0: none).")
@click.option("--pruner", type=click.Choice(["halving", "median", "hyperband", "none"]), default="halving",
              show_default=True,
              help="halving: successive halving over --rungs of complete, compressed schedules (epochs/eta², "
                   "epochs/eta, epochs), the best 1/eta of each rung promoted; median, hyperband: stop a training "
                   "at an early epoch; none.")
@click.option("--rungs", type=click.IntRange(min=1), default=DEFAULT_RUNGS, show_default=True,
              help="Rungs of --pruner halving; the last trains the recipe's full --epochs.")
@click.option("--eta", type=click.IntRange(min=2), default=DEFAULT_ETA, show_default=True,
              help="Reduction factor of --pruner halving: each rung is eta times longer and keeps 1/eta of the trials.")
@click.option("--pruner-startup-trials", type=click.IntRange(min=0), default=5, show_default=True,
              help="Trials that complete before the median pruner starts pruning.")
@click.option("--pruner-warmup-epochs", type=click.IntRange(min=0), default=3, show_default=True,
              help="Epochs of every trial that are never pruned.")
@click.option("--study-name", default=None, help="Optuna study name (default: SPACE-SAMPLER); reuse it to resume.")
@click.option("--storage", default=None,
              help=f"Optuna storage URL or journal file [default: {JOURNAL} beside a SQLite tracking store].")
@click.option("--register-as", default="best", show_default=True, help="Registered model name for the best trial.")
@click.option("--alias", default="champion", show_default=True,
              help="Alias of the name's best model. The study's best is registered as @challenger; this alias moves "
                   "to it when the name has none yet, when it beats the holder's validation metric on the same data, "
                   "or with --promote.")
@click.option("--promote", type=click.BOOL, is_flag=False, flag_value=True, default=False, show_default=True,
              help="Move --alias to this study's best whatever the comparison says.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=HEARTBEAT_SECONDS, show_default=True,
              help="Seconds between a worker's heartbeats on a database storage; a trial whose worker misses three "
                   "is failed and run again by another worker.")
@click.option("--ensemble-top", type=click.IntRange(min=1), default=1, show_default=True,
              help="Register the ensemble of the best K trials (sharing the best's input size and colour mode): "
                   "one model that averages their probabilities.")
@click.option("--finalists", type=click.IntRange(min=0), default=DEFAULT_FINALISTS, show_default=True,
              help="Cross-validate the best N trials (and the defaults trial) on the same folds of the training part, "
                   "and refit and register the winner by mean (0: register the best trial's own weights).")
@click.option("--folds", type=click.IntRange(min=2), default=DEFAULT_FOLDS, show_default=True,
              help="Folds of the finalists' cross-validation.")
@click.option("--refit", type=click.Choice(["model", "ensemble"]), default="model", show_default=True,
              help="What the winning finalist registers: model, trained again on the whole training part (no "
                   "carve-out, full schedule); ensemble, its fold models as one averaging model (no more training).")
@click.option("--budget", type=FiniteFloat(min=0), default=DEFAULT_BUDGET_MINUTES, show_default=True,
              help="Minutes for the whole study on this machine (tpe, random): plans the trials, rungs, finalists and "
                   "folds that fit it from a measured training epoch, and stops starting trials when the search's "
                   "share is spent; --n-trials and --finalists/--folds are then maxima (0: no plan).")
@click.option("--ranking", type=click.Choice(RANKINGS), default="auto", show_default=True,
              help="How trials are ranked: split, by --monitor on the validation part; folds, by its mean over "
                   "--ranking-folds folds of the training part (train and valid rows), on the same folds for every "
                   f"trial, each trial costing that many models; auto, folds when the validation part holds fewer "
                   f"than {MIN_VALID_CROPS} crops, where one split ranks trials mostly by noise.")
@click.option("--ranking-folds", type=click.IntRange(min=2), default=DEFAULT_RANKING_FOLDS, show_default=True,
              help="Folds of --ranking folds.")
@click.option("--experiment", default=TRAIN_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@config_options(TUNE_DEFAULTS)
@stops_cleanly("the running trial is marked FAIL and its run FAILED; run the same command again to resume")
def tune(sampler, space, n_trials, timeout, pruner, rungs, eta, pruner_startup_trials, pruner_warmup_epochs, study_name,
         storage, register_as, alias, promote, heartbeat, ensemble_top, finalists, folds, refit, budget, ranking,
         ranking_folds, experiment, **options):
    """Search hyperparameters with Optuna; each trial is a nested MLflow run; register the best model."""
    cfg = checked(options, TUNE_DEFAULTS)
    from smids_ml import tune as work

    work.run(cfg, sampler, space, n_trials, timeout, pruner, rungs, eta,
             pruner_startup_trials, pruner_warmup_epochs, study_name, storage, register_as, alias, promote, heartbeat,
             ensemble_top, finalists, folds, refit, budget, ranking, ranking_folds, experiment)
