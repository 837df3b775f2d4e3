"""The per-sample report, its statistics, the Grad-CAM overlays and the HTML page in a real headless Chromium."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from smids_ml.data import SMIDS_CLASSES
from smids_ml.explain import activation_maps
from smids_ml.models import D4Average, build
from smids_ml.report import Roles, adjust, rates, sample_figures, wilson
from tests.helpers import assert_one_line_error, chromium, console_errors, invoke, mlflow_run, not_blank

ABNORMAL, NON_SPERM, NORMAL = SMIDS_CLASSES


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson(20, 200)  # 10% of 200 crops
    assert (round(100 * low, 1), round(100 * high, 1)) == (6.6, 14.9)
    assert wilson(0, 12)[0] == 0.0 and wilson(12, 12)[1] == 1.0


def test_adjusted_share_recovers_a_known_mix_better_than_the_raw_count():
    """A sample with 10% normal forms among its cells, classified by a model that calls 15% of abnormal cells
    normal: the raw count is inflated, the estimate corrected by the model's (independently measured)
    confusion matrix lands near the truth."""
    rng = np.random.default_rng(0)
    classes = list(SMIDS_CLASSES)
    biased = np.array([[0.80, 0.05, 0.15],   # true abnormal: 15% called normal
                       [0.05, 0.90, 0.05],
                       [0.10, 0.02, 0.88]])

    def classify(true_counts):
        truth = np.repeat(np.arange(3), true_counts)
        return np.array([rng.choice(3, p=biased[t]) for t in truth]), truth

    predicted, truth = classify([2700, 1700, 300])  # cells: 2,700 abnormal, 300 normal (10%); 1,700 not sperm
    eval_predicted, eval_truth = classify([1000, 1000, 1000])
    counts = np.zeros((3, 3))
    np.add.at(counts, (eval_truth, eval_predicted), 1)
    from smids_ml.report import Adjustment

    figures = sample_figures(pd.Series([classes[i] for i in predicted]), classes, Roles.infer(classes),
                             Adjustment("test", counts), np.random.default_rng(1))
    true_share = 60 / 600
    assert figures["normal_fraction"] > true_share + 0.1  # the bias: about 22% counted
    assert abs(figures["normal_fraction_adjusted"] - true_share) < 0.03
    assert abs(figures["normal_fraction_adjusted"] - true_share) < abs(figures["normal_fraction"] - true_share) / 3
    low, high = figures["normal_fraction_adjusted_ci"]
    assert low <= true_share <= high and low <= figures["normal_fraction_adjusted"] <= high
    low, high = figures["normal_fraction_ci"]
    assert low <= figures["normal_fraction"] <= high


def test_adjust_inverts_the_confusion_exactly_on_exact_counts():
    confusion = rates(np.array([[8, 1, 1], [0, 9, 1], [2, 0, 8]]))
    truth = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(adjust(confusion.T @ truth, confusion), truth, atol=1e-6)


def test_roles_come_from_the_class_names():
    assert Roles.infer(list(SMIDS_CLASSES)) == Roles(NORMAL, [NON_SPERM])
    assert Roles.infer(["Abnormal", "Non_Sperm", "normal"]) == Roles("normal", ["Non_Sperm"])
    assert Roles.infer(["head_defect", "tail_defect"]).normal is None  # other data sets: class shares only
    assert Roles.infer(["a", "b"], normal="b").normal == "b"


# --------------------------------------------------------------------------- overlays


def test_grad_cam_of_a_test_time_averaging_network_turns_with_the_crop():
    """D4 averaging explains the averaged prediction: the map of a crop turned by 90° (or mirrored) is the map
    of the crop, turned (or mirrored) the same way; and two different crops get different maps."""
    torch.manual_seed(0)
    network = D4Average(build("smids_resnet", 3, 3, 0.0, 32, width=8))
    for module in network.modules():  # a trained network's block outputs are not zero
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 2])
    maps = torch.from_numpy(activation_maps([network], crops, targets))
    turned = torch.from_numpy(activation_maps([network], torch.rot90(crops, 1, (2, 3)), targets))
    mirrored = torch.from_numpy(activation_maps([network], crops.flip(3), targets))
    torch.testing.assert_close(turned, torch.rot90(maps, 1, (1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(mirrored, maps.flip(2), atol=1e-4, rtol=0)
    assert maps.amax() == pytest.approx(1.0) and maps.amin() >= 0
    assert (maps[0] - maps[1]).abs().max() > 0.1


@pytest.fixture(scope="module")
def model(trained_model, synth_data):
    """A tiny smids_resnet that averages the 8 orientations, registered, beside the session's study CNN."""
    from smids_ml.config import TrainConfig
    from smids_ml.train import train

    mlflow.set_tracking_uri(trained_model["tracking_uri"])
    cfg = TrainConfig(data=str(synth_data), image_size=32, epochs=2, batch=16, width=8, tta="d4", num_threads=1)
    result = train(cfg.validate(), experiment="report-model", register_as="report-tiny")
    return f"models:/report-tiny/{result.version}"


