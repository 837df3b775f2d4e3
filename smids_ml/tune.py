"""Tune hyperparameters with Optuna; every trial is a nested MLflow run, the best model is registered.

    python -m smids_ml.tune --sampler grid --space improved-grid --epochs 50 --data data

The parent run holds the search (summary CSV, Optuna's figures, best params); each child run holds
one trial (params, per-epoch metrics, state). Only the study's best model is logged and registered.
Running the same --study-name again resumes the study: a grid runs only its missing points, and a
trial that failed or was interrupted is run again.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import hashlib
import itertools
import json
import os
import tempfile
import time
from contextlib import contextmanager
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import optuna
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from smids_ml import SmidsError, tracking
from smids_ml.config import TrainConfig, config_from_options, config_options
from smids_ml.console import stop_if_signalled, stops_cleanly
from smids_ml.data import Dataset
from smids_ml.models import build_for
from smids_ml.spaces import SPACES, grid_of, grid_size, load_space, point_outside, suggest
from smids_ml.train import DEFAULT_EXPERIMENT, prepare_data, run_training, use_experiment

JOURNAL = "optuna.journal"  # a journal file: safe for several workers on one machine
DEFAULT_TPE_TRIALS = 20
# Trials are ranked, pruned and early-stopped on validation, so tune carves one even where train's default does not.
TUNE_DEFAULTS = {"valid_frac": 0.15}
RUN_ID_ATTR = "mlflow_run_id"
CHALLENGER = "challenger"  # every study's newly registered best; --alias (champion) moves only when it wins
PARENT_ATTR = "mlflow_parent_run_id"
HEARTBEAT_SECONDS = 30
MAX_FAILURES = 2  # a grid point that failed twice is not tried again (a failure is retried once)
GRID_ATTR = "grid_point"  # the grid point a trial runs, set when it is created, before any value is suggested
DEFAULTS_ATTR = "smids_ml.defaults"  # the trial (and child-run tag) that runs the base configuration itself
WEIGHTS = "weights/weights.pt"  # a top trial's weights, in its run's artifacts: any worker can promote it

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported by `echo_trial`, without tracebacks
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_storage() -> str:
    """The journal file beside a SQLite tracking store (./mlflow.db by default), else in the working folder."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / JOURNAL)
    return JOURNAL


def open_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS):
    """Any Optuna storage URL (sqlite://, postgresql://, mysql://), or a journal file path.

    Database storages beat every `heartbeat` seconds: a worker that dies (kill -9, lost machine) has its
    trial failed after three missed beats, and the next point choice (`next_grid_point`) runs it again."""
    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat)
        except Exception as exc:  # SQLAlchemy and driver errors vary by backend
            raise SmidsError(f"cannot open Optuna storage {url}: {str(exc).splitlines()[0]}") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


@contextmanager
def study_lock(url: str, study_name: str):
    """One worker at a time, across processes (and machines, for PostgreSQL): the study's parent run,
    the choice of the next grid point and promotion happen under it.

    PostgreSQL: an advisory lock; a journal or SQLite file: an exclusive lock on a file beside it."""
    if url.startswith("postgresql"):
        import psycopg

        key = int.from_bytes(hashlib.blake2b(study_name.encode(), digest_size=8).digest(), "big", signed=True)
        conninfo = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
        try:
            connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise SmidsError(f"cannot reach Optuna storage {url}: {' '.join(str(exc).split())}") from None
        with connection:
            connection.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None if "://" in url else url
    if path is None:  # another database: its own transactions are all there is
        yield
        return
    with open(f"{path}.smids-lock", "a") as handle:  # not `.lock`: Optuna's journal lock takes that name
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PointSampler(optuna.samplers.RandomSampler):
    """A grid's sampler: each trial takes the grid point its worker chose for it under the study lock
    (`run_grid`), so several workers never run one point twice, which GridSampler cannot promise."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        point = trial.user_attrs.get(GRID_ATTR, {})
        if param_name in point:
            return point[param_name]
        return super().sample_independent(study, trial, param_name, param_distribution)


def make_sampler(name: str, space: dict, seed: int):
    """The study's sampler (grid: `PointSampler`, fed by `run_grid`)."""
    if name == "grid":
        grid_of(space)
        return PointSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, startup_trials: int, warmup_epochs: int, max_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


