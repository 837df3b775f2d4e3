"""`smids-ml evaluate` and `compare` end to end against the session's real MLflow server."""

from __future__ import annotations

import shutil
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support, roc_auc_score

from smids_ml.evaluate import HEADLINE, compare, main
from tests.helpers import assert_one_line_error, mlflow_run

ALIAS = "models:/tiny@champion"
FILES = {"manifest.csv", "predictions.csv", "plots/confusion_matrix.png", "plots/confusion_matrix_normalized.png",
         "plots/roc_curves.png", "plots/reliability_diagram.png", "plots/misclassified.png"}


def artifacts(run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in MlflowClient().list_artifacts(run_id, path):
        out |= artifacts(run_id, item.path) if item.is_dir else {item.path}
    return out


def read_csv(run_id: str, path: str, tmp_path) -> pd.DataFrame:
    where = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))
    return pd.read_csv(where)


@pytest.fixture(scope="module")
def evaluations(trained_model, mlflow_server):
    """The registered version evaluated, then the same version through its alias, each through the CLI."""
    experiment = f"evaluate-{time.time_ns()}"
    out = {"experiment": experiment}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)
        for key, uri in (("version", trained_model["uri"]), ("alias", ALIAS)):
            result = CliRunner().invoke(main, [uri, "--experiment", experiment])
            assert result.exit_code == 0, result.output
            [run] = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                       filter_string=f"tags.evaluated_model_uri = '{uri}'")
            out[key], out[f"{key}_output"] = run, result.output
    return out


def test_evaluate_logs_metrics_figures_and_predictions_that_sklearn_confirms(evaluations, trained_model, tmp_path):
    run = evaluations["version"]
    classes = trained_model["result"].dataset.classes
    assert run.data.tags["evaluated_model_uri"] == trained_model["uri"]
    assert run.data.tags["training_run_id"] == trained_model["result"].run_id
    assert FILES <= artifacts(run.info.run_id)
    metrics = run.data.metrics
    per_class = {f"test_{kind}_{c}" for kind in ("precision", "recall", "f1", "roc_auc") for c in classes}
    expected = {f"test_{m}" for m in HEADLINE} | per_class
    assert expected <= set(metrics)
    assert "test_accuracy" in evaluations["version_output"] and "Normal_Sperm" in evaluations["version_output"]

    frame = read_csv(run.info.run_id, "predictions.csv", tmp_path)
    assert list(frame.columns) == ["path", "label", "predicted", "confidence", *classes, "correct"]
    probs = frame[classes].to_numpy()
    targets = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    assert (frame["predicted"] == np.array(classes)[probs.argmax(1)]).all()
    assert np.allclose(frame["confidence"], probs.max(1))
    assert (frame["correct"] == (frame["label"] == frame["predicted"])).all()

    precision, recall, f1, _ = precision_recall_fscore_support(frame["label"], frame["predicted"], labels=classes,
                                                               zero_division=0)
    independent = {"test_accuracy": accuracy_score(frame["label"], frame["predicted"]),
                   "test_precision_macro": precision.mean(), "test_recall_macro": recall.mean(),
                   "test_f1_macro": f1.mean(), "test_log_loss": log_loss(targets, probs, labels=[0, 1, 2]),
                   "test_roc_auc_macro": roc_auc_score(targets, probs, multi_class="ovr", labels=[0, 1, 2])}
    for k, name in enumerate(classes):
        independent[f"test_f1_{name}"] = f1[k]
        independent[f"test_roc_auc_{name}"] = roc_auc_score(targets == k, probs[:, k])
    confidence, correct = probs.max(1), frame["correct"].to_numpy()
    bins = np.minimum((np.ceil(confidence * 15) - 1).clip(0), 14)  # (lower, upper] bins of width 1/15
    independent["test_ece"] = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                                  for b in np.unique(bins))
    for name, value in independent.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    for name in ("accuracy", "f1_macro"):
        low, value, high = (metrics[f"test_{name}{end}"] for end in ("_ci_low", "", "_ci_high"))
        assert 0 <= low <= value <= high <= 1


def test_default_split_is_the_training_runs_test_split(evaluations, trained_model, tmp_path):
    training = read_csv(trained_model["result"].run_id, "manifest.csv", tmp_path / "training")
    predictions = read_csv(evaluations["version"].info.run_id, "predictions.csv", tmp_path / "evaluation")
    evaluated = set(predictions["path"])
    assert evaluated == set(training.loc[training["split"] == "test", "path"])
    assert evaluated.isdisjoint(training.loc[training["split"] != "test", "path"])  # nothing it was tuned on


def test_evaluating_by_alias_tags_the_registered_version(evaluations, trained_model):
    run = evaluations["alias"]
    assert run.data.tags["evaluated_model"] == trained_model["uri"]  # the alias resolved to its version
    tags = MlflowClient().get_model_version("tiny", trained_model["version"]).tags
    assert tags["test_evaluation_run_id"] == run.info.run_id
    assert float(tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-4)
    assert float(tags["test_f1_macro"]) == pytest.approx(run.data.metrics["test_f1_macro"], abs=1e-4)


def test_compare_tabulates_latest_evaluations(evaluations, trained_model, tracking, tmp_path):
    never = f"runs:/{trained_model['result'].run_id}/model"
    output = tmp_path / "compare.csv"
    result = CliRunner().invoke(compare, [trained_model["uri"], ALIAS, never, "--output", str(output)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(output)
    assert list(table["model"]) == [trained_model["uri"], ALIAS, never]
    latest = evaluations["alias"]  # both URIs name the same version; the alias was evaluated last
    for row in table.head(2).itertuples():
        assert row.evaluation_run == latest.info.run_id
        assert row.test_accuracy == pytest.approx(latest.data.metrics["test_accuracy"])
        assert row.test_f1_macro == pytest.approx(latest.data.metrics["test_f1_macro"])
    assert table.loc[2, "evaluation_run"] == f"not evaluated yet: run smids-ml evaluate {never}"
    assert "not evaluated yet" in result.output


def test_changed_image_is_refused_in_one_line(trained_model, synth_data, tracking, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    test_image = copy / trained_model["result"].dataset.part("test")["path"].iloc[0]
    with Image.open(test_image) as image:
        changed = image.convert("RGB")
    changed.putpixel((0, 0), tuple(255 - v for v in changed.getpixel((0, 0))))
    changed.save(test_image)
    result = CliRunner().invoke(main, [trained_model["uri"], "--data", str(copy), "--experiment", tracking])
    assert_one_line_error(result, str(test_image), "changed since manifest")
    assert not mlflow.search_runs(experiment_names=[tracking], output_format="list")  # refused before any run


@pytest.mark.parametrize("case, fragment", [("unknown model", "unknown model models:/no-such-model/1"),
                                            ("missing data root", "does not exist")])
def test_bad_input_is_one_error_line(case, fragment, trained_model, tracking, tmp_path):
    args = {"unknown model": ["models:/no-such-model/1"],
            "missing data root": [trained_model["uri"], "--data", str(tmp_path / "missing")]}[case]
    assert_one_line_error(CliRunner().invoke(main, [*args, "--experiment", tracking]), fragment)


def test_mlflow_run_evaluate_attaches_to_the_run_it_created(trained_model, tracking, tmp_path):
    mlflow_run("evaluate", tracking, {"model_uri": trained_model["uri"]}, tmp_path)
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name(tracking).experiment_id])
    assert run.data.tags["evaluated_model"] == trained_model["uri"] and "test_accuracy" in run.data.metrics
