"""Small-data tuning: trials ranked by k-fold cross-validation of the training part, and training length searched."""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from smids_ml.budget import costliest, plan
from smids_ml.config import TrainConfig
from smids_ml.ranking import MIN_VALID_CROPS, choose_ranking, fold_parts
from smids_ml.spaces import SPACES, configure, load_space
from smids_ml.studies import check_same_space, enqueue_defaults, open_storage
from smids_ml.train import prepare_data
from tests.helpers import assert_one_line_error, invoke
from tests.test_tune import children, space_file

SMALL = ["--image-size", "32", "--batch", "16", "--num-threads", "1", "--patience", "0"]


def test_auto_ranks_by_folds_below_the_threshold_and_on_the_split_from_it():
    small = choose_ranking("auto", 32, 3)
    assert small.folds == 3 and small.line() == ("ranking trials by 3-fold cross-validation of the training part: "
                                                 "the validation part would hold 32 crops (< 150)")
    large = choose_ranking("auto", MIN_VALID_CROPS, 3)
    assert large.folds == 0 and large.line() == "ranking trials on the validation part: it holds 150 crops (≥ 150)"
    assert choose_ranking("split", 32, 3).folds == 0
    forced = choose_ranking("folds", 400, 4)
    assert forced.folds == 4 and forced.reason.endswith("(--ranking folds)")


def test_the_folds_cover_the_training_part_once_the_same_for_every_trial(synth_data):
    dataset = prepare_data(TrainConfig(data=str(synth_data), valid_frac=0.15))
    parts = fold_parts(dataset, 3, 42)
    training = set(dataset.manifest.loc[dataset.manifest["split"] != "test", "path"])
    validated = [set(p.part("valid")["path"]) for p in parts]
    assert set().union(*validated) == training and sum(map(len, validated)) == len(training)  # each crop once
    assert all(set(p.manifest["path"]) == training and set(p.manifest["split"]) == {"train", "valid"} for p in parts)
    assert [set(p.part("valid")["path"]) for p in fold_parts(dataset, 3, 42)] == validated  # seeded


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


def test_the_plan_counts_a_trial_ranked_by_folds_as_its_fold_models_and_says_why(synth_data):
    cfg = TrainConfig(data=str(synth_data), image_size=32, batch=16, epochs=3, valid_frac=0.15, num_threads=1,
                      model="improved_cnn").validate()
    dataset = prepare_data(cfg)
    ranking = choose_ranking("auto", len(dataset.part("valid")), 3)
    line = plan(60, cfg, dataset, rungs=1, eta=3, finalists=1, folds=3, max_trials=2, ranking=ranking).line()
    assert "one full-length trial (3 fold models)" in line and line.endswith(ranking.line()), line


def test_a_small_data_tune_is_ranked_by_folds_and_its_best_trial_refit_and_registered(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "small", "fixed: {model: improved_cnn}\n"
                                          "params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n")
    storage = tmp_path / "optuna.journal"
    args = ["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage), *SMALL,
            "--sampler", "tpe", "--space", space, "--study-name", "small", "--epochs", "2", "--n-trials", "2",
            "--pruner", "median", "--ranking-folds", "2", "--finalists", "0", "--register-as", "small"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    valid = len(prepare_data(TrainConfig(data=str(synth_data), valid_frac=0.15)).part("valid"))
    line = (f"ranking trials by 2-fold cross-validation of the training part: the validation part would hold {valid} "
            f"crops (< {MIN_VALID_CROPS})")
    assert line in result.output
    study = optuna.load_study(study_name="small", storage=open_storage(str(storage)))
    parent = mlflow.search_runs(experiment_names=[tracking], filter_string="attributes.run_name = 'study-small'",
                                output_format="list")[0]
    assert parent.data.params["ranking"] == "folds" and parent.data.params["ranking_folds"] == "2"
    assert parent.data.tags["smids_ml.ranking"] == line
    client, sizes = MlflowClient(), set()
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE and len(trial.intermediate_values) == 2  # fold 1's epochs, pruner
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        folds = [run.data.metrics[f"fold_{k}_valid_f1"] for k in (1, 2)]
        assert run.data.metrics["best_valid_f1"] == pytest.approx(np.mean(folds)) == pytest.approx(trial.value)
        fold_runs = children(run.info.run_id)
        assert len(fold_runs) == 2 and set(fold_runs["tags.fold"]) == {"0", "1"}
        sizes.add(tuple(sorted(fold_runs["params.n_valid"])))
    assert len(sizes) == 1  # the same folds for every trial
    assert len(children(parent.info.run_id)) == 3  # the two trials and the refit
    version = client.get_model_version_by_alias("small", "champion")
    assert version.tags["ranking"] == "2-fold" and version.tags["refit"] == "model"
    assert version.tags["trial"] == str(study.best_trial.number)
    assert float(version.tags["best_valid_f1"]) == pytest.approx(study.best_value, abs=1e-6)
    again = invoke([*args, "--ranking", "split"])
    assert_one_line_error(again, "study small ranked its trials by 2-fold cross-validation", "--ranking-folds 2")
    assert len(optuna.load_study(study_name="small", storage=open_storage(str(storage))).trials) == 2


def test_successive_halving_scores_every_rung_by_folds(tracking, synth_data, tmp_path):
    storage = tmp_path / "optuna.journal"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage), *SMALL,
                     "--sampler", "grid", "--space", space_file(tmp_path, "rungs", "params:\n  lr: [0.002]\n"),
                     "--study-name", "rungs", "--epochs", "3", "--rungs", "2", "--ranking", "folds",
                     "--ranking-folds", "2", "--model", "improved_cnn", "--finalists", "0", "--register-as", ""])
    assert result.exit_code == 0, result.output
    [trial] = optuna.load_study(study_name="rungs", storage=open_storage(str(storage))).trials
    assert trial.state == TrialState.COMPLETE
    rungs = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.`optuna.trial` = '0'",
                               order_by=["params.rung"])
    assert list(rungs["params.rung"]) == ["0", "1"] and rungs["metrics.fold_2_valid_f1"].notna().all()
    assert trial.value == pytest.approx(rungs.iloc[-1]["metrics.best_valid_f1"])


@pytest.mark.parametrize("flags, fragments", [
    (["--ranking-folds", "1"], ["Invalid value for '--ranking-folds'"]),
    (["--ranking", "folds", "--ranking-folds", "12"], ["--ranking-folds 12", "fewer than 12 folds", "--ranking split"]),
    (["--finalists", "0", "--ensemble-top", "2"], ["--ensemble-top", "trials ranked by folds", "--ranking split"]),
])
def test_folds_that_cannot_rank_are_one_line_before_anything_is_stored(synth_data, tracking, tmp_path, flags, fragments):
    storage = tmp_path / "optuna.journal"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage), *SMALL,
                     *flags])
    assert_one_line_error(result, *fragments)
    assert mlflow.get_experiment_by_name(tracking) is None and not storage.exists()
