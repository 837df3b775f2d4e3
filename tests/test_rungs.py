"""Successive halving over rungs of complete, compressed schedules: the rung lengths, Optuna's promotion rule
as this project uses it, each rung a child run with its budget, and a killed study that resumes at its rung."""

from __future__ import annotations

import subprocess
import sys
import time

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import TrialState

from smids_ml.rungs import RUNGS_ATTR, RungPruner, rung_epochs
from smids_ml.studies import open_storage
from tests.test_tune import FLAGS, children, space_file, tune


def test_rung_lengths_shrink_by_eta_and_end_at_the_recipes_epochs():
    assert rung_epochs(200, 3, 3) == [22, 67, 200]
    assert rung_epochs(9, 3, 3) == [1, 3, 9]
    assert rung_epochs(3, 3, 3) == [1, 3]  # a rung under one epoch is left out
    assert rung_epochs(1, 3, 3) == [1]
    assert rung_epochs(40, 2, 1) == [40]


def ask_and_report(study: optuna.Study, value: float) -> tuple[optuna.Trial, bool]:
    trial = study.ask()
    trial.report(value, 1)
    return trial, not trial.should_prune()


def test_a_trial_is_promoted_when_it_ranks_in_the_top_third_of_its_rung_and_failed_trials_do_not_compete():
    study = optuna.create_study(direction="maximize", pruner=RungPruner(eta=3))
    promoted = []
    for value in (0.5, 0.4, 0.6, 0.3, 0.7, 0.55):
        trial, up = ask_and_report(study, value)
        promoted.append(up)
        study.tell(trial, state=TrialState.PRUNED)  # the rule reads the rung scores, not the states
    # the best so far while a rung holds fewer than 6 scores, then the top 2 of 6 (Optuna's ASHA rule)
    assert promoted == [True, False, True, False, True, False]
    lost, up = ask_and_report(study, 0.9)  # promoted, then its worker dies: its retry carries the score
    assert up
    study.tell(lost, state=TrialState.FAIL)
    _, up = ask_and_report(study, 0.65)
    assert up, "0.65 is in the top 2 of the 7 live scores; with the failed 0.9 counted it would not be"


def rung_runs(parent_id: str) -> pd.DataFrame:
    runs = children(parent_id)
    runs = runs[runs["tags.smids_ml.rung"].notna()].copy()
    runs["trial"] = runs["tags.optuna.trial"].astype(int)
    runs["rung"] = runs["tags.smids_ml.rung"].astype(int)
    return runs.sort_values(["trial", "rung"])


