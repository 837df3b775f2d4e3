"""Tuning through real Optuna storages and a real `mlflow server`: child runs, pruning, resume, interrupts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from smids_ml.data import open_image
from smids_ml.serving import load_classifier
from smids_ml.studies import open_storage
from tests.conftest import ROOT, TINY
from tests.helpers import assert_one_line_error, invoke, lock_mismatches, make_colour_dataset, mlflow_run

# --finalists 0: the best trial's own weights are registered (the finalists' cross-validation has its own tests);
# --ranking split: these tiny sets would be ranked by folds (test_ranking has those tests)
FLAGS = ["--image-size", "32", "--batch", "16", "--num-threads", "1", "--patience", "0", "--finalists", "0",
         "--ranking", "split"]


def space_file(tmp_path, name: str, text: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def tune(tracking, synth_data, storage, *args):
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                     "--sampler", "grid", *FLAGS, *args])
    assert result.exit_code == 0, result.output
    return result


def children(parent_id: str) -> pd.DataFrame:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def load(storage, name):
    return optuna.load_study(study_name=name, storage=open_storage(str(storage)))


def test_grid_gives_one_child_run_per_point_and_registers_the_best(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "two", "fixed: {model: improved_cnn}\nparams:\n  lr: [0.001, 0.003]\n")
    storage = tmp_path / "optuna.journal"
    result = tune(tracking, synth_data, storage, "--space", space, "--epochs", "2", "--study-name", "two",
                  "--register-as", "tuned-two", "--pruner", "none")
    assert "registered models:/tuned-two/1 (@challenger)" in result.output
    assert "@champion moves to version 1: tuned-two had no @champion yet" in result.output
    parents = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.`optuna.study` = 'two'")
    parent = parents[parents["tags.mlflow.parentRunId"].isna()].iloc[0]
    kids = children(parent["run_id"])
    assert len(kids) == 2
    assert sorted(kids["params.lr"].astype(float)) == [0.001, 0.003]
    assert set(kids["tags.optuna.state"]) == {"COMPLETE"}
    client = MlflowClient()
    for run_id in kids["run_id"]:
        assert len(client.get_metric_history(run_id, "valid_f1")) == 2
    artifacts = {a.path for a in client.list_artifacts(parent["run_id"])} | {
        a.path for a in client.list_artifacts(parent["run_id"], "plots")}
    assert {"study_summary.csv", "plots/optimization_history.png", "plots/parallel_coordinate.png",
            "plots/param_importances.png"} <= artifacts
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent["run_id"], artifact_path="study_summary.csv"))
    assert len(summary) == 2 and summary["valid_f1"].is_monotonic_decreasing
    assert {"lr", "valid_f1", "state", "trial", "run_name"} <= set(summary.columns)
    study = load(storage, "two")
    version = client.get_model_version_by_alias("tuned-two", "champion")
    assert version.tags["study"] == "two" and int(version.tags["trial"]) == study.best_trial.number
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    model = mlflow.pyfunc.load_model("models:/tuned-two@champion")
    assert model.unwrap_python_model().config.lr == study.best_params["lr"]
    assert not list((tmp_path.parent / "cache").glob("trials/**/*.pt"))  # no trial weights wait on a local disk


def test_resume_runs_only_the_missing_points(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "three", "params:\n  lr: [0.001, 0.002, 0.003]\n")
    storage = tmp_path / "optuna.journal"
    common = ["--space", space, "--epochs", "1", "--study-name", "three", "--register-as", "", "--pruner", "none"]
    tune(tracking, synth_data, storage, *common, "--n-trials", "2")
    assert len(load(storage, "three").trials) == 2
    tune(tracking, synth_data, storage, *common)
    study = load(storage, "three")
    assert sorted(t.params["lr"] for t in study.trials) == [0.001, 0.002, 0.003]
    again = tune(tracking, synth_data, storage, *common)
    assert "all 3 grid points already ran" in again.output
    assert len(load(storage, "three").trials) == 3


def test_pruning_stops_a_hopeless_trial_and_keeps_its_metrics(tracking, tmp_path):
    colours = make_colour_dataset(tmp_path / "colours")
    storage = tmp_path / "optuna.journal"
    space = space_file(tmp_path, "prune", "params:\n  lr: [0.003, 1.0e-9]\n")
    tune(tracking, colours, storage, "--space", space, "--epochs", "5", "--study-name", "prune", "--register-as", "",
         "--pruner", "median", "--pruner-startup-trials", "1", "--pruner-warmup-epochs", "2", "--seed", "1")
    study = load(storage, "prune")
    good, hopeless = study.trials
    assert good.params["lr"] == 0.003, "with --seed 1 the grid visits the learning point first"
    assert good.state == TrialState.COMPLETE and hopeless.state == TrialState.PRUNED
    run = MlflowClient().get_run(hopeless.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    reached = MlflowClient().get_metric_history(run.info.run_id, "valid_f1")
    assert 2 <= len(reached) < 5
    other_space = space_file(tmp_path, "other", "params:\n  lr: [0.1]\n")
    result = invoke(["tune", "--data", str(colours), "--storage", str(storage), "--sampler", "grid",
                     "--space", other_space, "--study-name", "prune", *FLAGS])
    assert result.exit_code == 1 and "use a new --study-name" in result.output
    assert len(load(storage, "prune").trials) == 2


def two_point_study(tracking, synth_data, tmp_path, name: str) -> tuple[list[str], object]:
    """(the `python -m smids_ml.tune` command of a 2-point grid study in a journal file, that file)."""
    space = space_file(tmp_path, name, "params:\n  lr: [0.001, 0.002]\n")
    storage = tmp_path / "optuna.journal"
    return [sys.executable, "-m", "smids_ml.tune", "--data", str(synth_data), "--experiment", tracking,
            "--storage", str(storage), "--sampler", "grid", "--space", space, "--study-name", name,
            "--register-as", "", "--pruner", "none", *FLAGS], storage


def start_and_wait_for_a_training_trial(command: list[str], storage, name: str) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=storage.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a trial has really started training
        try:
            running = load(storage, name).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, ValueError):
            running = []
        if running and running[0].intermediate_values:
            return process
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.kill()
    raise AssertionError("no trial started training within 120 s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_trial_is_marked_failed_and_the_resumed_study_completes(signum, tracking, synth_data, tmp_path):
    command, storage = two_point_study(tracking, synth_data, tmp_path, "pair")
    process = start_and_wait_for_a_training_trial([*command, "--epochs", "200"], storage, "pair")
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "interrupted" in err and "Traceback" not in err, err
    failed = load(storage, "pair").get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    run = MlflowClient().get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    resumed = subprocess.run([*command, "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    study = load(storage, "pair")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["lr"] for t in complete) == [0.001, 0.002]
    assert len(study.trials) == 3  # the failed point ran once more, nothing else twice


def test_mlflow_run_tune_shares_a_postgres_study(tracking, synth_data, tmp_path, postgres_url):
    space = space_file(tmp_path, "pg", "params:\n  lr: [0.001, 0.003]\n")
    params = {**{k: v for k, v in TINY.items() if k != "epochs"}, "epochs": 1, "data": synth_data, "sampler": "grid",
              "space": space, "storage": postgres_url, "study_name": "pg", "register_as": "pg-best", "finalists": 0,
              "ranking": "split"}
    mlflow_run("tune", tracking, params, tmp_path)
    runs = mlflow.search_runs(experiment_names=[tracking])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and parents.iloc[0]["params.sampler"] == "grid"
    assert len(children(parents.iloc[0]["run_id"])) == 2
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert MlflowClient().get_model_version_by_alias("pg-best", "champion").version == "1"


def test_mlflow_run_tune_builds_its_environment_with_uv(tracking, synth_data, tmp_path):
    """`--env-manager uv`: MLflow builds a virtualenv from conda.yaml's pip list with uv, set up like pip by
    scripts/uv-env.sh (the same index, find-links and constraints), with the lock's versions, and runs the study in it."""
    exports = subprocess.run(["sh", str(ROOT / "scripts" / "uv-env.sh")], capture_output=True, text=True, check=True,
                             env=os.environ | {"PIP": f"{sys.executable} -m pip"}).stdout
    uv_env = dict(re.findall(r"^export (\w+)='?(.*?)'?$", exports, re.M))
    assert uv_env["UV_PYTHON_DOWNLOADS"] == "never" and uv_env["UV_INDEX_STRATEGY"] == "unsafe-best-match"
    space = space_file(tmp_path, "uv", "params:\n  lr: [0.001]\n")
    params = {**{k: v for k, v in TINY.items() if k != "epochs"}, "epochs": 1, "data": synth_data, "sampler": "grid",
              "space": space, "study_name": "uv", "register_as": "uv-best", "finalists": 0,
              "storage": tmp_path / "optuna.journal", "ranking": "split"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # uv beside this interpreter
    envs = tmp_path / "envs"  # a new environment, not one an earlier run left (uv's own cache makes it quick)
    done = mlflow_run("tune", tracking, params, tmp_path, env_manager="uv",
                      extra_env=uv_env | {"PATH": path, "MLFLOW_ENV_ROOT": str(envs)})
    assert re.search(rf"Running command 'source {envs}/mlflow-\w+/bin/activate && python -m smids_ml\.tune",
                     done.stderr), done.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=[tracking])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["tags.mlflow.project.env"] == "uv" and len(children(parent["run_id"])) == 1
    assert MlflowClient().get_model_version_by_alias("uv-best", "champion").version == "1"
    [site_packages] = envs.glob("mlflow-*/lib/python*/site-packages")  # conda.yaml's `-c constraints.txt` held
    assert lock_mismatches([str(site_packages)], extras=(), lock=ROOT / "constraints.txt") == []


