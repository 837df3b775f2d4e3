"""`predict` end to end against the session's registered model: files, folders, globs, videos, bad input."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from smids_ml.data import MAX_PIXELS, SMIDS_CLASSES
from smids_ml.predict import UNCERTAIN, main
from tests.helpers import assert_one_line_error

FIXED = ["path", "frame", "label", "confidence"]
COLUMNS = FIXED + list(SMIDS_CLASSES) + ["error"]


@pytest.fixture(scope="module")
def model_uri(trained_model) -> str:
    mlflow.set_tracking_uri(trained_model["tracking_uri"])
    return trained_model["uri"]


@pytest.fixture(scope="module")
def crops(synth_data, tmp_path_factory):
    """One image per class at top level and one in a sub-folder, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("crops")
    (root / "nested").mkdir()
    for i, label in enumerate(SMIDS_CLASSES):
        shutil.copy(synth_data / label / f"{label} (1).bmp", root / f"{i}.bmp")
    shutil.copy(synth_data / SMIDS_CLASSES[0] / f"{SMIDS_CLASSES[0]} (2).bmp", root / "nested" / "deep.bmp")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def video(synth_data, tmp_path_factory):
    """A 6-frame 48×48 mpeg4 clip made from synthetic crops."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = sorted((synth_data / SMIDS_CLASSES[2]).iterdir())[:6]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
        for file in frames:
            image = Image.open(file).convert("RGB").resize((48, 48))
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def check_predictions(table: pd.DataFrame) -> None:
    """Every row predicted: a class label, probabilities summing to 1, the top one as confidence."""
    assert list(table.columns) == COLUMNS
    assert table["error"].isna().all()
    assert set(table["label"]) <= set(SMIDS_CLASSES)
    probs = table[list(SMIDS_CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(table["confidence"], probs.max(1), atol=1e-6)


def test_files_folder_glob_and_video_to_csv(model_uri, synth_data, crops, video, tmp_path):
    out = tmp_path / "out.csv"
    pattern = synth_data / "**" / "*(3).bmp"
    result = run(model_uri, crops / "1.bmp", crops, pattern, video, "--every", 2, "--batch", 4, "--output", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    check_predictions(table)
    folder = [str(crops / name) for name in ("0.bmp", "1.bmp", "2.bmp", "nested/deep.bmp")]
    globbed = [str(synth_data / label / f"{label} (3).bmp") for label in SMIDS_CLASSES]
    assert list(table["path"]) == [folder[1], folder[0], *folder[2:], *globbed, *[str(video)] * 3]
    assert list(table["frame"].fillna(-1)) == [-1] * 7 + [0, 2, 4]
    header = result.stdout.splitlines()[0].split()
    assert header == COLUMNS[:-1]  # no error column when nothing failed
    assert result.stderr.strip() == f"10 predicted, 0 failed; written to {out}"


def test_json_output_and_uncertain_threshold(model_uri, crops, tmp_path):
    out = tmp_path / "new" / "folder" / "out.json"  # missing folders are created
    result = run(model_uri, crops, "--output", out, "--min-confidence", 0.99)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [list(r) for r in records] == [COLUMNS] * 4
    assert all(r["frame"] is None and r["error"] is None for r in records)
    assert all(math.isclose(sum(r[c] for c in SMIDS_CLASSES), 1, abs_tol=1e-5) for r in records)
    # a two-epoch model is never that sure: every label becomes `uncertain`, the probabilities stay
    assert [r["label"] for r in records] == [UNCERTAIN] * 4
    assert all(r["confidence"] < 0.99 for r in records)
    assert "(4 uncertain)" in result.stderr


def test_same_probabilities_as_the_pyfunc(model_uri, crops, tmp_path):
    out = tmp_path / "out.csv"
    assert run(model_uri, crops, "--output", out).exit_code == 0
    table = pd.read_csv(out)
    images = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in table["path"]]
    served = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    np.testing.assert_allclose(table[list(SMIDS_CLASSES)], served[list(SMIDS_CLASSES)], atol=1e-6)
    assert list(table["label"]) == list(served["label"])


def test_bad_inputs_get_an_error_row_and_exit_1(model_uri, crops, tmp_path):
    good = crops / "0.bmp"
    (tmp_path / "empty.png").write_bytes(b"")
    png = tmp_path / "whole.png"
    Image.open(good).save(png)
    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (tmp_path / "text.png").write_text("hello, not a png")
    (tmp_path / "text.mp4").write_text("hello, not a video")
    side = math.isqrt(MAX_PIXELS) + 1  # a real over-limit PNG: 1 bit per pixel, a few kB on disk
    Image.new("1", (side, side)).save(tmp_path / "huge.png")
    bad = {"empty.png": "empty file (0 bytes)", "truncated.png": "truncated or corrupt image",
           "text.png": "not an image", "text.mp4": "cannot decode video", "missing.png": "no such file or folder",
           "huge.png": f"{side}x{side} pixels is over the limit"}
    out = tmp_path / "out.csv"
    result = run(model_uri, *(tmp_path / name for name in bad), good, "--output", out)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"1 predicted, 6 failed; written to {out}"
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS
    failed, predicted = table.iloc[:-1], table.iloc[-1:]
    assert list(failed["path"]) == [str(tmp_path / name) for name in bad]
    for error, reason in zip(failed["error"], bad.values()):
        assert reason in error
    assert failed[["label", "confidence", *SMIDS_CLASSES]].isna().all().all()
    check_predictions(predicted)
    for name, reason in bad.items():  # the terminal table shows each error on its input's row
        assert any(line.startswith(str(tmp_path / name)) and reason in line for line in result.stdout.splitlines())


def test_bad_model_uri_is_one_line_without_traceback(model_uri, trained_model, crops):
    """A real process, so nothing is swallowed: one `Error:` line on stderr and exit status 1."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=trained_model["tracking_uri"])
    done = subprocess.run([sys.executable, "-m", "smids_ml.predict", "models:/no-such-model/1", str(crops)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("Error: cannot load model models:/no-such-model/1: ")
    assert line.endswith("Registered Model with name=no-such-model not found")
    assert done.stdout == ""


@pytest.mark.parametrize("uri, reason", [("models:/tiny/999", "version=999) not found"),
                                         ("models:/tiny@no-such-alias", "alias no-such-alias not found"),
                                         ("runs:/0123456789abcdef/model", "not found")])
def test_unloadable_model_uris(model_uri, crops, uri, reason):
    assert_one_line_error(run(uri, crops), f"cannot load model {uri}: ", reason)


def test_unknown_output_extension_is_refused_before_any_work(crops, tmp_path):
    result = run("models:/never-loaded/1", crops, "--output", tmp_path / "out.txt")
    error = assert_one_line_error(result, "out.txt: unknown format; use a .csv or .json file name")
    assert "never-loaded" not in error
    assert not (tmp_path / "out.txt").exists()


def test_a_video_in_a_folder_is_predicted_as_when_named(model_uri, video, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(video.read_bytes())
    by_folder, by_path = tmp_path / "folder.csv", tmp_path / "path.csv"
    assert run(model_uri, folder, "--every", 2, "--output", by_folder).exit_code == 0
    assert run(model_uri, folder / "clip.mp4", "--every", 2, "--output", by_path).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(by_folder), pd.read_csv(by_path))
    assert list(pd.read_csv(by_folder)["frame"]) == [0, 2, 4]
