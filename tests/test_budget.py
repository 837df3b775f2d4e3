"""`tune --budget MINUTES`: the plan of trials, rungs, finalists and folds, from a measured training epoch."""

from __future__ import annotations

import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from smids_ml import SmidsError
from smids_ml import finalists as final
from smids_ml.budget import Plan, finalist_options, plan, plan_for, replan_finalists
from smids_ml.config import TrainConfig
from smids_ml.search import Search
from smids_ml.spaces import load_space
from smids_ml.studies import RUN_ID_ATTR, open_storage
from smids_ml.train import prepare_data
from smids_ml.tune import finalize
from tests.helpers import assert_one_line_error, invoke
from tests.test_tune import space_file, tune


def test_finalist_options_drop_folds_before_finalists():
    assert finalist_options(3, 5) == [(3, 5), (3, 3), (2, 5), (2, 3), (1, 5), (1, 3)]
    assert finalist_options(1, 2) == [(1, 2)]


def test_the_plan_keeps_half_the_budget_for_the_finalists_and_fills_the_rest_with_trials():
    # one full-length model: 60 s on a trial's split, 72 s on the training part
    roomy = plan_for(600, 60, 72, rungs=3, eta=3, finalists=3, folds=5, max_trials=None, started=0)
    assert (roomy.finalists, roomy.folds) == (3, 5)  # 4 * 5 * 57.6 s + 72 s = 20.4 min, under half of 600
    assert roomy.rungs == 3 and roomy.trials == 200  # (600 - 20.4) min at 20 s a trial: capped at 200
    tight = plan_for(10, 60, 72, rungs=3, eta=3, finalists=3, folds=5, max_trials=None, started=0)
    assert (tight.finalists, tight.folds) == (1, 3)  # the least thorough: 2 * 3 * 48 s + 72 s = 6 min
    assert tight.rungs == 3 and tight.trials == 12  # 4 min at 20 s a trial
    few = plan_for(10, 60, 72, rungs=3, eta=3, finalists=3, folds=5, max_trials=5, started=0)
    assert few.trials == 5
    short = plan_for(7.5, 60, 72, rungs=3, eta=3, finalists=1, folds=3, max_trials=None, started=0)
    assert (short.rungs, short.trials) == (1, 1)  # 90 s of search: too few trials for two or three rungs
    with pytest.raises(SmidsError, match="give at least 7 min"):
        plan_for(6.5, 60, 72, rungs=3, eta=3, finalists=1, folds=3, max_trials=None, started=0)


def test_the_plan_measures_this_machine(synth_data):
    cfg = TrainConfig(data=str(synth_data), image_size=32, batch=16, epochs=9, valid_frac=0.15, num_threads=1,
                      model="improved_cnn").validate()
    dataset = prepare_data(cfg)
    measured = plan(60, cfg, dataset, rungs=3, eta=3, finalists=2, folds=3, max_trials=7)
    assert 0 < measured.model_minutes < 5 and measured.trials == 7 and (measured.finalists, measured.folds) == (2, 3)
    assert 59 < measured.minutes_left() <= 60


def run_seconds(trial: optuna.trial.FrozenTrial) -> float:
    info = MlflowClient().get_run(trial.user_attrs[RUN_ID_ATTR]).info
    return (info.end_time - info.start_time) / 1000


def test_a_budget_plans_the_study_and_a_too_small_one_is_refused(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "budget", "fixed: {model: improved_cnn}\n"
                                           "params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n")
    storage = tmp_path / "optuna.journal"
    args = ["--sampler", "tpe", "--space", space, "--epochs", "3", "--study-name", "budget", "--register-as", "budget",
            "--finalists", "1", "--folds", "2"]
    result = tune(tracking, synth_data, storage, *args, "--budget", "30", "--n-trials", "3")
    assert "budget 30 min: one full-length model" in result.output and "up to 3 trials over 2 rung(s)" in result.output
    assert "min of the budget left" in result.output
    study = optuna.load_study(study_name="budget", storage=open_storage(str(storage)))
    assert len(study.trials) == 3
    parent = mlflow.search_runs(experiment_names=[tracking], filter_string="attributes.run_name = 'study-budget'",
                                output_format="list")[0]
    assert parent.data.tags["smids_ml.plan"].startswith("budget 30 min")
    assert MlflowClient().get_model_version_by_alias("budget", "champion").tags["score"] == "cv_test_f1_macro_mean"
    # at the end, the finalists are planned again from what the full-length trials took: none fit in no time
    chosen = final.choose(study, 1)
    spent = Plan(30, 0.1, 2, 3, 1, 2, 60, deadline=time.monotonic())
    assert replan_finalists(study, chosen, spent, 1.2) == (0, 2, False)
    assert replan_finalists(study, chosen, Plan(30, 0.1, 2, 3, 1, 2, 60, time.monotonic() + 600), 1.2) == (1, 2, True)
    took = max(run_seconds(t) for t in chosen) * 1.2  # the cross-validation of 1 finalist over 2 folds costs 3 of these
    assert replan_finalists(study, chosen, Plan(30, 0.1, 2, 3, 1, 2, 60, time.monotonic() + 2 * took), 1.2) \
        == (0, 2, True)
    # with time for one model but not for the finalists, the best trial is refit on the whole training part
    base = TrainConfig(data=str(synth_data), epochs=3, image_size=32, batch=16, num_threads=1, patience=0,
                       valid_frac=0.15)
    search = Search(base, load_space(space), prepare_data(base), rungs=2, halving=True)
    study.set_user_attr(final.SCORED_ATTR, None)  # as if the study's end had found no time for the finalists
    version = finalize(study, search, 0, 2, "ensemble", "budget", "champion", False)
    best = study.best_trial
    refit = MlflowClient().get_run(version.tags["run_id"])
    assert version.version == "2" and version.tags["score"] == "best_valid_f1" and version.tags["refit"] == "model"
    assert version.tags[final.REFIT_OF] == best.user_attrs[RUN_ID_ATTR] and version.tags["trial"] == str(best.number)
    assert refit.data.params["valid_frac"] == "0.0" and refit.data.params["lr"] == str(best.params["lr"])
    refused = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                      "--image-size", "32", "--num-threads", "1", "--sampler", "tpe", "--space", space,
                      "--study-name", "small", "--budget", "0.001"])
    assert_one_line_error(refused, "--budget 0.001 min cannot hold a search here", "give at least")
    assert "small" not in optuna.get_all_study_names(open_storage(str(storage)))


def test_the_plan_times_the_costliest_point_of_the_space_and_says_so(tracking, synth_data, tmp_path):
    from smids_ml.budget import costliest

    text = "params:\n  model: [simple_cnn, improved_cnn]\n  image_size: [32, 48]\n  lr: {low: 0.0005, high: 0.005}\n"
    point, basis = costliest(TrainConfig(image_size=32, channels=3, model="improved_cnn"), load_space(space_file(tmp_path, "c", text)))
    assert (point.model, point.image_size) == ("simple_cnn", 48)  # the more counted FLOPs of the two
    storage = tmp_path / "optuna.journal"
    result = tune(tracking, synth_data, storage, "--sampler", "tpe", "--space", space_file(tmp_path, "cost", text),
                  "--epochs", "1", "--pruner", "none", "--model", "improved_cnn", "--n-trials", "1",
                  "--study-name", "cost", "--register-as", "", "--budget", "5")
    assert ("here (the costliest point of the space: model=simple_cnn, image_size=48); up to 1 trials"
            in result.output), result.output