def test_default_study_storage_sits_beside_a_sqlite_tracking_store(synth_data, tmp_path, monkeypatch):
    store = tmp_path / "tracking"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.create_experiment("local", artifact_location=str(store / "artifacts"))
    space = space_file(tmp_path, "one", "params:\n  lr: [0.001]\n")
    result = invoke(["tune", "--data", str(synth_data), "--experiment", "local", "--sampler", "grid", "--space", space,
                     "--epochs", "1", "--register-as", "", *FLAGS])
    assert result.exit_code == 0, result.output
    assert len(load(store / "optuna.journal", "one-grid").trials) == 1


def test_ensemble_top_registers_the_best_trials_as_one_model(tracking, synth_data, tmp_path):
    # trials of three input sizes: the members keep theirs (the ensemble serves each its own preprocessing)
    space = space_file(tmp_path, "top", "fixed: {model: smids_resnet, width: 8}\nparams:\n  image_size: [24, 32, 40]\n")
    storage = tmp_path / "optuna.journal"
    tune(tracking, synth_data, storage, "--space", space, "--epochs", "1", "--study-name", "top",
         "--register-as", "tuned-top", "--pruner", "none", "--ensemble-top", "2")
    study = load(storage, "top")
    ranked = sorted((t for t in study.trials if t.value is not None), key=lambda t: t.value, reverse=True)
    version = MlflowClient().get_model_version_by_alias("tuned-top", "champion")
    assert version.tags["members"] == f"{ranked[0].number},{ranked[1].number}"
    assert int(version.tags["trial"]) == study.best_trial.number == ranked[0].number
    model = load_classifier("models:/tuned-top@champion")
    assert [cfg.image_size for cfg in model.members] == [ranked[0].params["image_size"], ranked[1].params["image_size"]]
    assert len(model.inputs) == 2 and model.probabilities(torch.stack([model.preprocess(open_image(f)) for f in
                                                                        sorted(synth_data.rglob("*.bmp"))[:3]])).shape == (3, 3)
    assert not list((tmp_path.parent / "cache").glob("trials/**/*.pt"))


