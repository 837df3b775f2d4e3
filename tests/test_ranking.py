"""Small-data tuning: trials ranked by k-fold cross-validation of the training part, and training length searched."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from smids_ml.budget import costliest
from smids_ml.config import TrainConfig
from smids_ml.spaces import SPACES, configure, load_space
from smids_ml.studies import check_same_space, enqueue_defaults


def test_training_length_is_a_multiple_of_the_recipes_epochs_and_the_defaults_are_one():
    base = TrainConfig(epochs=300, image_size=32, channels=3)
    assert configure(base, {"epochs_scale": 0.5, "lr": 0.001}).epochs == 150
    assert configure(TrainConfig(epochs=1), {"epochs_scale": 0.5}).epochs == 1
    broad = load_space("broad")
    assert "epochs_scale" in broad["params"]
    assert all("epochs_scale" not in SPACES[grid]["params"] for grid in ("initial-grid", "improved-grid"))
    study = optuna.create_study()
    assert enqueue_defaults(study, {"fixed": {}, "params": {"epochs_scale": broad["params"]["epochs_scale"]}}, base)
    assert study.get_trials(states=(TrialState.WAITING,))[0].system_attrs["fixed_params"] == {"epochs_scale": 1.0}
    point, basis = costliest(base, {"fixed": {}, "params": {"epochs_scale": {"low": 0.5, "high": 2.0}}})
    assert point.epochs == 600 and basis.endswith("epochs=600")


def test_a_study_from_before_training_length_was_searched_resumes_without_it():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2), n_trials=1)
    space = {"fixed": {}, "params": {"lr": {"low": 1e-4, "high": 1e-2}, "epochs_scale": {"low": 0.5, "high": 2.0}}}
    assert check_same_space(study, space)["params"] == {"lr": {"low": 1e-4, "high": 1e-2}}
    fresh = optuna.create_study()
    assert check_same_space(fresh, space) == space
