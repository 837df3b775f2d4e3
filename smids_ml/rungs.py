"""Successive halving over rungs of complete, compressed schedules.

Judging a trial at epoch 3 of a 200-epoch one-cycle schedule favours what looks good early, not what ends best
(Wu et al. 2018): every learning rate is at a different point of its decay. Here a trial at rung r instead trains
a whole schedule over `epochs / eta**(rungs - 1 - r)` epochs (17, 52 and 155 of the defaults' 155), each rung
its own child run with its `budget` as a param, and only the best 1/eta of a rung's trials go on to the next.

Promotion is Optuna's own asynchronous successive halving (`SuccessiveHalvingPruner`, ASHA): a trial reports
its rung's score at step eta**r and is promoted when it ranks in the top 1/eta of the scores reported at that rung
so far, so any number of workers share the rungs through the study's storage, and optuna-dashboard shows each
trial's rungs as its intermediate values.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from smids_ml.config import DEFAULT_ETA
from smids_ml.optuna_internals import mark_rung_passed

RUNGS_ATTR = "smids_ml.rungs"  # trial attr: {rung: {"value", "run_id", "epochs"}} of the rungs it was promoted from
RUNG_TAG = "smids_ml.rung"  # child-run tag and trial attr: the rung a run trained (0 = the shortest schedule)
EPOCHS_ATTR = "smids_ml.epochs"  # trial attr: the epochs of its latest rung


def rung_epochs(epochs: int, eta: int, rungs: int) -> list[int]:
    """Each rung's schedule length, shortest first and the recipe's own last; rungs under one epoch, or no
    longer than the rung below, are left out (so `--epochs 1` is a plain trial)."""
    lengths = []
    for r in range(rungs):
        length = round(epochs / eta ** (rungs - 1 - r))
        if length >= 1 and (not lengths or length > lengths[-1]):
            lengths.append(length)
    return lengths


def step_of(rung: int, eta: int) -> int:
    """The step a rung reports at: SuccessiveHalvingPruner(min_resource=1) checks rung r at step eta**r."""
    return eta ** rung


class RungPruner(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's successive halving over rungs (one report per rung), with one change: a failed trial's rung
    scores do not compete, since the trial that retries its params carries them (`carry`)."""

    def __init__(self, eta: int = DEFAULT_ETA):
        super().__init__(min_resource=1, reduction_factor=eta, min_early_stopping_rate=0)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return super().prune(_WithoutFailed(study), trial)


class _WithoutFailed:
    """The study as RungPruner should see it: failed trials left out."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.state != TrialState.FAIL]


def carry(trial: optuna.Trial, eta: int) -> dict[int, dict]:
    """The rungs this trial takes over from a failed trial of the same params (set on it when it was queued):
    each is reported again and marked passed, the way the pruner marks a promotion, so the trial goes on at the
    rung where the failed one stopped and nobody is promoted twice."""
    carried = {int(r): record for r, record in trial.user_attrs.get(RUNGS_ATTR, {}).items()}
    for rung, record in sorted(carried.items()):
        trial.report(record["value"], step_of(rung, eta))
        mark_rung_passed(trial, rung, record["value"])
    return carried


def record(trial: optuna.Trial, rung: int, value: float, run_id: str, epochs: int) -> None:
    """Note a rung the trial was promoted from, for a retry to carry."""
    rungs = dict(trial.user_attrs.get(RUNGS_ATTR, {}))
    rungs[str(rung)] = {"value": value, "run_id": run_id, "epochs": epochs}
    trial.set_user_attr(RUNGS_ATTR, rungs)


def rungs_of_failed(study: optuna.Study, params: dict) -> dict:
    """The passed rungs of the latest failed trial that ran `params` (empty if none)."""
    for trial in reversed(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))):
        if trial.params == params and trial.user_attrs.get(RUNGS_ATTR):
            return trial.user_attrs[RUNGS_ATTR]
    return {}
