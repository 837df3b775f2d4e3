"""The only two places smids-ml reaches into Optuna's internals, because Optuna offers no public route.

- Heartbeats under ask/tell: `study.optimize` beats a RUNNING trial's heartbeat so that another worker can tell
  a dead worker's trial from a slow one (`fail_stale_trials`); a study driven by `ask`/`tell`, as `search` is
  (it picks grid points itself and retries failed ones), has no public way to do the same.
- A rung passed, carried over: successive halving marks a trial that passed a rung with a system attribute;
  a trial that retries a failed one's params carries its rungs (`rungs.carry`) and must be marked the same way,
  or it would be promoted twice. Trials have no public setter for system attributes.

`tests/test_optuna_internals.py` pins both against the installed Optuna: a release that moves or renames either
fails there, in one named test, not in a user's tune.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> AbstractContextManager:
    """Beat `trial`'s heartbeat while the block runs (what `study.optimize` does); a no-op for storages without
    heartbeats (the journal file)."""
    return get_heartbeat_thread(trial._trial_id, study._storage)


def rung_passed_key(rung: int) -> str:
    """The system attribute SuccessiveHalvingPruner sets on a trial that passed `rung`
    (optuna/pruners/_successive_halving.py)."""
    return f"completed_rung_{rung}"


def mark_rung_passed(trial: optuna.Trial, rung: int, value: float) -> None:
    """Mark `trial` as promoted from `rung` with `value`, as the pruner itself would."""
    trial.study._storage.set_trial_system_attr(trial._trial_id, rung_passed_key(rung), value)

