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
from optuna.trial import TrialState
from mlflow import MlflowClient

from smids_ml import SmidsError, tracking
from smids_ml import finalists as final
from smids_ml.adapt import adapt
from smids_ml.budget import plan, replan_finalists
from smids_ml.config import (DEFAULT_ETA, DEFAULT_FINALISTS, DEFAULT_FOLDS, DEFAULT_RANKING_FOLDS, DEFAULT_RUNGS,
                             DEFAULT_TPE_TRIALS, HEARTBEAT_SECONDS, TrainConfig)
from smids_ml.data import prepare_data
from smids_ml.promotion import CHALLENGER, promote_best, register_challenger
from smids_ml.ranking import RANKING_ATTR, SPLIT, Ranking, choose_ranking, fold_parts, keep_ranking
from smids_ml.rungs import rung_epochs
from smids_ml.search import Search, echo_trial, log_study, run_grid
from smids_ml.spaces import grid_of, grid_size, load_space
from smids_ml.studies import (RUN_ID_ATTR, best_trial, check_same_space, default_storage,
                              enqueue_defaults, fail_stale_trials, make_pruner, make_sampler, open_storage,
                              ranked_trials, retry_failed, run_exists, study_lock)
from smids_ml.train import DEFAULT_EXPERIMENT
from smids_ml.transfer import MUST_MATCH

PARENT_ATTR = "mlflow_parent_run_id"


