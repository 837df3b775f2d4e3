"""Pins the two Optuna internals smids-ml uses (smids_ml/optuna_internals.py) against the installed Optuna: a
release that moves or changes either fails here, by name, before a user's tune does."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.pruners import SuccessiveHalvingPruner
from optuna.trial import TrialState

from smids_ml.optuna_internals import heartbeat, mark_rung_passed, rung_passed_key


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeats are, since Optuna 2.9
def test_heartbeat_keeps_an_asked_trial_alive_and_stops_with_the_block(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/study.db", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    with heartbeat(study, trial):
        time.sleep(3.5)  # past the grace period: without beats the trial would be stale
        optuna.storages.fail_stale_trials(study)
        assert study.trials[trial.number].state == TrialState.RUNNING
    time.sleep(3.5)  # the beats stopped with the block
    optuna.storages.fail_stale_trials(study)
    assert study.trials[trial.number].state == TrialState.FAIL


def test_a_rung_marked_passed_is_one_the_pruner_does_not_judge_again():
    study = optuna.create_study(direction="maximize", pruner=SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=2, min_early_stopping_rate=0))
    for value in (0.9, 0.8, 0.7, 0.6):  # better trials at rung 0 (step 1)
        trial = study.ask()
        trial.report(value, 1)
        trial.should_prune()
        study.tell(trial, value)
    weak = study.ask()
    weak.report(0.1, 1)
    assert weak.should_prune()  # judged at rung 0 against the others
    carried = study.ask()
    mark_rung_passed(carried, 0, 0.1)
    carried.report(0.1, 1)
    assert not carried.should_prune()  # rung 0 counts as passed: the next judgement is at rung 1 (step 2)
    assert study.trials[carried.number].system_attrs[rung_passed_key(0)] == 0.1
