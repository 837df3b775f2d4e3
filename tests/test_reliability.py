"""Bad input that used to end in a traceback or be accepted silently: one line, exit 1, nothing stored."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from smids_ml.data import build_dataset, load_tensors, open_image, prepare_image, write_manifest
from tests.conftest import TINY
from tests.helpers import assert_one_line_error, invoke, make_dataset, write_image, write_wide_twins

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


# --------------------------------------------------------------------------- images as cameras write them


def test_wide_images_give_the_tensor_of_their_8bit_twins(tmp_path):
    for kind, (narrow, wide) in write_wide_twins(tmp_path).items():
        for channels in (1, 3):
            expected = prepare_image(open_image(narrow), 48, channels, "pad")
            assert torch.equal(prepare_image(open_image(wide), 48, channels, "pad"), expected), (kind, channels)


def test_float_pixels_outside_0_1_are_scaled_by_their_own_range_and_reported(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    values = np.linspace(-2.0, 6.0, 40 * 30, dtype=np.float32).reshape(30, 40)
    Image.fromarray(values).save(root / "Normal_Sperm" / "float-wide.tif")
    dataset = build_dataset(root)
    assert "Normal_Sperm/float-wide.tif" in set(dataset.manifest["path"])
    assert "scaled by its own range (float pixels -2 to 6): Normal_Sperm/float-wide.tif" in dataset.report.lines()
    pixels = np.asarray(open_image(root / "Normal_Sperm" / "float-wide.tif"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_a_folder_of_wide_images_trains_on_the_tensors_of_its_8bit_twins(tmp_path, tracking):
    narrow_root, wide_root = tmp_path / "narrow", tmp_path / "wide"
    for label_index, label in enumerate(("Abnormal_Sperm", "Non-Sperm", "Normal_Sperm")):
        for i in range(4):
            for kind, (narrow, wide) in write_wide_twins(tmp_path / "made" / f"{label_index}-{i}",
                                                         seed=10 * label_index + i).items():
                for source, root in ((narrow, narrow_root), (wide, wide_root)):
                    (root / label).mkdir(parents=True, exist_ok=True)
                    shutil.copy(source, root / label / f"{i}-{kind}{source.suffix}")
    tensors = [load_tensors(build_dataset(root, test_frac=0.2, valid_frac=0.2), 32, 3, "pad", tmp_path / "cache")
               for root in (narrow_root, wide_root)]
    assert torch.equal(*tensors)
    result = invoke(["train", "--data", str(wide_root), "--experiment", tracking, *TINY_FLAGS])
    assert result.exit_code == 0 and "skipped" not in result.output, result.output
    [run] = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    assert run.data.params["count_Normal_Sperm"] == "12"


def test_predict_answers_wide_images_as_their_8bit_twins(trained_model, tmp_path):
    twins = write_wide_twins(tmp_path)
    out = tmp_path / "predictions.csv"
    files = [str(f) for pair in twins.values() for f in pair]
    result = invoke(["predict", trained_model["uri"], *files, "--output", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out).set_index("path")
    classes = list(trained_model["result"].dataset.classes)
    for narrow, wide in twins.values():
        np.testing.assert_allclose(table.loc[str(wide), classes].astype(float),  # pandas < 3: an object row
                                   table.loc[str(narrow), classes].astype(float), atol=1e-6)


# --------------------------------------------------------------------------- folders and names


def test_two_spellings_of_one_class_are_merged_and_reported(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    for i in range(3):
        write_image(root / "Non_Sperm" / f"Non_Sperm ({i}).png", seed=777 + i)
    dataset = build_dataset(root)
    assert (dataset.manifest["label"] == "Non-Sperm").sum() == 6 + 3
    assert {p.split("/")[0] for p in dataset.manifest["path"]} >= {"Non-Sperm", "Non_Sperm"}
    assert "merged Non-Sperm/, Non_Sperm/ as one class, Non-Sperm" in dataset.report.lines()


def test_a_link_that_loops_is_named_in_the_data_report(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    os.symlink("loop-b.png", root / "Normal_Sperm" / "loop-a.png")
    os.symlink("loop-a.png", root / "Normal_Sperm" / "loop-b.png")
    lines = build_dataset(root).report.lines()
    assert any(line.startswith("skipped Normal_Sperm/loop-a.png: cannot be read") for line in lines), lines


def test_predict_over_a_name_that_is_not_utf8_writes_its_row_and_names_the_file(trained_model, synth_data, tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    shutil.copy(synth_data / "Normal_Sperm" / "Normal_Sperm (2).bmp", folder / "good.bmp")
    shutil.copy(synth_data / "Normal_Sperm" / "Normal_Sperm (3).bmp", os.fsencode(folder) + b"/bad\xff.bmp")
    out = tmp_path / "predictions.csv"
    result = invoke(["predict", trained_model["uri"], str(folder), "--output", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    table = pd.read_csv(out)
    assert len(table) == 2 and table["error"].isna().all()
    assert f"{folder}/bad\\xff.bmp" in set(table["path"])


def test_an_image_size_far_beyond_any_crop_is_one_line_before_any_run(synth_data, tracking):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS, "--image-size", "100000"])
    assert_one_line_error(result, "--image-size must be between 16 and 1024 pixels, got 100000")
    assert mlflow.get_experiment_by_name(tracking) is None


# --------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_the_libraries_load_is_one_line(tmp_path, signum):
    process = subprocess.Popen([sys.executable, "-m", "smids_ml.train", "--help"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # torch alone takes seconds to import
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0 and out == "", out
    assert err.strip() == "Aborted: interrupted before the command started; nothing was recorded", err


def test_an_interrupted_study_logs_no_figures_and_stops(tracking, monkeypatch):
    from smids_ml import console
    from smids_ml.search import log_study

    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-4, 1e-2), n_trials=3)
    mlflow.set_experiment(tracking)
    monkeypatch.setattr(console, "_signalled", True)  # a Ctrl-C or SIGTERM came and was swallowed
    with pytest.raises(KeyboardInterrupt), mlflow.start_run() as run:
        log_study(study, "valid_f1")
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert logged == {"study_summary.csv"}  # what the study has, without the minutes of figure drawing


# --------------------------------------------------------------------------- refused before anything exists


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "inf"],
                                   ["--warmup-epochs", "inf"]])
def test_a_flag_that_is_not_a_finite_number_is_one_line_before_any_run(synth_data, tracking, flags):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS, *flags])
    assert_one_line_error(result, f"{flags[0]} must be a finite number")
    assert mlflow.get_experiment_by_name(tracking) is None


def test_a_training_whose_weights_diverge_fails_its_run_and_keeps_no_model(synth_data, tracking):
    name = f"diverged-{time.time_ns()}"
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS, "--optimizer", "SGD",
                     "--lr", "1e30", "--register-as", name])
    assert_one_line_error(result, "training diverged at epoch 1", "lower --lr")
    [run] = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    assert run.info.status == "FAILED"
    experiment = mlflow.get_experiment_by_name(tracking).experiment_id
    assert len(mlflow.search_logged_models(experiment_ids=[experiment])) == 0
    assert MlflowClient().search_registered_models(filter_string=f"name = '{name}'") == []


def test_predict_gives_a_model_that_answers_nan_an_error_row_not_a_blank_confidence(trained_model, synth_data, tracking):
    from smids_ml.tracking import log_model

    result = trained_model["result"]
    broken = copy.deepcopy(result.network)
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.fill_(float("nan"))
    mlflow.set_experiment(tracking)
    with mlflow.start_run():
        uri = log_model([(broken, trained_model["config"])], result.dataset).model_uri
    crop = synth_data / "Normal_Sperm" / "Normal_Sperm (2).bmp"
    predicted = invoke(["predict", uri, str(crop)])
    assert predicted.exit_code == 1 and "Traceback" not in predicted.output, predicted.output
    assert "0 predicted, 1 failed" in predicted.output and "not a number (NaN)" in predicted.output


@pytest.mark.parametrize("command, names, expected", [
    ("train", ["--register-as", "a/b:c"], ("--register-as 'a/b:c'", "cannot contain '/' or ':'")),
    ("cv", ["--register-as", "a/b:c"], ("--register-as 'a/b:c'", "cannot contain '/' or ':'")),
    ("tune", ["--register-as", "a/b:c"], ("--register-as 'a/b:c'", "cannot contain '/' or ':'")),
    ("train", ["--register-as", "ok", "--alias", "latest"], ("--alias 'latest'", "reserved")),
])
def test_a_registry_name_mlflow_refuses_is_one_line_before_any_run(synth_data, tracking, tmp_path, command, names,
                                                                   expected):
    storage = tmp_path / "optuna.journal"
    extra = ["--storage", str(storage)] if command == "tune" else []
    result = invoke([command, "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS, *extra, *names])
    assert_one_line_error(result, *expected)
    assert mlflow.get_experiment_by_name(tracking) is None and not storage.exists()


@pytest.mark.parametrize("flag, value", [
    ("--register-as", "good_name-1.2"), ("--register-as", "with space"), ("--register-as", "a/b"),
    ("--register-as", "a:b"), ("--alias", "first"), ("--alias", "best_2-a"), ("--alias", "a.b"),
    ("--alias", "with space"), ("--alias", "x" * 255), ("--alias", "x" * 256), ("--alias", "latest"),
    ("--alias", "LATEST"), ("--alias", "v3"), ("--alias", "V12"), ("--alias", "v3a"),
])
def test_the_project_rule_for_registry_names_agrees_with_a_real_registry(trained_model, flag, value):
    """The rule is the project's own (MLflow's validators are private): a new MLflow that changes its rules fails here."""
    from mlflow.exceptions import MlflowException

    from smids_ml.tracking import registry_name_problem

    client = MlflowClient(trained_model["tracking_uri"])
    try:
        if flag == "--register-as":
            client.create_registered_model(f"{value}-{uuid.uuid4().hex[:6]}")
        else:
            client.set_registered_model_alias(trained_model["name"], value, trained_model["version"])
            client.delete_registered_model_alias(trained_model["name"], value)
        accepted = True
    except MlflowException:
        accepted = False
    assert (registry_name_problem(flag, value) is None) == accepted, (flag, value, accepted)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_any_run(synth_data, tracking):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS, "--device", "cuda"])
    assert_one_line_error(result, "--device cuda: no CUDA device")
    assert mlflow.get_experiment_by_name(tracking) is None


@pytest.mark.parametrize("flags", [["--n-trials", "-1"], ["--timeout", "-5"]])
def test_tune_refuses_a_negative_count_before_any_study(synth_data, tracking, tmp_path, flags):
    storage = tmp_path / "optuna.journal"
    result = invoke(["tune", "--data", str(synth_data), "--experiment", tracking, "--storage", str(storage),
                     *TINY_FLAGS, *flags])
    assert_one_line_error(result, f"Invalid value for '{flags[0]}'")
    assert mlflow.get_experiment_by_name(tracking) is None and not storage.exists()


@pytest.mark.parametrize("args", [["train", "--model", "bogus"], ["train", "--lr", "abc"], ["train", "--stem", "wide"],
                                  ["train", "--tta", "bogus"], ["train", "--members", "0"], ["cv", "--folds", "1"],
                                  ["bogus"]])
def test_a_usage_error_is_one_line_and_exit_1_like_every_refusal(args, tracking):
    result = invoke([*args, "--experiment", tracking])
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: ") and "--help" in result.stderr
    assert mlflow.get_experiment_by_name(tracking) is None


# --------------------------------------------------------------------------- no crop lost by predict or report


def _links_that_fail(folder):
    os.symlink("nowhere.png", folder / "dangling.png")
    os.symlink("loop-b.png", folder / "loop-a.png")
    os.symlink("loop-a.png", folder / "loop-b.png")


def test_predict_gives_links_that_fail_inside_a_folder_their_own_rows(trained_model, synth_data, tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    shutil.copy(synth_data / "Normal_Sperm" / "Normal_Sperm (2).bmp", folder / "good.bmp")
    _links_that_fail(folder)
    out = tmp_path / "predictions.csv"
    result = invoke(["predict", trained_model["uri"], str(folder), "--output", str(out)])
    assert result.exit_code == 1 and "1 predicted, 3 failed" in result.output, result.output
    table = pd.read_csv(out).set_index("path")
    assert pd.isna(table.loc[str(folder / "good.bmp"), "error"])
    for name in ("dangling.png", "loop-a.png", "loop-b.png"):
        assert table.loc[str(folder / name), "error"].startswith("cannot be read"), table


def test_report_counts_a_dangling_link_keeps_loose_crops_apart_and_uploads_only_its_files(trained_model, synth_data,
                                                                                           tracking, tmp_path):
    root = tmp_path / "samples"
    crops = sorted((synth_data / "Normal_Sperm").iterdir())
    for where, picked in ((root, crops[:2]), (root / "samples", crops[2:5])):  # a sub-folder named like ROOT
        where.mkdir(parents=True, exist_ok=True)
        for crop in picked:
            shutil.copy(crop, where / crop.name)
    os.symlink("nowhere.bmp", root / "samples" / "dangling.bmp")
    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.txt").write_text("not the report's")
    result = invoke(["report", trained_model["uri"], str(root), "--out", str(out), "--experiment", tracking])
    assert result.exit_code == 0, result.output
    samples = {s["sample"]: s for s in json.loads((out / "report.json").read_text())["samples"]}
    assert {name: (s["n_crops"], s["n_unreadable"]) for name, s in samples.items()} == {
        "samples (top level)": (2, 0), "samples": (3, 1)}
    assert set(pd.read_csv(out / "predictions.csv")["sample"]) == {"samples (top level)", "samples"}
    [run] = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id)} == {"report.json", "predictions.csv",
                                                                                "report.html"}


# --------------------------------------------------------------------------- images as cameras write them, II


def test_signed_twelve_bit_two_channel_multi_page_and_gif_images_are_read_right_and_named(tmp_path, tracking):
    import tifffile

    root = make_dataset(tmp_path / "data", per_class=6)
    folder = root / "Normal_Sperm"
    rng = np.random.default_rng(5)
    signed = rng.integers(-128, 128, (30, 40), dtype=np.int8)
    signed[0, 0] = -57
    tifffile.imwrite(folder / "signed.tif", signed)
    twelve = rng.integers(0, 4096, (30, 40), dtype=np.uint16)
    twelve[0, :2] = (0, 4095)
    tifffile.imwrite(folder / "twelve.tif", twelve)
    Image.fromarray(twelve).save(folder / "twelve.png")
    tifffile.imwrite(folder / "two-channels.tif", rng.integers(0, 256, (30, 40, 2), dtype=np.uint8),
                     photometric="minisblack", planarconfig="contig")
    pages = [Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)) for _ in range(3)]
    pages[0].save(folder / "pages.tif", save_all=True, append_images=pages[1:])
    pages[1].save(folder / "animated.gif", save_all=True, append_images=pages[2:])
    (folder / "broken\nname.png").write_bytes(b"\x89PNG not really")

    pixels = np.asarray(open_image(folder / "signed.tif"))
    assert pixels[0, 0] == -57 + 128 and (pixels == signed.astype(np.int16) + 128).all()
    for name in ("twelve.tif", "twelve.png"):
        expected = np.rint(twelve * (255 / 4095)).astype(np.uint8)
        assert (np.asarray(open_image(folder / name)) == expected).all(), name

    result = invoke(["explore", str(root), "--experiment", tracking])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for expected in ("signed 8-bit pixels shifted by 128 to 0-255: Normal_Sperm/signed.tif",
                     "12-bit values in a 16-bit image, scaled by 12 bits: Normal_Sperm/twelve.tif",
                     "12-bit values in a 16-bit image, scaled by 12 bits: Normal_Sperm/twelve.png",
                     "the first of its 2 channels is used: Normal_Sperm/two-channels.tif",
                     "the first of its 3 pages is used: Normal_Sperm/pages.tif",
                     "the first of its 2 frames is used: Normal_Sperm/animated.gif"):
        assert expected in lines, result.output
    assert any(line.startswith("skipped Normal_Sperm/broken\\nname.png: ") for line in lines), result.output
    assert ["Normal_Sperm", "12"] in [line.split() for line in lines], result.output  # 6 + 6 new, the broken one skipped
