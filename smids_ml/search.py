"""The search itself: the objective (one trial = one nested MLflow run of `train.run_training`), running
trials and grid points, and the study's summary and figures on its parent run.
"""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from smids_ml import tracking
from smids_ml.config import DEFAULT_ETA, TrainConfig
from smids_ml.console import stop_if_signalled
from smids_ml.data import Dataset
from smids_ml.engine import Diverged
from smids_ml.optuna_internals import heartbeat
from smids_ml.rungs import (EPOCHS_ATTR, RUNG_TAG, RUNGS_ATTR, carry, record, rung_epochs,
                            rungs_of_failed, step_of)
from smids_ml.spaces import configure, suggest
from smids_ml.studies import (DEFAULTS_ATTR, GRID_ATTR, RUN_ID_ATTR, best_trial, fail_stale_trials, next_grid_point,
                              ranked_trials)
from smids_ml.train import run_training

WEIGHTS = "weights/weights.pt"  # a top trial's weights, in its run's artifacts: any worker can promote it


@dataclass
class Search:
    """What every trial shares: the base config, the space, the data and how trials are ranked."""

    base: TrainConfig
    space: dict
    dataset: Dataset
    keep: int = 1  # the best `keep` trials' weights go to the artifact store (the top-k ensemble)
    rungs: int = 1  # successive halving over this many rungs (as `rung_epochs` makes them from the epochs)
    halving: bool = False  # rungs are judged, not epochs (so one rung is a plain trial, never pruned)
    eta: int = DEFAULT_ETA
    plan: object = None  # a budget.Plan: progress lines say the budget left
    folds: list = field(default_factory=list)  # ranking by folds: the training part once per fold (`ranking`)

    def objective(self, trial: optuna.Trial) -> float:
        """One trial: a single training (pruned by epoch), or with `rungs` > 1 one complete, compressed
        schedule per rung until the pruner stops it or the last rung, at the recipe's length, gives its value."""
        cfg = configure(self.base, suggest(trial, self.space))
        for key, value in tracking.process_tags().items():
            trial.set_user_attr(key, value)
        lengths = rung_epochs(cfg.epochs, self.eta, self.rungs)
        if len(lengths) == 1:
            trial.set_user_attr(EPOCHS_ATTR, cfg.epochs)  # what its line says when no epoch is reported
            return self.train(trial, cfg, report_epochs=not self.halving)
        carried = carry(trial, self.eta)
        for rung, epochs in enumerate(lengths):
            if rung in carried:
                continue
            last = rung == len(lengths) - 1
            trial.set_user_attr(RUNG_TAG, rung)
            trial.set_user_attr(EPOCHS_ATTR, epochs)
            budget = {"rung": rung, "budget": round(epochs / cfg.epochs, 4)}
            left = f", ~{self.plan.minutes_left():.0f} min of the budget left" if self.plan else ""
            click.echo(f"trial {trial.number}: rung {rung} ({epochs} of {cfg.epochs} epochs){left}", err=True)
            value = self.train(trial, cfg.replace(epochs=epochs), budget=budget, keep=last)
            trial.report(value, step_of(rung, self.eta))  # the top rung's too: optuna-dashboard plots every rung
            if last:
                return value
            run_id = trial.user_attrs[RUN_ID_ATTR]
            if trial.should_prune():
                MlflowClient().set_tag(run_id, "optuna.state", "PRUNED")
                raise optuna.TrialPruned(f"{cfg.monitor} {value:.4f} at rung {rung} ({epochs} epochs)")
            MlflowClient().set_tag(run_id, "optuna.state", "PROMOTED")
            record(trial, rung, value, run_id, epochs)
            click.echo(f"trial {trial.number}: rung {rung} {cfg.monitor} {value:.4f}, promoted", err=True)
        raise AssertionError("unreachable: the last rung returns")

    def train(self, trial: optuna.Trial, cfg: TrainConfig, report_epochs: bool = False, budget: dict | None = None,
              keep: bool = True) -> float:
        """One nested run: score `cfg` (`score`) and return its value; with `report_epochs` each epoch is
        reported to the pruner. The run's id is the trial's `mlflow_run_id` (its latest rung's, with rungs)."""
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number),
                **({DEFAULTS_ATTR: "true"} if trial.user_attrs.get(DEFAULTS_ATTR) else {}),
                **({RUNG_TAG: str(budget["rung"])} if budget else {})}
        name = f"trial-{trial.number:03d}" + (f" rung {budget['rung']} ({cfg.epochs} epochs)" if budget else "")
        with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            if budget:
                mlflow.log_params(budget)

            def report(epoch: int, metrics: dict) -> None:
                trial.report(metrics[cfg.monitor], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{cfg.monitor} {metrics[cfg.monitor]:.4f} at epoch {epoch}")

            try:
                fold_tags = {DEFAULTS_ATTR: tags[DEFAULTS_ATTR]} if DEFAULTS_ATTR in tags else {}
                value, network = self.score(cfg, [report] if report_epochs else [], fold_tags)
            except optuna.TrialPruned as pruned:
                mlflow.set_tag("optuna.state", "PRUNED")
                stopped = pruned  # raised once the run has ended FINISHED: a pruned run keeps its metrics
            except Diverged as diverged:  # a point of the space that cannot train: pruned, so no retry repeats it
                mlflow.set_tag("optuna.state", "PRUNED")
                click.echo(f"trial {trial.number}: {diverged}", err=True)
                stopped = optuna.TrialPruned(str(diverged))
            except BaseException:
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            else:
                stopped = None
                if keep and network is not None and self.among_best(trial.study, value):
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / Path(WEIGHTS).name
                        torch.save(network.state_dict(), path)
                        mlflow.log_artifact(str(path), str(Path(WEIGHTS).parent))
                mlflow.set_tag("optuna.state", "COMPLETE")
        if stopped:
            raise stopped
        return value

    def score(self, cfg: TrainConfig, callbacks: list,
              fold_tags: dict | None = None) -> tuple[float, torch.nn.Module | None]:
        """In the trial's run: its value and the network to keep. Ranked on the split, one training. Ranked by folds,
        one nested run per fold (tagged with `fold_tags`: the defaults trial's mark, so a search for its runs finds
        its folds' curves too; a fold is not a trial, so not `optuna.trial`) and the mean of their best metrics,
        `fold_K_<monitor>` for each (no one network to keep); only the first fold reports its epochs to the pruner:
        every trial's first fold is the same, so an epoch pruner compares like with like, at a fraction of a trial's
        cost."""
        if not self.folds:
            result = run_training(cfg, self.dataset, callbacks=callbacks, log_model=False)
            return result.history.best[cfg.monitor], result.network
        tracking.log_new_params({**tracking.config_params(cfg),
                                 "ranking_folds": len(self.folds)})
        mlflow.set_tags(tracking.process_tags())
        best = []
        for k, part in enumerate(self.folds):
            with mlflow.start_run(run_name=f"fold {k + 1}/{len(self.folds)}", nested=True,
                                  tags={**(fold_tags or {}), "fold": str(k)}):
                try:
                    result = run_training(cfg, part, callbacks=callbacks if k == 0 else [], log_model=False)
                except (optuna.TrialPruned, Diverged) as exc:  # the fold's run ends FINISHED, as a pruned trial's
                    stopped = exc
                else:
                    stopped = None
            if stopped:
                raise stopped
            best.append(result.history.best)
            mlflow.log_metric(f"fold_{k + 1}_{cfg.monitor}", best[-1][cfg.monitor])
        means = {f"best_{name}": float(np.mean([b[name] for b in best])) for name in best[0]}
        mlflow.log_metrics(means)
        return means[f"best_{cfg.monitor}"], None

    def among_best(self, study: optuna.Study, value: float) -> bool:
        """Whether a trial scoring `value` is among the best `keep` completed so far (its weights are kept)."""
        ranked = ranked_trials(study)
        if len(ranked) < self.keep:
            return True
        last = ranked[self.keep - 1].value
        return value <= last if study.direction == optuna.study.StudyDirection.MINIMIZE else value >= last

    def config_of(self, trial: optuna.trial.FrozenTrial) -> TrainConfig:
        return configure(self.base, {**self.space["fixed"], **trial.params})


def echo_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Callback: one line per finished trial."""
    value = "" if trial.value is None else f" {trial.value:.4f}"
    rung = trial.user_attrs.get(RUNG_TAG)
    where = (f"at rung {rung} ({trial.user_attrs.get(EPOCHS_ATTR)} epochs)" if rung is not None
             else f"after {len(trial.intermediate_values) or trial.user_attrs.get(EPOCHS_ATTR, 0)} epochs")
    click.echo(f"trial {trial.number} {trial.state.name}{value} {where}: {trial.params}", err=True)


def run_grid(study: optuna.Study, search: Search, lock, poll: float, n_trials: int | None = None,
             timeout: float | None = None) -> int:
    """Run grid points until none is left, with any number of workers on the same study: under the lock a
    worker picks a point that nobody has run or is running and creates its trial, so each point runs
    exactly once (a failed one twice). A worker waits while others still run points (a dead one's point
    comes back). Stops after `n_trials` trials or `timeout` seconds of this worker, if given; returns how
    many it ran."""
    ran, deadline = 0, time.monotonic() + timeout if timeout else float("inf")
    while (n_trials is None or ran < n_trials) and time.monotonic() < deadline:
        with lock():
            fail_stale_trials(study)
            point, busy = next_grid_point(study, search.space)
            if point is not None:
                trial = study.ask()
                trial.set_user_attr(GRID_ATTR, point)
                carried = rungs_of_failed(study, point)
                if carried:
                    trial.set_user_attr(RUNGS_ATTR, carried)
        if point is None:
            if not busy:
                return ran
            time.sleep(poll)
            continue
        run_trial(study, search, trial)
        ran += 1
    return ran


def run_trial(study: optuna.Study, search: Search, trial: optuna.Trial) -> None:
    """What `study.optimize` does for one asked trial: heartbeats while it runs, then tell the outcome."""
    with heartbeat(study, trial):
        try:
            value = search.objective(trial)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            frozen = study.tell(trial, value)
        finally:
            gc.collect()
    echo_trial(study, frozen)


def summary(study: optuna.Study, monitor: str) -> pd.DataFrame:
    """One row per trial, best first (the shape of the original study's grid_search_results.csv)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({**t.params, monitor: t.value, "state": t.state.name, "trial": t.number,
                     "run_name": f"trial-{t.number:03d}", "rung": t.user_attrs.get(RUNG_TAG),
                     "epochs": t.user_attrs.get(EPOCHS_ATTR, len(t.intermediate_values)),
                     "seconds": t.duration.total_seconds() if t.duration else None,
                     "defaults": bool(t.user_attrs.get(DEFAULTS_ATTR)), "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(monitor, ascending=monitor == "valid_loss", na_position="last").reset_index(drop=True)


def log_study(study: optuna.Study, monitor: str) -> None:
    """Summary CSV, Optuna's own matplotlib figures and the best params on the parent run."""
    tracking.log_frame(summary(study, monitor), "study_summary.csv")
    from optuna.visualization import matplotlib as ov

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures = {"optimization_history": ov.plot_optimization_history, "parallel_coordinate": ov.plot_parallel_coordinate,
               "intermediate_values": ov.plot_intermediate_values}
    if len(complete) >= 2:
        figures["param_importances"] = ov.plot_param_importances
    for name, plot in figures.items():
        stop_if_signalled()  # an interrupted study exits now; the next run of it draws the figures
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # a stable API for years
                warnings.filterwarnings("ignore", "Attempting to set identical")  # a param that took one value
                warnings.filterwarnings("ignore", "Target and region quantiles")  # few trials: importances are rough
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of alike trials
            click.echo(f"skipped figure {name}: {exc}", err=True)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(10, 6)
        tracking.log_figure(figure, f"plots/{name}.png")
    best = best_trial(study)
    counts = {state.name.lower(): sum(t.state == state for t in study.trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    if best is not None:
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
        mlflow.log_metric(f"best_{monitor}", best.value)