def tune(base: TrainConfig, space_name: str | dict, sampler: str = "tpe", n_trials: int | None = None,
         timeout: float | None = None, pruner: str = "halving", study_name: str | None = None,
         storage: str | None = None, register_as: str = "best", alias: str | None = "champion",
         experiment: str | None = DEFAULT_EXPERIMENT, pruner_startup_trials: int = 5, pruner_warmup_epochs: int = 3,
         ensemble_top: int = 1, promote: bool = False, heartbeat: int = HEARTBEAT_SECONDS,
         finalists: int = DEFAULT_FINALISTS, folds: int = DEFAULT_FOLDS, refit: str = "model",
         rungs: int = DEFAULT_RUNGS, eta: int = DEFAULT_ETA, budget: float | None = None, ranking: str = "auto",
         ranking_folds: int = DEFAULT_RANKING_FOLDS):
    """Run (or resume) a study under one parent run, as one of any number of workers on the same study
    (same --storage and --study-name); returns (study, registered version or None).

    With `finalists` > 0 the best trials (and the defaults trial) are cross-validated with `folds` folds and the
    winner is refit and registered (`finalists` module); with 0 the best trial's own weights are registered (ranked
    by folds, it has none: it is refit), or with `ensemble_top` > 1 the ensemble of the best trials. A `budget` in minutes (TPE and random) plans the
    trials, rungs, finalists and folds that fit it here (`budget` module); --n-trials then caps the trials.
    `ranking` (auto, split, folds) says how trials are ranked: on the validation part, or by `ranking_folds`-fold
    cross-validation of the training part, which auto chooses when the validation part is small (`ranking`)."""
    tracking.check_registry_names(register_as, alias)
    if finalists and ensemble_top > 1:
        raise SmidsError("--ensemble-top registers the best trials' own weights: use it with --finalists 0, or "
                         "--refit ensemble for the winning finalist's fold models")
    if base.valid_frac == 0:
        raise SmidsError(f"tune ranks trials by their validation {base.monitor}: --valid-frac must be above 0 "
                         "(0.15 is usual)")
    space = load_space(space_name)
    if base.init_from:  # the source's network fixes its architecture and channels: they cannot be searched
        held = [k for k in MUST_MATCH if k in space["params"] or k in space["fixed"]]
        space = {part: {k: v for k, v in values.items() if k not in held} for part, values in space.items()}
        if held:
            click.echo(f"--init-from {base.init_from} fixes {', '.join(held)} (the source's): left out of the search",
                       err=True)
        if not space["params"]:
            raise SmidsError(f"--init-from {base.init_from} fixes every parameter of --space {space_name}")
    storage = storage or default_storage()
    if isinstance(space_name, dict):
        space_name = json.dumps(space_name)  # logged as the parent run's `space`
        study_name = study_name or f"custom-{sampler}"
    study_name = study_name or f"{Path(space_name).stem}-{sampler}"
    if sampler == "grid":
        grid_of(space)
    lock = functools.partial(study_lock, storage, study_name)
    dataset = prepare_data(base)
    ranked = choose_ranking(ranking, len(dataset.part("valid")), ranking_folds)
    parts = fold_parts(dataset, ranked.folds, base.seed) if ranked.folds else []
    if parts and ensemble_top > 1:
        raise SmidsError(f"--ensemble-top registers the best trials' own weights, and trials ranked by folds have none "
                         f"({ranked.reason}); use --ranking split")
    # every trial starts from the values decided from the data, for the crops its models train on; the space overrides
    base = adapt(base, dataset, ranked.train_images(dataset))
    halving = pruner == "halving"
    rungs = len(rung_epochs(base.epochs, eta, rungs)) if halving else 1
    search = Search(base, space, dataset, keep=ensemble_top, rungs=rungs, eta=eta, halving=halving, folds=parts)
    planned = None
    if budget and sampler != "grid":
        planned = search.plan = plan(budget, base, dataset, search.rungs, eta, finalists, folds, n_trials, space,
                                     ranked)
        n_trials, search.rungs, finalists, folds = planned.trials, planned.rungs, planned.finalists, planned.folds
        timeout = min(timeout or planned.search_seconds, planned.search_seconds)
    elif sampler != "grid" and n_trials is None and timeout is None:
        n_trials = DEFAULT_TPE_TRIALS
    click.echo(planned.line() if planned else ranked.line(), err=True)
    tracking.check_server()
    with lock():  # one study, one parent run: the first worker creates them, the others attach
        study = optuna.create_study(
            study_name=study_name, storage=open_storage(storage, heartbeat), load_if_exists=True,
            direction="minimize" if base.monitor == "valid_loss" else "maximize",
            sampler=make_sampler(sampler, space, base.seed),
            pruner=make_pruner(pruner, pruner_startup_trials, pruner_warmup_epochs, base.epochs, eta))
        space = search.space = check_same_space(study, space)
        keep_ranking(study, ranked)
        parent = study.user_attrs.get(PARENT_ATTR)
        resume = parent if parent and run_exists(parent) else None
        if parent and not resume and study.trials:
            raise SmidsError(f"study {study_name} in {storage} was tracked by run {parent}, which the tracking store "
                             f"{mlflow.get_tracking_uri()} does not have: use the store it ran with, or a new --study-name")
        home = MlflowClient().get_run(resume).info.experiment_id if resume else None
        chosen = mlflow.get_experiment_by_name(experiment) if experiment else None
        if home is not None and experiment and not os.environ.get("MLFLOW_RUN_ID") \
                and (chosen is None or chosen.experiment_id != home):
            home_name = MlflowClient().get_experiment(home).name
            raise SmidsError(f"study {study_name} is tracked in experiment {home_name!r} "
                             f"(its parent run {resume}); run it with --experiment {home_name!r}")
        tracking.use_experiment(experiment)
        active = mlflow.start_run(run_id=resume, run_name=None if resume else f"study-{study_name}",
                                  tags={"optuna.study": study_name, "optuna.sampler": sampler})
        if not resume:
            study.set_user_attr(PARENT_ATTR, active.info.run_id)
            tracking.log_new_params({"study_name": study_name, "sampler": sampler, "space": space_name, "pruner": pruner,
                                     "storage": storage, **({"rungs": rungs, "eta": eta} if halving else {}),
                                     "ranking": "folds" if ranked.folds else "split",
                                     **({"ranking_folds": ranked.folds} if ranked.folds else {}),
                                     **tracking.config_params(base, "base_")})
    with active:
        mlflow.set_tags(tracking.process_tags() | {RANKING_ATTR: ranked.line()}
                        | ({"smids_ml.plan": planned.line()} if planned else {}))
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
            refits = bool(finalists)
            if finalists and planned:
                finalists, folds, refits = replan_finalists(study, final.choose(study, finalists), planned,
                                                            ranked.refit_ratio(dataset))
            # with no finalists the best trial is refit as one model; trials ranked by folds have no weights of their
            # own to register, so theirs is refit in any case
            if refits or parts:
                version = finalize(study, search, finalists, folds, refit, register_as, alias, promote, ranked)
            else:
                version = promote_best(study, search, register_as, alias, promote) if register_as else None
    return study, version