@dataclass
class Search:
    """What every trial shares: the base config, the space and the data."""

    base: TrainConfig
    space: dict
    dataset: Dataset
    keep: int = 1  # the best `keep` trials' weights go to the artifact store (the top-k ensemble)

    def objective(self, trial: optuna.Trial) -> float:
        cfg = self.base.replace(**suggest(trial, self.space)).validate()
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number),
                **({DEFAULTS_ATTR: "true"} if trial.user_attrs.get(DEFAULTS_ATTR) else {})}
        for key, value in tracking.process_tags().items():
            trial.set_user_attr(key, value)
        with mlflow.start_run(run_name=f"trial-{trial.number:03d}", nested=True, tags=tags) as run:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)

            def report(epoch: int, metrics: dict) -> None:
                trial.report(metrics[cfg.monitor], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{cfg.monitor} {metrics[cfg.monitor]:.4f} at epoch {epoch}")

            try:
                result = run_training(cfg, self.dataset, callbacks=[report], log_model=False)
            except optuna.TrialPruned:
                mlflow.set_tag("optuna.state", "PRUNED")
                pruned = True
            except BaseException:
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            else:
                pruned = False
                value = result.history.best[cfg.monitor]
                if self.among_best(trial.study, value):
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / Path(WEIGHTS).name
                        torch.save(result.network.state_dict(), path)
                        mlflow.log_artifact(str(path), str(Path(WEIGHTS).parent))
                mlflow.set_tag("optuna.state", "COMPLETE")
        if pruned:
            raise optuna.TrialPruned()
        return value

    def among_best(self, study: optuna.Study, value: float) -> bool:
        """Whether a trial scoring `value` is among the best `keep` completed so far (its weights are kept)."""
        ranked = ranked_trials(study)
        if len(ranked) < self.keep:
            return True
        last = ranked[self.keep - 1].value
        return value <= last if study.direction == optuna.study.StudyDirection.MINIMIZE else value >= last

    def config_of(self, trial: optuna.trial.FrozenTrial) -> TrainConfig:
        return self.base.replace(**{**self.space["fixed"], **trial.params}).validate()


def echo_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Callback: one line per finished trial."""
    value = "" if trial.value is None else f" {trial.value:.4f}"
    click.echo(f"trial {trial.number} {trial.state.name}{value} after {len(trial.intermediate_values)} epochs: "
               f"{trial.params}", err=True)


def _best_trial(study: optuna.Study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)


def check_same_space(study: optuna.Study, space: dict) -> None:
    """Optuna cannot change a parameter's choices within a study: say so before any trial starts."""
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            spec = space["params"].get(name)
            if isinstance(distribution, optuna.distributions.CategoricalDistribution) and isinstance(spec, list) \
                    and list(distribution.choices) != spec:
                raise SmidsError(f"study {study.study_name} searched {name} over {list(distribution.choices)}, "
                                 f"not {spec}; use a new --study-name for a different search space")


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark FAIL the RUNNING trials whose worker is gone, and end their runs FAILED, so their points run
    again. Gone: on this machine, no such process (kill -9; any storage, the journal file included);
    on a database storage, also three missed heartbeats (Optuna's own check, any machine)."""
    with warnings.catch_warnings():  # a no-op for storages without heartbeats
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = 0
    client = MlflowClient()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if tracking.process_is_gone(attrs.get(tracking.HOST_TAG), attrs.get(tracking.PID_TAG)):
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            failed += 1
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and _run_exists(run_id) and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, "FAILED")
    if failed:
        click.echo(f"study {study.study_name}: {failed} trial(s) of a worker that is gone marked FAIL", err=True)
    return failed


def next_grid_point(study: optuna.Study, space: dict) -> tuple[dict | None, bool]:
    """(the params of a grid point nobody has run or is running, or None; whether any point is still
    running). A point that failed once is run again; twice, it is left. Reads the storage itself, not a
    worker's cache, since other workers write to it."""
    grid = grid_of(space)
    names = list(grid)
    status: dict[tuple, list] = {values: [] for values in itertools.product(*grid.values())}
    storage = study._storage
    if isinstance(storage, optuna.storages._CachedStorage):  # Optuna's cache in front of a database
        storage = storage._backend
    for trial in storage.get_all_trials(study._study_id, deepcopy=False):
        point = {**trial.user_attrs.get(GRID_ATTR, {}), **trial.params}
        key = tuple(point.get(n) for n in names)
        if key in status:
            status[key].append(trial.state)
    busy = any(state == TrialState.RUNNING for states in status.values() for state in states)
    for values, states in status.items():
        if all(state == TrialState.FAIL for state in states) and len(states) < MAX_FAILURES:
            return dict(zip(names, values)), busy
    return None, busy


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
    # Optuna's own heartbeat thread (what optimize uses); a no-op for storages without heartbeats
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = search.objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
        finally:
            gc.collect()
    echo_trial(study, study._storage.get_trial(trial._trial_id))


def enqueue_defaults(study: optuna.Study, space: dict, base: TrainConfig) -> bool:
    """A new TPE or random study runs the base configuration first (the defaults, or what the flags set), tagged
    `smids_ml.defaults`, so whatever wins is measured against it on the same footing. Not when the base is not a
    point of the space (said in one line); a grid keeps its own points."""
    if study.get_trials(deepcopy=False):
        return False
    point = {name: getattr(base.replace(**space["fixed"]), name) for name in space["params"]}
    outside = point_outside(space, point)
    if outside:
        click.echo(f"study {study.study_name}: no defaults trial, the base configuration is not in the search space "
                   f"({', '.join(outside)})", err=True)
        return False
    study.enqueue_trial(point, user_attrs={DEFAULTS_ATTR: True})
    return True


def retry_failed(study: optuna.Study) -> int:
    """Queue again each failed trial whose params never completed (TPE, random), so resume covers them."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)
    covered = [t.params for t in study.get_trials(deepcopy=False, states=finished)]
    queued = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.params and trial.params not in covered:
            study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items() if k == DEFAULTS_ATTR},
                                skip_if_exists=False)
            covered.append(trial.params)
            queued += 1
    return queued


def summary(study: optuna.Study, monitor: str) -> pd.DataFrame:
    """One row per trial, best first (the shape of the original study's grid_search_results.csv)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({**t.params, monitor: t.value, "state": t.state.name, "trial": t.number,
                     "run_name": f"trial-{t.number:03d}", "epochs": len(t.intermediate_values),
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
            axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances with one varying param
            click.echo(f"skipped figure {name}: {exc}", err=True)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(10, 6)
        tracking.log_figure(figure, f"plots/{name}.png")
    best = _best_trial(study)
    counts = {state.name.lower(): sum(t.state == state for t in study.trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    if best is not None:
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
        mlflow.log_metric(f"best_{monitor}", best.value)


def promote_best(study: optuna.Study, search: Search, register_as: str, alias: str | None, promote: bool = False):
    """Log the best trial's model on its own child run and register it as @challenger (once per best
    trial); move `alias` (@champion) to it only as `champion_decision` says.

    With `search.keep` > 1 the model is the ensemble of the best `keep` trials that share the best
    trial's input preprocessing (one model, the mean of their probabilities).
    """
    best = _best_trial(study)
    if best is None:
        click.echo("no trial completed: nothing to register", err=True)
        return None
    run_id = best.user_attrs[RUN_ID_ATTR]
    client = MlflowClient()
    if client.get_run(run_id).data.tags.get("smids_ml.model_uri"):
        click.echo(f"best trial {best.number} is already registered", err=True)
        return None
    shape = lambda cfg: tuple(getattr(cfg, f) for f in tracking.INPUT_FIELDS)  # noqa: E731
    members, chosen = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in ranked_trials(study):
            cfg = search.config_of(trial)
            if len(chosen) == search.keep or shape(cfg) != shape(search.config_of(best)):
                continue
            try:
                path = mlflow.artifacts.download_artifacts(run_id=trial.user_attrs[RUN_ID_ATTR], artifact_path=WEIGHTS,
                                                           dst_path=f"{tmp}/{trial.number}")
            except (MlflowException, OSError):  # a trial that was never among the best kept no weights
                continue
            network = build_for(cfg, len(search.dataset.classes))
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            members.append((network, cfg))
            chosen.append(trial)
    if best not in chosen:
        raise SmidsError(f"the weights of best trial {best.number} are not in its run's artifacts ({WEIGHTS}); "
                         "rerun that trial to register it")
    if len(chosen) < search.keep:
        click.echo(f"ensemble of {len(chosen)} trials, not {search.keep}: only these completed with the best "
                   "trial's input size and colour mode and kept their weights", err=True)
    with mlflow.start_run(run_id=run_id, nested=True):
        info = tracking.log_model(members, search.dataset)
        mlflow.set_tag("smids_ml.model_uri", info.model_uri)
    run = client.get_run(run_id)
    version = tracking.register(info.model_uri, register_as, CHALLENGER, tags={
        "study": study.study_name, "trial": best.number, "run_id": run_id,
        "members": ",".join(str(t.number) for t in chosen), "monitor": search.base.monitor,
        "data_fingerprint": run.data.params.get("data_fingerprint", ""),
        **{k: round(v, 6) for k, v in run.data.metrics.items() if k.startswith("best_valid_")}})
    if alias:
        move, why = champion_decision(client, register_as, alias, version, promote)
        if move:
            client.set_registered_model_alias(register_as, alias, version.version)
        click.echo(f"@{alias} {'moves to' if move else 'stays on'} version "
                   f"{version.version if move else client.get_model_version_by_alias(register_as, alias).version}: {why}",
                   err=True)
    return version


def champion_decision(client: MlflowClient, name: str, alias: str, challenger, promote: bool) -> tuple[bool, str]:
    """Whether `alias` should move to the challenger, and why: when nothing holds it yet, when the user
    says --promote, or when the challenger's validation metric beats the champion's on the same data."""
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"{name} had no @{alias} yet"
    if promote:
        return True, "--promote"
    metric = f"best_{challenger.tags['monitor']}"
    theirs, ours = champion.tags.get(metric), challenger.tags.get(metric)
    if champion.tags.get("data_fingerprint") != challenger.tags["data_fingerprint"] or theirs is None or ours is None:
        return False, (f"version {champion.version} was validated on other data or another metric, so the two "
                       f"cannot be compared; pass --promote to move @{alias} anyway")
    better = float(ours) < float(theirs) if metric.endswith("loss") else float(ours) > float(theirs)
    verdict = "beats" if better else "does not beat"
    return better, (f"the challenger's {metric} {float(ours):.4f} {verdict} version {champion.version}'s "
                    f"{float(theirs):.4f} on the same data")


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
        resume = parent if parent and _run_exists(parent) else None
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


def _run_exists(run_id: str) -> bool:
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


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
    best = _best_trial(study)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    click.echo(f"study {study.study_name}: {len(study.trials)} trials {states}")
    if best is not None:
        click.echo(f"best trial {best.number}: {base.monitor} {best.value:.4f} with {best.params}")
    if version is not None:
        click.echo(f"registered models:/{register_as}/{version.version} (@{CHALLENGER})")


if __name__ == "__main__":
    main()