def test_champion_moves_only_to_a_better_challenger_or_on_promote(tracking, tmp_path):
    colours = make_colour_dataset(tmp_path / "colours")
    storage = tmp_path / "optuna.journal"

    def study(name, lr, *extra):
        space = space_file(tmp_path, name, f"fixed: {{model: improved_cnn}}\nparams:\n  lr: [{lr}]\n")
        return tune(tracking, colours, storage, "--space", space, "--epochs", "3", "--study-name", name,
                    "--register-as", "duel", "--pruner", "none", *extra).output

    assert "@champion moves to version 1: duel had no @champion yet" in study("good", 0.003)
    out = study("hopeless", 1e-9)
    assert "registered models:/duel/2 (@challenger)" in out
    assert "@champion stays on version 1: the challenger's best_valid_f1" in out and "does not beat" in out
    client = MlflowClient()
    assert client.get_model_version_by_alias("duel", "champion").version == "1"
    assert client.get_model_version_by_alias("duel", "challenger").version == "2"
    assert "@champion moves to version 3: --promote" in study("forced", 1e-9, "--promote")
    assert client.get_model_version_by_alias("duel", "champion").version == "3"


def test_a_killed_workers_trial_is_failed_and_rerun_by_the_next_tune(tracking, synth_data, tmp_path):
    """kill -9 leaves the trial RUNNING in the journal and its run RUNNING in MLflow; the next tune fixes both."""
    command, storage = two_point_study(tracking, synth_data, tmp_path, "killed")
    process = start_and_wait_for_a_training_trial([*command, "--epochs", "200"], storage, "killed")
    process.kill()
    process.communicate(timeout=30)
    [stale] = load(storage, "killed").get_trials(states=(TrialState.RUNNING,))
    run_id = stale.user_attrs["mlflow_run_id"]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    resumed = subprocess.run([*command, "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 trial(s) of a worker that is gone marked FAIL" in resumed.stderr
    study = load(storage, "killed")
    assert study.trials[stale.number].state == TrialState.FAIL
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    assert sorted(t.params["lr"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == [0.001, 0.002]


def test_a_study_stays_in_its_experiment(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "home", "params:\n  lr: [0.001]\n")
    storage = tmp_path / "optuna.journal"
    common = ["--space", space, "--epochs", "1", "--study-name", "home", "--register-as", "", "--pruner", "none"]
    tune(tracking, synth_data, storage, *common)
    result = invoke(["tune", "--data", str(synth_data), "--experiment", f"{tracking}-other", "--storage", str(storage),
                     "--sampler", "grid", *FLAGS, *common])
    assert_one_line_error(result, "study home is tracked in experiment", f"--experiment '{tracking}'")
    assert mlflow.get_experiment_by_name(f"{tracking}-other") is None
    # a study whose runs this tracking store does not have (another store's, or deleted): said, nothing added
    MlflowClient().delete_run(load(storage, "home").user_attrs["mlflow_parent_run_id"])
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                     "--sampler", "grid", *FLAGS, *common])
    assert_one_line_error(result, "study home in", "does not have", "a new --study-name")
    assert len(load(storage, "home").trials) == 1


def test_tune_refuses_to_run_without_a_validation_split(tracking, synth_data, tmp_path):
    storage = tmp_path / "study.db"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", f"sqlite:///{storage}",
                     "--valid-frac", "0", *FLAGS])
    assert_one_line_error(result, "--valid-frac must be above 0")
    assert mlflow.get_experiment_by_name(tracking) is None and not storage.exists()