def test_predict_explain_writes_one_overlay_per_crop_at_its_size(model, synth_data, tmp_path):
    crops = sorted((synth_data / ABNORMAL).iterdir())[:3] + sorted((synth_data / NORMAL).iterdir())[:2]
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for i, crop in enumerate(crops):
        shutil.copy(crop, inputs / ("sub" if i == 4 else "") / f"crop{min(i, 3)}.bmp")  # two files named crop3
    result = invoke(["predict", model, str(inputs), "--explain", str(tmp_path / "overlays")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert written == ["crop0.png", "crop1.png", "crop2.png", "crop3-2.png", "crop3.png"]
    for name, crop in [("crop0.png", crops[0]), ("crop1.png", crops[1])]:
        assert Image.open(tmp_path / "overlays" / name).size == Image.open(crop).size
    first, second = (np.asarray(Image.open(tmp_path / "overlays" / n), dtype=float) for n in ("crop0.png", "crop1.png"))
    assert first.shape != second.shape or np.abs(first - second).mean() > 1
    plain = np.asarray(Image.open(crops[0]).convert("RGB"), dtype=float)
    assert np.abs(first - plain).mean() > 5  # the map is drawn over the crop


# --------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def samples(synth_data, tmp_path_factory):
    """Two samples as sub-folders (one with a sub-folder of its own) and two crops lying directly in the root."""
    root = tmp_path_factory.mktemp("samples")
    for name, per_class in (("patient-a", {ABNORMAL: 4, NON_SPERM: 2, NORMAL: 2}), ("patient-b", {NORMAL: 3, ABNORMAL: 1})):
        for label, count in per_class.items():
            for i, crop in enumerate(sorted((synth_data / label).iterdir())[:count]):
                where = root / name / ("deeper" if i == 0 else "")
                where.mkdir(parents=True, exist_ok=True)
                shutil.copy(crop, where / f"{label}-{i}.bmp")
    for i, crop in enumerate(sorted((synth_data / NORMAL).iterdir())[:2]):
        shutil.copy(crop, root / f"loose-{i}.bmp")
    (root / "patient-b" / "broken.bmp").write_bytes(b"BM" + bytes(20))  # unreadable: listed, not counted
    return root


@pytest.fixture(scope="module")
def evaluation_run(model, trained_model):
    """An evaluation run of the model whose predictions.csv states a known, invertible confusion matrix."""
    rows = [(t, p) for t, p, n in [(ABNORMAL, ABNORMAL, 8), (ABNORMAL, NORMAL, 2), (NON_SPERM, NON_SPERM, 10),
                                   (NORMAL, NORMAL, 9), (NORMAL, ABNORMAL, 1)] for _ in range(n)]
    mlflow.set_experiment("report-evaluation")
    with mlflow.start_run() as run:
        mlflow.log_text(pd.DataFrame(rows, columns=["label", "predicted"]).to_csv(index=False), "predictions.csv")
    return run.info.run_id


@pytest.fixture(scope="module")
def report(model, samples, evaluation_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = invoke(["report", model, str(samples), "--out", str(out), "--evaluation-run", evaluation_run,
                     "--review-below", "0.9", "--experiment", "report-runs"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text()), result.output


def test_report_numbers_match_its_predictions(report, samples, model, evaluation_run):
    out, data, output = report
    predictions = pd.read_csv(out / "predictions.csv")
    assert {s["sample"]: s["n_crops"] for s in data["samples"]} == {samples.name: 2, "patient-a": 8, "patient-b": 4}
    assert set(predictions["sample"]) == {samples.name, "patient-a", "patient-b"}
    assert {s["sample"]: s["n_unreadable"] for s in data["samples"]} == {samples.name: 0, "patient-a": 0, "patient-b": 1}
    broken = predictions[predictions["path"].str.endswith("broken.bmp")]
    assert len(broken) == 1 and broken["error"].notna().all()
    for sample in data["samples"]:
        rows = predictions[(predictions["sample"] == sample["sample"]) & predictions["error"].isna()]
        counts = rows["label"].value_counts()
        assert sample["counts"] == {c: int(counts.get(c, 0)) for c in SMIDS_CLASSES}
        cells = len(rows) - counts.get(NON_SPERM, 0)
        assert sample["n_cells"] == cells
        if cells:
            assert sample["normal_fraction"] == pytest.approx(counts.get(NORMAL, 0) / cells)
            low, high = sample["normal_fraction_ci"]
            assert low <= sample["normal_fraction"] <= high
        if sample["normal_fraction_adjusted"] is not None:
            low, high = sample["normal_fraction_adjusted_ci"]
            assert low <= sample["normal_fraction_adjusted"] <= high
        assert sample["review"] == [{"path": p, "predicted": label, "confidence": round(c, 4)} for p, label, c in
                                    rows[rows["confidence"] < 0.9].sort_values("confidence")[["path", "label", "confidence"]]
                                    .itertuples(index=False)]
    assert data["adjustment"]["evaluation_run_id"] == evaluation_run
    assert data["adjustment"]["confusion_matrix"] == [[8, 0, 2], [0, 10, 0], [1, 0, 9]]
    assert data["model_version"] == model and data["normal_class"] == NORMAL and data["excluded_classes"] == [NON_SPERM]
    assert "WHO" in data["disclaimer"]
    assert "patient-a: 8 crops, normal among cells" in output


def test_report_is_logged_as_a_run_naming_the_model_version(report, model):
    runs = mlflow.search_runs(experiment_names=["report-runs"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["reported_model"] == model
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert names == {"report.json", "predictions.csv", "report.html"}


def test_a_flat_folder_is_one_sample_and_without_an_evaluation_the_counts_stand_alone(model, synth_data, tmp_path):
    result = invoke(["report", model, str(synth_data / NORMAL), "--out", str(tmp_path), "--evaluation-run", ""])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["sample"] for s in data["samples"]] == [NORMAL] and data["samples"][0]["n_crops"] == 12
    assert data["adjustment"] is None and "smids-ml evaluate" in data["adjustment_note"]
    assert "normal_fraction_adjusted" not in data["samples"][0]
    one = invoke(["report", model, str(synth_data), "--out", str(tmp_path / "one"), "--one-sample"])
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "one" / "report.json").read_text())["samples"][0]["n_crops"] == 36


def test_bad_report_input_is_one_line(model, tmp_path, samples):
    assert_one_line_error(invoke(["report", model, str(tmp_path / "missing")]), "missing", "no such folder")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_one_line_error(invoke(["report", model, str(tmp_path / "empty")]), "holds no image files")
    assert_one_line_error(invoke(["report", model, str(samples), "--normal-class", "Pyriform"]),
                          "--normal-class", "Pyriform", "not a class")
    assert_one_line_error(invoke(["report", model, str(samples), "--evaluation-run", "0" * 32]), "0" * 32)
    assert_one_line_error(invoke(["report", "models:/no-such-model/1", str(samples)]), "cannot load model")


def test_report_entry_point_through_mlflow_run(model, samples, evaluation_run, tracking, tmp_path):
    mlflow_run("report", tracking, {"model_uri": model, "folder": samples, "out": tmp_path / "r",
                                    "evaluation_run": evaluation_run}, cwd=tmp_path)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["adjustment"]["evaluation_run_id"] == evaluation_run


# --------------------------------------------------------------------------- in a real browser


def test_report_page_renders_in_headless_chromium(report, tmp_path):
    """The page loads without console errors, every inline image decodes, the headline figures are in its text,
    and a screenshot is not blank."""
    out, data, _ = report
    with chromium() as driver:
        driver.get((out / "report.html").as_uri())
        text = driver.find_element("tag name", "body").text
        loaded = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        errors = console_errors(driver)
        driver.save_screenshot(str(tmp_path / "page.png"))
    assert errors == []
    assert loaded and all(loaded)
    for sample in data["samples"]:
        assert sample["sample"] in text
        if sample["normal_fraction"] is not None:  # a sample the tiny model calls all Non-Sperm has none
            assert f"{100 * sample['normal_fraction']:.1f}%" in text
    assert not_blank(tmp_path / "page.png")
