"""Study coordination: Optuna storages, the cross-worker study lock, samplers and pruners, and the bookkeeping
of trials in the storage (stale workers, grid points, retries, the defaults trial) that lets any number of
workers share one study.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from smids_ml import SmidsError, tracking
from smids_ml.config import DEFAULT_ETA, HEARTBEAT_SECONDS, JOURNAL, TrainConfig
from smids_ml.rungs import RUNGS_ATTR, RungPruner
from smids_ml.spaces import ADDED_LATER, base_value, configure, grid_of, point_outside

RUN_ID_ATTR = "mlflow_run_id"
MAX_FAILURES = 2  # a grid point that failed twice is not tried again (a failure is retried once)
GRID_ATTR = "grid_point"  # the grid point a trial runs, set when it is created, before any value is suggested
DEFAULTS_ATTR = "smids_ml.defaults"  # the trial (and child-run tag) that runs the base configuration itself

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported by `search.echo_trial`, without tracebacks
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


def make_pruner(name: str, startup_trials: int, warmup_epochs: int, max_epochs: int, eta: int = DEFAULT_ETA):
    """halving: successive halving over rungs (`rungs`); median and hyperband judge the epochs of one training."""
    if name == "halving":
        return RungPruner(eta)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def best_trial(study: optuna.Study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)


def check_same_space(study: optuna.Study, space: dict) -> dict:
    """A study keeps its space: another set of searched parameters would mix trials of two searches, and Optuna
    cannot change a parameter's choices within a study. Say so before any trial starts. Returns the space to run:
    a param added to the named spaces later (ADDED_LATER) that the study never searched is left out, in one line,
    so a study from before it resumes."""
    searched = {name for trial in study.get_trials(deepcopy=False) for name in trial.distributions}
    late = sorted((set(space["params"]) - searched) & ADDED_LATER) if searched else []
    if late:
        click.echo(f"study {study.study_name} searched without {', '.join(late)}: left out of its search", err=True)
        space = {**space, "params": {k: v for k, v in space["params"].items() if k not in late}}
    if searched and searched != set(space["params"]):
        added, dropped = sorted(set(space["params"]) - searched), sorted(searched - set(space["params"]))
        raise SmidsError(f"study {study.study_name} searched {', '.join(sorted(searched))}; this space "
                         + "; ".join(([f"adds {', '.join(added)}"] if added else [])
                                     + ([f"drops {', '.join(dropped)}"] if dropped else []))
                         + "; use a new --study-name for a different search space")
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            spec = space["params"].get(name)
            if isinstance(distribution, optuna.distributions.CategoricalDistribution) and isinstance(spec, list) \
                    and list(distribution.choices) != spec:
                raise SmidsError(f"study {study.study_name} searched {name} over {list(distribution.choices)}, "
                                 f"not {spec}; use a new --study-name for a different search space")
    return space


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
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and run_exists(run_id) and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, "FAILED")
    if failed:
        click.echo(f"study {study.study_name}: {failed} trial(s) of a worker that is gone marked FAIL", err=True)
    return failed


def next_grid_point(study: optuna.Study, space: dict) -> tuple[dict | None, bool]:
    """(the params of a grid point nobody has run or is running, or None; whether any point is still
    running). A point that failed once is run again; twice, it is left. Other workers write to the
    same storage: `get_trials` reads their new and unfinished trials afresh (Optuna's cache keeps finished ones)."""
    grid = grid_of(space)
    names = list(grid)
    status: dict[tuple, list] = {values: [] for values in itertools.product(*grid.values())}
    for trial in study.get_trials(deepcopy=False):
        point = {**trial.user_attrs.get(GRID_ATTR, {}), **trial.params}
        key = tuple(point.get(n) for n in names)
        if key in status:
            status[key].append(trial.state)
    busy = any(state == TrialState.RUNNING for states in status.values() for state in states)
    for values, states in status.items():
        if all(state == TrialState.FAIL for state in states) and len(states) < MAX_FAILURES:
            return dict(zip(names, values)), busy
    return None, busy


def enqueue_defaults(study: optuna.Study, space: dict, base: TrainConfig) -> bool:
    """A new TPE or random study runs the base configuration first (the defaults, or what the flags set), tagged
    `smids_ml.defaults`, so whatever wins is measured against it on the same footing. Not when the base is not a
    point of the space (said in one line); a grid keeps its own points."""
    if study.get_trials(deepcopy=False):
        return False
    point = {name: base_value(configure(base, space["fixed"]), name) for name in space["params"]}
    outside = point_outside(space, point)
    if outside:
        click.echo(f"study {study.study_name}: no defaults trial, the base configuration is not in the search space "
                   f"({', '.join(outside)})", err=True)
        return False
    study.enqueue_trial(point, user_attrs={DEFAULTS_ATTR: True})
    return True


def retry_failed(study: optuna.Study) -> int:
    """Queue again each failed trial whose params never completed (TPE, random), so resume covers them; the retry
    carries the rungs the failed trial was promoted from."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)
    covered = [t.params for t in study.get_trials(deepcopy=False, states=finished)]
    queued = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.params and trial.params not in covered:
            carried = {k: v for k, v in trial.user_attrs.items() if k in (DEFAULTS_ATTR, RUNGS_ATTR)}
            study.enqueue_trial(trial.params, user_attrs=carried, skip_if_exists=False)
            covered.append(trial.params)
            queued += 1
    return queued


def run_exists(run_id: str) -> bool:
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False