def test_a_new_tpe_study_runs_the_defaults_first_and_tags_them(tracking, synth_data, tmp_path):
    """The base configuration is trial 0 (within --n-trials), its child run tagged smids_ml.defaults; resuming
    the study does not queue it again; a base outside the space gets no such trial and a line saying why."""
    space = space_file(tmp_path, "around", "params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n"
                                           "  dropout_rate: [0.1, 0.2, 0.3]\n")
    storage = tmp_path / "optuna.journal"
    args = ["--sampler", "tpe", "--space", space, "--epochs", "1", "--pruner", "none", "--register-as", "",
            "--model", "improved_cnn", "--dropout-rate", "0.2"]
    tune(tracking, synth_data, storage, *args, "--study-name", "around", "--lr", "0.002", "--n-trials", "2")
    study = load(storage, "around")
    assert len(study.trials) == 2
    assert study.trials[0].params == {"lr": 0.002, "dropout_rate": 0.2} and study.trials[0].user_attrs["smids_ml.defaults"]
    assert "smids_ml.defaults" not in study.trials[1].user_attrs
    runs = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.`smids_ml.defaults` = 'true'")
    assert list(runs["tags.optuna.trial"]) == ["0"]
    tune(tracking, synth_data, storage, *args, "--study-name", "around", "--lr", "0.002", "--n-trials", "1")
    assert sum(bool(t.user_attrs.get("smids_ml.defaults")) for t in load(storage, "around").trials) == 1
    outside = tune(tracking, synth_data, storage, *args, "--study-name", "outside", "--lr", "0.01", "--n-trials", "1")
    assert "no defaults trial" in outside.output and "lr=0.01" in outside.output
    assert not any(t.user_attrs.get("smids_ml.defaults") for t in load(storage, "outside").trials)


def finalists_study(tracking, synth_data, tmp_path, name: str, *extra: str, folds: int = 3):
    space = space_file(tmp_path, name, "fixed: {model: improved_cnn}\nparams:\n  lr: [0.001, 0.002, 0.004]\n")
    storage = tmp_path / "optuna.journal"
    result = tune(tracking, synth_data, storage, "--sampler", "tpe", "--space", space, "--epochs", "1", "--n-trials",
                  "3", "--study-name", name, "--pruner", "none", "--lr", "0.002", "--register-as", name,
                  "--finalists", "2", "--folds", str(folds), *extra)
    return result, storage


