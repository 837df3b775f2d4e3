"""Reliability IV (#46): what a careful and an adversarial user found accepted silently, or ending in a traceback,
each through the real CLI and a real store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from smids_ml.studies import open_storage
from tests.conftest import TINY
from tests.helpers import assert_one_line_error, invoke, write_image

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def table_copy(synth_table, tmp_path, edit=None):
    """A changeable copy of the table data set; `edit(lines)` rewrites the table's rows (not its header)."""
    root = tmp_path / "data"
    shutil.copytree(synth_table, root)
    table = root / "labels.csv"
    if edit:
        header, *rows = table.read_text().splitlines()
        table.write_text("\n".join([header, *edit(rows)]) + "\n")
    return root, table


def nothing_stored(experiment, storage=None):
    return mlflow.get_experiment_by_name(experiment) is None and (storage is None or not storage.exists())


# --------------------------------------------------------------------------- rows 1-4, 6-9: refused before any run


def test_a_label_column_named_twice_is_refused(tracking, synth_table):
    table = synth_table / "labels.csv"
    result = invoke(["train", "--data", str(synth_table), "--labels", str(table), "--label-column", "shape,shape",
                     "--register-as", "md", "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, "--label-column shape,shape", "twice")
    assert nothing_stored(tracking)


def test_the_split_column_as_the_label_column_is_refused(tracking, synth_table):
    table = synth_table / "labels.csv"
    result = invoke(["train", "--data", str(synth_table), "--labels", str(table), "--label-column", "split",
                     "--split-column", "split", "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, "--split-column split is also a --label-column")
    assert nothing_stored(tracking)


def test_a_class_found_only_in_the_test_rows_is_refused(tracking, synth_table, tmp_path):
    def only_held_out(rows):  # the table has train and valid rows; its valid rows are the test part
        held_out = [i for i, row in enumerate(rows) if ",valid," in row][:3]
        return [row.replace(",valid,normal,", ",valid,z,").replace(",valid,abnormal,", ",valid,z,")
                if i in held_out else row for i, row in enumerate(rows)]

    root, table = table_copy(synth_table, tmp_path, only_held_out)
    assert ",z," in table.read_text()
    result = invoke(["train", "--data", str(root), "--labels", str(table), "--label-column", "shape",
                     "--split-column", "split", "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, "class z has no train rows", "could never predict it")
    assert nothing_stored(tracking)


@pytest.mark.parametrize("flags", [["--timeout", "nan"], ["--timeout", "inf"], ["--budget", "nan"],
                                   ["--budget", "inf"]], ids=["row4-timeout-nan", "timeout-inf", "row8-budget-nan",
                                                              "row9-budget-inf"])
def test_tune_refuses_a_number_that_is_not_finite(synth_data, tracking, tmp_path, flags):
    storage = tmp_path / "optuna.journal"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                     *FLAGS, *flags])
    assert_one_line_error(result, f"{flags[0]} must be a finite number, got '{flags[1]}'")
    assert nothing_stored(tracking, storage)


def test_cv_refuses_a_split_column_it_would_ignore(tracking, synth_table):
    table = synth_table / "labels.csv"
    result = invoke(["cv", "--data", str(synth_table), "--labels", str(table), "--label-column", "debris",
                     "--split-column", "split", "--folds", "2", "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, "--split-column split", "cv makes every row a test row once")
    assert nothing_stored(tracking)


def test_explore_refuses_a_table_with_no_rows_as_train_does(tracking, synth_table, tmp_path):
    root, table = table_copy(synth_table, tmp_path, lambda rows: [])
    for command in (["explore", str(root)], ["train", "--data", str(root), *FLAGS]):
        result = invoke([*command, "--labels", str(table), "--label-column", "shape", "--experiment", tracking])
        assert_one_line_error(result, f"labels table {table} lists no images")
    assert nothing_stored(tracking)


def test_explore_refuses_a_folder_with_no_readable_image(tracking, tmp_path):
    for name in ("Normal", "Abnormal"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "broken.png").write_bytes(b"\x89PNG not really")
    result = invoke(["explore", str(tmp_path / "data"), "--experiment", tracking])
    assert_one_line_error(result, "no readable image (2 unreadable)")
    assert nothing_stored(tracking)


# --------------------------------------------------------------------------- row 5: the truth where a person looks


def test_report_says_how_many_crops_could_not_be_read_and_lists_them(trained_model, synth_data, tracking,
                                                                          tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for crop in sorted((synth_data / "Normal_Sperm").iterdir())[:11]:
        shutil.copy(crop, folder / crop.name)
    for i in range(6):
        (folder / f"broken-{i}.bmp").write_bytes(b"BM not an image")
    out = tmp_path / "out"
    result = invoke(["report", trained_model["uri"], str(folder), "--out", str(out), "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert "folder: 11 crops (6 more could not be read: listed in predictions.csv and report.html)" in result.output
    page = (out / "report.html").read_text()
    assert '<a href="#unreadable-0">6</a>' in page and '<h3 id="unreadable-0">could not be read: 6' in page
    assert all(f"broken-{i}.bmp" in page for i in range(6)) and 'href="predictions.csv"' in page
    [sample] = json.loads((out / "report.json").read_text())["samples"]
    assert sample["n_unreadable"] == 6 and len(sample["unreadable"]) == 6


# --------------------------------------------------------------------------- row 13: the defaults trial, folds


def test_every_run_of_the_defaults_trial_is_tagged_when_trials_are_ranked_by_folds(tracking, synth_data,
                                                                                         tmp_path):
    space = tmp_path / "lr.yaml"
    space.write_text("params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n")
    storage = tmp_path / "optuna.journal"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                     "--sampler", "tpe", "--space", str(space), "--image-size", "32", "--batch", "16", "--num-threads",
                     "1", "--model", "improved_cnn", "--lr", "0.002", "--epochs", "1", "--pruner", "none",
                     "--n-trials", "2", "--finalists", "0", "--register-as", "", "--study-name", "folds",
                     "--ranking", "folds", "--ranking-folds", "2"])
    assert result.exit_code == 0, result.output
    assert "trial 0 COMPLETE" in result.output and "after 1 epochs" in result.output
    study = optuna.load_study(study_name="folds", storage=open_storage(str(storage)))
    assert study.trials[0].user_attrs["smids_ml.defaults"]
    runs = mlflow.search_runs(experiment_names=[tracking])

    def trial_and_folds(number: str):
        trial = runs[runs["tags.optuna.trial"] == number]
        return pd.concat([trial, runs[runs["tags.mlflow.parentRunId"].isin(trial["run_id"])]])

    defaults, other = trial_and_folds("0"), trial_and_folds("1")
    folds = defaults[defaults["tags.mlflow.runName"].str.startswith("fold ")]
    assert len(defaults) == 3 and len(folds) == 2, runs[["tags.mlflow.runName", "tags.optuna.trial"]]
    assert (defaults["tags.smids_ml.defaults"] == "true").all()
    assert len(other) == 3 and not (other["tags.smids_ml.defaults"] == "true").any()


# --------------------------------------------------------------------------- messages


def test_labels_spelled_in_two_cases_are_refused_and_split_values_are_stripped(tracking, synth_table, tmp_path):
    root, table = table_copy(synth_table, tmp_path, lambda rows: [r.replace(",train,", ",train ,") for r in rows])
    result = invoke(["train", "--data", str(root), "--labels", str(table), "--label-column", "shape",
                     "--split-column", "split", "--experiment", tracking, *FLAGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output  # `train ` is train, as ` normal` is normal
    first = lambda rows: next(i for i, r in enumerate(rows) if ",normal," in r)  # noqa: E731
    root, table = table_copy(synth_table, tmp_path / "case", lambda rows: [
        r.replace(",normal,", ",Normal,") if i == first(rows) else r for i, r in enumerate(rows)])
    result = invoke(["train", "--data", str(root), "--labels", str(table), "--label-column", "shape",
                     "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, "spells one class as", "'Normal'", "'normal'", "case-sensitive")


def test_a_table_with_no_labels_in_its_column_says_so_in_words(tracking, synth_table, tmp_path):
    root, table = table_copy(synth_table, tmp_path, lambda rows: [r.rsplit(",", 2)[0] + ",," + r.rsplit(",", 1)[1]
                                                                  for r in rows])
    result = invoke(["train", "--data", str(root), "--labels", str(table), "--label-column", "shape",
                     "--experiment", tracking, *FLAGS])
    error = assert_one_line_error(result, "has no class with a readable image", "at least two classes")
    assert "()" not in error


def test_signed_16_bit_and_planar_two_channel_tiffs_are_named_right(tmp_path):
    import tifffile

    from smids_ml.data import ImageError, open_image

    tifffile.imwrite(tmp_path / "signed16.tif", (np.arange(1200).reshape(30, 40) - 600).astype(np.int16))
    assert "signed 16-bit integer pixels -600 to 599" in open_image(tmp_path / "signed16.tif").info["note"]
    tifffile.imwrite(tmp_path / "planar.tif", np.zeros((2, 30, 40), np.uint8), planarconfig="separate",
                     photometric="minisblack")
    with pytest.raises(ImageError, match="channels in separate planes"):
        open_image(tmp_path / "planar.tif")



# --------------------------------------------------------------------------- row 10: SIGTERM, a locked SQLite store

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # another process writing the same store: every other writer waits, then fails
db.execute("UPDATE experiments SET name = name")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def test_sigterm_while_another_process_writes_the_sqlite_store_fails_the_run_in_one_line(synth_data, tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    train = subprocess.Popen([sys.executable, "-m", "smids_ml.cli", "train", "--data", str(synth_data), *FLAGS,
                              "--epochs", "500", "--experiment", "locked"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and train.poll() is None:  # until it trains: a run logging epochs
            time.sleep(0.5)
            try:
                with sqlite3.connect(db, timeout=1) as read:
                    if read.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0] >= 2:
                        break
            except sqlite3.OperationalError:  # no tables yet
                continue
        assert train.poll() is None, train.communicate()
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), "12"], stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        train.send_signal(signal.SIGTERM)
        out, err = train.communicate(timeout=120)
        locker.wait(timeout=60)
    finally:
        train.kill()
    assert train.returncode == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert errors == ["Error: interrupted: the run is marked FAILED"], err
    with sqlite3.connect(db) as read:
        assert read.execute("SELECT status FROM runs").fetchall() == [("FAILED",)]


# --------------------------------------------------------------------------- a run's data root, from anywhere


def test_evaluate_finds_the_data_of_a_run_trained_with_a_relative_data_root(tracking, synth_table, tmp_path,
                                                                           monkeypatch):
    root, table = table_copy(synth_table, tmp_path)
    monkeypatch.chdir(root.parent)
    result = invoke(["train", "--data", "data", "--labels", "data/labels.csv", "--label-column", "debris",
                     "--register-as", "relative-root", "--experiment", tracking, *FLAGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path.parent)
    result = invoke(["evaluate", "models:/relative-root/1", "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert "images of split test" in result.output
    # a manifest error names the run's artifact, not the temporary file it was downloaded to
    write_image(root / "images" / "crop_00.bmp", size=(40, 40), fmt="BMP")
    result = invoke(["evaluate", "models:/relative-root/1", "--experiment", tracking])
    error = assert_one_line_error(result, "changed since manifest runs:/", "/manifest.csv was written")
    assert "/tmp" not in error.split("changed since")[1], error


# --------------------------------------------------------------------------- no library noise


def test_train_and_tune_print_no_library_warnings(synth_data, tmp_path):
    """In a process of its own (pytest hides UserWarnings): MLflow's integer-schema hint, Optuna's equal-importances
    and experimental-API warnings and matplotlib's flat-axis warning are silenced where this project calls them."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  lr: {low: 0.0005, high: 0.005, log: true}\n  dropout_rate: [0.1, 0.2]\n")
    common = ["--data", str(synth_data), "--image-size", "32", "--batch", "16", "--model", "improved_cnn",
              "--num-threads", "1", "--epochs", "1", "--experiment", "quiet"]
    for args in (["train", *common], ["tune", *common, "--space", str(space), "--storage", str(tmp_path / "journal"),
                                      "--n-trials", "3", "--finalists", "0", "--register-as", "", "--pruner", "none",
                                      "--ranking", "split"]):
        done = subprocess.run([sys.executable, "-m", "smids_ml.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr, done.stderr


# --------------------------------------------------------------------------- flags checked before the libraries load


@pytest.mark.parametrize("args", [["train", "--lr", "nan"], ["train", "--dropout-rate", "2"], ["train", "--alias", "x"],
                                  ["cv", "--folds", "1"], ["cv", "--split-column", "split"], ["train", "--help"],
                                  ["tune", "--timeout", "nan"], ["tune", "--budget", "inf"], ["tune", "--lr", "nan"],
                                  ["tune", "--sampler", "bogus"], ["tune", "--help"]])
def test_a_train_cv_or_tune_flag_is_checked_before_torch_and_mlflow_load(args):
    """How fast is benchmarks/bench_cli.py's; here, that the refusal (or the help) needs neither library."""
    code = ("import sys; from click.testing import CliRunner; from smids_ml.cli import main; "
            f"result = CliRunner().invoke(main, {args!r}); "
            "assert not {'torch', 'mlflow', 'optuna'} & set(sys.modules), result.output; "
            "print(result.exit_code, result.output)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 Usage:" if "--help" in args else "1 Error: "), done.stdout


def test_the_predict_table_keeps_a_file_name_with_a_newline_on_one_line(trained_model, synth_data, tmp_path):
    crop = tmp_path / "two\nlines.bmp"
    shutil.copy(sorted((synth_data / "Normal_Sperm").iterdir())[0], crop)
    result = invoke(["predict", trained_model["uri"], str(crop), "--output", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "lines.bmp" in line]
    assert len(rows) == 1 and "two\\nlines.bmp" in rows[0], result.stdout