def finalize(study: optuna.Study, search: Search, count: int, folds: int, refit: str, register_as: str | None,
             alias: str | None, promote: bool, ranking: Ranking = SPLIT):
    """Under the study lock, once no trial runs: cross-validate the finalists (once per number of completed
    trials, so a resumed study with more trials is scored again, and other workers do not repeat it), log
    finalists.csv and the verdict on the parent run, refit the winner and register it as @challenger. With
    `count` 0 (a budget spent), the best trial by validation is refit without cross-validation. `ranking`, how the
    trials were ranked, is recorded on the registered version."""
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if running:
        click.echo(f"study {study.study_name}: {running} trial(s) still running; the worker that finishes last "
                   "scores the finalists", err=True)
        return None
    done = len(ranked_trials(study))
    if not done:
        click.echo("no trial completed: no finalists to score, nothing to register", err=True)
        return None
    if study.user_attrs.get(final.SCORED_ATTR) == done:
        click.echo(f"study {study.study_name}: its finalists were already scored over these {done} trials", err=True)
        return None
    monitor = search.base.monitor
    if count:
        outcome = final.score(final.choose(study, count), search, folds)
        tracking.log_frame(outcome.table, "finalists.csv")
        mlflow.set_tag("finalists.verdict", outcome.verdict)
        final.echo(outcome)
        winner, row = outcome.winner, outcome.table.iloc[0]
        metric, _ = final.CV_METRIC[monitor]
        score, evidence = f"cv_{metric}_mean", {f"cv_{metric}_mean": round(float(row["mean"]), 6),
                                                f"cv_{metric}_std": round(float(row["std"]), 6), "folds": folds}
    else:  # no time to cross-validate, or trials ranked by folds with --finalists 0: the best, refit on the training part
        outcome, winner, refit = None, best_trial(study), "model"
        score, evidence = f"best_{monitor}", {f"best_{monitor}": round(float(winner.value), 6)}
    version = None
    if register_as:
        uri, run_id = final.refit(winner, search, outcome, refit)
        version = register_challenger(uri, register_as, alias, promote, score=score, tags={
            "study": study.study_name, "trial": winner.number, "run_id": run_id, "refit": refit,
            final.REFIT_OF: winner.user_attrs.get(RUN_ID_ATTR, ""), "monitor": monitor,
            "data_fingerprint": search.dataset.fingerprint(), "ranking": ranking.name, **evidence})
    study.set_user_attr(final.SCORED_ATTR, done)
    return version


def run(base: TrainConfig, sampler, space, n_trials, timeout, pruner, rungs, eta, pruner_startup_trials,
        pruner_warmup_epochs, study_name, storage, register_as, alias, promote, heartbeat, ensemble_top, finalists,
        folds, refit, budget, ranking, ranking_folds, experiment) -> None:
    """What `smids-ml tune` does once its flags are checked (`commands.tune`): the study, then its summary."""
    study, version = tune(base, space, sampler, n_trials or None, timeout or None, pruner, study_name or None,
                          storage or None, register_as or None, alias or None, experiment,
                          pruner_startup_trials, pruner_warmup_epochs, ensemble_top, promote, heartbeat,
                          finalists, folds, refit, rungs, eta, budget or None, ranking, ranking_folds)
    best = best_trial(study)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    click.echo(f"study {study.study_name}: {len(study.trials)} trials {states}")
    if best is not None:
        click.echo(f"best trial {best.number}: {base.monitor} {best.value:.4f} with {best.params}")
    if version is not None:
        click.echo(f"registered models:/{register_as}/{version.version} (@{CHALLENGER})")


from smids_ml.commands import tune as main  # noqa: E402  (`python -m smids_ml.tune`, the MLproject's entry)


if __name__ == "__main__":
    main()