def test_each_rung_trains_a_whole_compressed_schedule_in_its_own_child_run(tracking, synth_data, tmp_path):
    space = space_file(tmp_path, "rungs", "fixed: {model: improved_cnn}\n"
                                          "params:\n  lr: {low: 0.0003, high: 0.01, log: true}\n")
    storage = tmp_path / "optuna.journal"
    result = tune(tracking, synth_data, storage, "--sampler", "tpe", "--space", space, "--epochs", "9",
                  "--n-trials", "6", "--study-name", "rungs", "--monitor", "valid_loss", "--register-as", "rungs",
                  "--finalists", "1", "--folds", "2")
    study = optuna.load_study(study_name="rungs", storage=open_storage(str(storage)))
    parent = mlflow.search_runs(experiment_names=[tracking], filter_string="attributes.run_name = 'study-rungs'",
                                output_format="list")[0]
    assert parent.data.params["pruner"] == "halving" and parent.data.params["rungs"] == "3"
    runs = rung_runs(parent.info.run_id)
    assert {(r, e, b) for r, e, b in zip(runs["rung"], runs["params.epochs"], runs["params.budget"])} \
        <= {(0, "1", "0.1111"), (1, "3", "0.3333"), (2, "9", "1.0")}
    for run_id, epochs in zip(runs["run_id"], runs["params.epochs"]):  # a complete schedule: every epoch ran
        assert len(MlflowClient().get_metric_history(run_id, "valid_loss")) == int(epochs)
    for trial in study.trials:
        mine = runs[runs["trial"] == trial.number]
        assert list(mine["rung"]) == list(range(len(mine)))  # rung r+1 only after rung r
        assert set(mine["tags.optuna.state"].iloc[:-1]) <= {"PROMOTED"}
        assert mine["tags.optuna.state"].iloc[-1] == {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED"}[trial.state]
        assert (trial.state == TrialState.COMPLETE) == (mine["rung"].iloc[-1] == 2)
        assert trial.user_attrs["mlflow_run_id"] == mine["run_id"].iloc[-1]  # the trial's run: its latest rung
        assert sorted(trial.intermediate_values) == [3 ** r for r in range(len(mine))]  # every rung it trained
    # the promotion at rung 0, replayed in the order the scores arrived: the best 1/3 so far (at least the best)
    first = runs[runs["rung"] == 0].sort_values("start_time")
    seen = []
    for score, state in zip(first["metrics.best_valid_loss"], first["tags.optuna.state"]):
        seen.append(score)
        bar = sorted(seen)[max(len(seen) // 3, 1) - 1]
        assert (state == "PROMOTED") == (score <= bar), (score, seen)
    assert "PRUNED" in set(first["tags.optuna.state"])
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="study_summary.csv"))
    assert {(int(r), int(e)) for r, e in zip(summary["rung"], summary["epochs"])} <= {(0, 1), (1, 3), (2, 9)}
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="finalists.csv"))
    assert set(table["trial"]) <= {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert "rung 0 (1 of 9 epochs)" in result.output and "rung 0 valid_loss" in result.output


def test_a_study_killed_in_a_rung_resumes_at_that_rung(tracking, synth_data, tmp_path):
    """kill -9 while a trial trains rung 1: the next tune fails that trial and its retry carries rung 0's score
    (no second rung-0 run), then trains rung 1 alone."""
    space = space_file(tmp_path, "resume", "params:\n  lr: [0.002]\n")
    storage = tmp_path / "optuna.journal"
    command = [sys.executable, "-m", "smids_ml.tune", "--data", str(synth_data), "--experiment", tracking,
               "--storage", str(storage), "--sampler", "grid", "--space", space, "--study-name", "resume",
               "--register-as", "", "--rungs", "2", *FLAGS]
    # rungs of 2 and 600 epochs: killed in the long one; resumed as rungs of 2 and 6
    process = subprocess.Popen([*command, "--epochs", "600", "--eta", "300"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            running = optuna.load_study(study_name="resume", storage=open_storage(str(storage))).get_trials(
                states=(TrialState.RUNNING,))
        except (KeyError, ValueError):
            running = []
        attrs = running[0].user_attrs if running else {}
        if RUNGS_ATTR in attrs and attrs["mlflow_run_id"] != attrs[RUNGS_ATTR]["0"]["run_id"]:
            break  # rung 1's run has started
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError("no trial reached rung 1 within 120 s")
    process.kill()
    process.communicate(timeout=30)
    first_score = running[0].user_attrs[RUNGS_ATTR]["0"]["value"]
    resumed = subprocess.run([*command, "--epochs", "6", "--eta", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="resume", storage=open_storage(str(storage)))
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.intermediate_values == {1: first_score, 3: retry.value}  # rung 0 carried, not trained again
    parent = mlflow.search_runs(experiment_names=[tracking], filter_string="attributes.run_name = 'study-resume'",
                                output_format="list")[0]
    runs = rung_runs(parent.info.run_id)
    assert sorted(zip(runs["trial"], runs["rung"])) == [(0, 0), (0, 1), (1, 1)]
    assert runs[runs["trial"] == 1]["params.epochs"].tolist() == ["6"]
    assert MlflowClient().get_run(failed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
