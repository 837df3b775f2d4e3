"""Bad input that used to end in a traceback or be accepted silently: one line, exit 1, nothing stored."""

from __future__ import annotations

import os
import shutil

import mlflow
import pandas as pd
import pytest

from smids_ml.data import build_dataset, write_manifest
from tests.conftest import TINY
from tests.helpers import assert_one_line_error, invoke, make_dataset

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@pytest.fixture
def manifest(tmp_path):
    """A small data set, its good manifest as a DataFrame, and where to write a changed one."""
    root = make_dataset(tmp_path / "data", per_class=6)
    shutil.copy(root / "Normal_Sperm" / "Normal_Sperm (1).png", root / "Normal_Sperm" / "twin.png")
    dataset = build_dataset(root)
    frame = pd.read_csv(write_manifest(dataset, tmp_path / "good.csv"))
    return root, frame, tmp_path / "bad.csv"


def _twin_in_two_splits(frame):
    twins = frame[frame["path"].isin(["Normal_Sperm/Normal_Sperm (1).png", "Normal_Sperm/twin.png"])].index
    frame.loc[twins[0], "split"], frame.loc[twins[1], "split"] = "train", "test"
    return frame


BAD_MANIFESTS = {
    "unknown split": (lambda f: f.assign(split=f["split"].where(f.index != 3, "holdout")), "line 5", "split 'holdout'"),
    "no test rows": (lambda f: f.assign(split=f["split"].replace("test", "train")), "has no test rows"),
    "label not the folder": (lambda f: f.assign(label=f["label"].where(f.index != 0, "Alien")), "line 2",
                             "label 'Alien' is not the file's class folder"),
    "a row twice": (lambda f: pd.concat([f, f.iloc[[4]]], ignore_index=True), "listed twice"),
    "one image in train and test": (_twin_in_two_splits, "same image (pixel hash)", "leakage"),
    "path leaves the root": (lambda f: f.assign(path=f["path"].where(f.index != 1, "../elsewhere/x.png")),
                             "line 3", "leaves the data root"),
    "absolute path": (lambda f: f.assign(path=f["path"].where(f.index != 1, "/etc/passwd")), "leaves the data root"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_manifest_is_refused_naming_the_row_before_any_run(case, manifest, tracking):
    root, frame, bad = manifest
    change, *fragments = BAD_MANIFESTS[case]
    change(frame.copy()).to_csv(bad, index=False)
    result = invoke(["train", "--data", str(root), "--split-manifest", str(bad), "--experiment", tracking, *TINY_FLAGS])
    assert_one_line_error(result, str(bad), *fragments)
    assert mlflow.get_experiment_by_name(tracking) is None


def test_an_empty_manifest_is_one_line(manifest, tracking):
    root, _, bad = manifest
    bad.write_text("")
    assert_one_line_error(invoke(["train", "--data", str(root), "--split-manifest", str(bad)]), str(bad), "is empty")


def test_one_class_is_refused_before_any_run(tmp_path, tracking):
    root = make_dataset(tmp_path / "one", classes=("Normal_Sperm",), per_class=6)
    result = invoke(["train", "--data", str(root), "--experiment", tracking, *TINY_FLAGS])
    assert_one_line_error(result, "at least two class folders")
    assert mlflow.get_experiment_by_name(tracking) is None


def test_a_file_name_that_is_not_utf8_is_reported_and_the_rest_trains(synth_data, tmp_path, tracking):
    root = tmp_path / "odd"
    shutil.copytree(synth_data, root)
    os.rename(os.fsencode(root / "Normal_Sperm" / "Normal_Sperm (2).bmp"),
              os.fsencode(root / "Normal_Sperm") + b"/bad\xff\xfe.bmp")
    result = invoke(["train", "--data", str(root), "--experiment", tracking, *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    assert "skipped Normal_Sperm/bad\\xff\\xfe.bmp: the file name is not valid UTF-8" in result.output
    [run] = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    assert run.data.params["count_Normal_Sperm"] == "11"


def test_predict_with_every_input_failing_gives_error_rows_and_exit_1(trained_model, tmp_path):
    corrupt = tmp_path / "clip.mp4"
    corrupt.write_bytes(b"not a video")
    result = invoke(["predict", trained_model["uri"], str(tmp_path / "nothing-*.png"), str(tmp_path / "missing.bmp"),
                     str(corrupt)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "0 predicted, 3 failed" in result.output and "no such file or folder" in result.output