def test_finalists_are_cross_validated_on_the_same_folds_and_the_winner_is_refit(tracking, synth_data, tmp_path):
    result, storage = finalists_study(tracking, synth_data, tmp_path, "final")
    study = load(storage, "final")
    parent = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.`optuna.study` = 'final' and "
                                "attributes.run_name LIKE 'study-%'", output_format="list")[0]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="finalists.csv"))
    assert {"trial", "run_id", "fold_1", "fold_2", "fold_3", "mean", "std", "diff_to_defaults", "diff_se"} <= set(table)
    best_two = sorted(study.trials, key=lambda t: t.value, reverse=True)[:2]
    assert set(table["trial"]) == {t.number for t in best_two} | {0}  # the two best, and the defaults trial
    defaults = table[table["defaults"]].iloc[0]
    assert defaults["trial"] == 0 and defaults["diff_to_defaults"] == 0
    assert table["mean"].is_monotonic_decreasing
    np.testing.assert_allclose(table[["fold_1", "fold_2", "fold_3"]].mean(1), table["mean"])
    cv_runs = [MlflowClient().get_run(r) for r in table["cv_run_id"]]
    sizes = {tuple(pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="cv_folds.csv"))
                   ["n_test"]) for r in cv_runs}
    assert len(sizes) == 1  # the same folds for every finalist
    assert parent.data.tags["finalists.verdict"] in result.output
    winner = table.iloc[0]
    version = MlflowClient().get_model_version_by_alias("final", "champion")
    assert version.tags["score"] == "cv_test_f1_macro_mean" and version.tags["refit"] == "model"
    assert float(version.tags["cv_test_f1_macro_mean"]) == pytest.approx(winner["mean"], abs=1e-6)
    refit = MlflowClient().get_run(version.tags["run_id"])
    assert refit.data.tags["smids_ml.refit_of"] == winner["run_id"] == version.tags["smids_ml.refit_of"]
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert float(refit.data.params["valid_frac"]) == 0 and refit.data.params["n_valid"] == "0"
    trials_run = MlflowClient().get_run(winner["run_id"])
    assert int(refit.data.params["n_train"]) == int(trials_run.data.params["n_train"]) + int(trials_run.data.params["n_valid"])
    assert refit.data.params["n_test"] == trials_run.data.params["n_test"]  # the test rows stay unseen
    again = tune(tracking, synth_data, storage, "--sampler", "tpe", "--space", str(tmp_path / "final.yaml"),
                 "--timeout", "1e-9", "--study-name", "final", "--register-as", "final", "--finalists", "2",
                 "--folds", "3", "--epochs", "1")  # no new trial: nothing to score again
    assert "already scored" in again.output
    assert len(MlflowClient().search_model_versions("name = 'final'")) == 1


def test_refit_ensemble_registers_the_winners_fold_models(tracking, synth_data, tmp_path):
    finalists_study(tracking, synth_data, tmp_path, "final-ensemble", "--refit", "ensemble", "--finalists", "1", folds=2)
    version = MlflowClient().get_model_version_by_alias("final-ensemble", "champion")
    assert version.tags["refit"] == "ensemble"
    assert len(load_classifier("models:/final-ensemble@champion").networks) == 2


def test_ensemble_top_needs_finalists_off(tracking, synth_data, tmp_path):
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(tmp_path / "j"),
                     "--ensemble-top", "2", "--finalists", "2"])
    assert_one_line_error(result, "--ensemble-top", "--finalists 0")


def test_the_defaults_trial_of_a_halving_study_is_tagged_on_its_runs(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "halving", "params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n")
    storage = tmp_path / "optuna.journal"
    tune(tracking, synth_data, storage, "--sampler", "tpe", "--space", space, "--epochs", "3", "--pruner", "halving",
         "--model", "improved_cnn", "--lr", "0.002", "--n-trials", "2", "--study-name", "halving", "--register-as", "")
    study = load(storage, "halving")
    assert study.trials[0].user_attrs["smids_ml.defaults"] and len(study.trials) == 2
    runs = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.`smids_ml.defaults` = 'true'")
    assert len(runs) >= 1 and set(runs["tags.optuna.trial"]) == {"0"}, runs


def test_a_study_reused_with_another_set_of_parameters_is_refused_naming_them(tracking, synth_data, tmp_path):
    storage = tmp_path / "optuna.journal"
    args = ["--sampler", "tpe", "--epochs", "1", "--pruner", "none", "--register-as", "", "--model", "improved_cnn",
            "--n-trials", "1", "--study-name", "kept"]
    tune(tracking, synth_data, storage, *args, "--space",
         space_file(tmp_path, "lr", "params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n"))
    runs = len(mlflow.search_runs(experiment_names=[tracking]))
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage), *FLAGS,
                     *args, "--space", space_file(tmp_path, "dropout", "params:\n  dropout_rate: [0.1, 0.2]\n")])
    assert_one_line_error(result, "study kept searched lr", "adds dropout_rate", "drops lr", "new --study-name")
    assert len(load(storage, "kept").trials) == 1 and len(mlflow.search_runs(experiment_names=[tracking])) == runs
