"""Tune hyperparameters with Optuna; every trial is a nested MLflow run, the best model is registered.

    python -m smids_ml.tune --sampler grid --space improved-grid --epochs 50 --data data

The parent run holds the search (summary CSV, Optuna's figures, best params); each child run holds
one trial (params, per-epoch metrics, state). Only the study's best model is logged and registered.
Running the same --study-name again resumes the study: a grid runs only its missing points, and a
trial that failed or was interrupted is run again.

This module only composes the command: worker coordination lives in `studies`, the objective and the
study's summary in `search`, registration and the champion rule in `promotion`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click
import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient

from smids_ml import SmidsError, tracking
from smids_ml.config import TrainConfig, config_from_options, config_options
from smids_ml.console import stops_cleanly
from smids_ml.promotion import CHALLENGER, promote_best
from smids_ml.search import Search, echo_trial, log_study, run_grid
from smids_ml.spaces import SPACES, grid_of, grid_size, load_space
from smids_ml.studies import (HEARTBEAT_SECONDS, JOURNAL, best_trial, check_same_space, default_storage,
                              enqueue_defaults, fail_stale_trials, make_pruner, make_sampler, open_storage,
                              retry_failed, run_exists, study_lock)
from smids_ml.train import DEFAULT_EXPERIMENT, prepare_data, use_experiment

DEFAULT_TPE_TRIALS = 20
# Trials are ranked, pruned and early-stopped on validation, so tune carves one even where train's default does not.
TUNE_DEFAULTS = {"valid_frac": 0.15}
PARENT_ATTR = "mlflow_parent_run_id"


def tune(base: TrainConfig, space_name: str | dict, sampler: str = "tpe", n_trials: int | None = None,
         timeout: float | None = None, pruner: str = "median", study_name: str | None = None,
         storage: str | None = None, register_as: str = "best", alias: str | None = "champion",
         experiment: str | None = DEFAULT_EXPERIMENT, pruner_startup_trials: int = 5, pruner_warmup_epochs: int = 3,
         ensemble_top: int = 1, promote: bool = False, heartbeat: int = HEARTBEAT_SECONDS):
    """Run (or resume) a study under one parent run, as one of any number of workers on the same study
    (same --storage and --study-name); returns (study, registered version or None).

    `ensemble_top` > 1 registers the ensemble of the best trials instead of the best one alone."""
    if base.valid_frac == 0:
        raise SmidsError(f"tune ranks trials by their validation {base.monitor}: --valid-frac must be above 0 "
                         "(0.15 is usual)")
    space = load_space(space_name)
    storage = storage or default_storage()
    if isinstance(space_name, dict):
        space_name = json.dumps(space_name)  # logged as the parent run's `space`
        study_name = study_name or f"custom-{sampler}"
    study_name = study_name or f"{Path(space_name).stem}-{sampler}"
    if sampler == "grid":
        grid_of(space)
    elif n_trials is None and timeout is None:
        n_trials = DEFAULT_TPE_TRIALS
    lock = functools.partial(study_lock, storage, study_name)
    dataset = prepare_data(base)
    search = Search(base, space, dataset, keep=ensemble_top)
    tracking.check_server()
    with lock():  # one study, one parent run: the first worker creates them, the others attach
        study = optuna.create_study(
            study_name=study_name, storage=open_storage(storage, heartbeat), load_if_exists=True,
            direction="minimize" if base.monitor == "valid_loss" else "maximize",
            sampler=make_sampler(sampler, space, base.seed),
            pruner=make_pruner(pruner, pruner_startup_trials, pruner_warmup_epochs, base.epochs))
        check_same_space(study, space)
        parent = study.user_attrs.get(PARENT_ATTR)
        resume = parent if parent and run_exists(parent) else None
        home = MlflowClient().get_run(resume).info.experiment_id if resume else None
        chosen = mlflow.get_experiment_by_name(experiment) if experiment else None
        if home is not None and experiment and not os.environ.get("MLFLOW_RUN_ID") \
                and (chosen is None or chosen.experiment_id != home):
            home_name = MlflowClient().get_experiment(home).name
            raise SmidsError(f"study {study_name} is tracked in experiment {home_name!r} "
                             f"(its parent run {resume}); run it with --experiment {home_name!r}")
        use_experiment(experiment)
        active = mlflow.start_run(run_id=resume, run_name=None if resume else f"study-{study_name}",
                                  tags={"optuna.study": study_name, "optuna.sampler": sampler})
        if not resume:
            study.set_user_attr(PARENT_ATTR, active.info.run_id)
            tracking.log_new_params({"study_name": study_name, "sampler": sampler, "space": space_name, "pruner": pruner,
                                     "storage": storage,
                                     **{f"base_{k}": ("" if v is None else v) for k, v in base.to_dict().items()}})
    with active:
        mlflow.set_tags(tracking.process_tags())
        if sampler == "grid":
            if run_grid(study, search, lock, min(2.0, heartbeat), n_trials, timeout) == 0:
                click.echo(f"study {study_name}: all {grid_size(space)} grid points already ran", err=True)
        else:
            with lock():
                fail_stale_trials(study)
                queued = retry_failed(study)  # run on top of --n-trials; the defaults trial counts among them
                enqueue_defaults(study, space, base)
            callbacks = [echo_trial]
            for _ in range(queued):
                study.optimize(search.objective, n_trials=1, callbacks=callbacks, gc_after_trial=True)
            study.optimize(search.objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks, gc_after_trial=True)
        with lock():
            log_study(study, base.monitor)
            version = promote_best(study, search, register_as, alias, promote) if register_as else None
    return study, version


@click.command("tune")
@click.option("--sampler", type=click.Choice(["grid", "tpe", "random"]), default="tpe", show_default=True)
@click.option("--space", default="broad", show_default=True,
              help=f"Named search space ({', '.join(SPACES)}) or a YAML/JSON file.")
@click.option("--n-trials", type=int, default=None,
              help=f"Trials to run (0 or unset: the whole grid, or {DEFAULT_TPE_TRIALS} for tpe/random).")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds (0: none).")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True)
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
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@config_options(TUNE_DEFAULTS)
@stops_cleanly("the running trial is marked FAIL and its run FAILED; run the same command again to resume")
def main(sampler, space, n_trials, timeout, pruner, pruner_startup_trials, pruner_warmup_epochs, study_name,
         storage, register_as, alias, promote, heartbeat, ensemble_top, experiment, **options):
    """Search hyperparameters with Optuna; each trial is a nested MLflow run; register the best model."""
    base = config_from_options(options, TUNE_DEFAULTS)
    study, version = tune(base, space, sampler, n_trials or None, timeout or None, pruner, study_name or None,
                          storage or None, register_as or None, alias or None, experiment,
                          pruner_startup_trials, pruner_warmup_epochs, ensemble_top, promote, heartbeat)
    best = best_trial(study)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    click.echo(f"study {study.study_name}: {len(study.trials)} trials {states}")
    if best is not None:
        click.echo(f"best trial {best.number}: {base.monitor} {best.value:.4f} with {best.params}")
    if version is not None:
        click.echo(f"registered models:/{register_as}/{version.version} (@{CHALLENGER})")


if __name__ == "__main__":
    main()
