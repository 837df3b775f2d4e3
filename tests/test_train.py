"""Training through a real `mlflow server`: what a run records, the servable model, reproducibility, bad flags."""

from __future__ import annotations

import base64
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from smids_ml.config import TrainConfig
from smids_ml.data import normalize, open_image, prepare_image
from smids_ml.train import train
from tests.conftest import ROOT, TINY
from tests.helpers import assert_one_line_error, invoke, mlflow_run

EPOCH_METRICS = ["train_loss", "train_acc", "valid_loss", "valid_acc", "valid_f1", "valid_precision",
                 "valid_recall", "lr", "epoch_seconds", "images_per_second"]


def test_a_run_records_params_epoch_metrics_and_artifacts(trained_model):
    client = MlflowClient(trained_model["tracking_uri"])
    run = client.get_run(trained_model["result"].run_id)
    params = run.data.params
    for key, value in trained_model["config"].to_dict().items():
        assert params[key] == ("" if value is None else str(value)), key
    for key in ("data_fingerprint", "num_parameters", "n_train", "n_valid", "n_test", "classes", "best_epoch",
                "count_Normal_Sperm", "class_names"):
        assert key in params, key
    assert int(params["n_train"]) + int(params["n_valid"]) + int(params["n_test"]) == 36
    assert run.data.tags["version.torch"].startswith("2.14")
    for metric in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    assert "best_valid_f1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"history.csv", "manifest.csv", "config.json", "plots/training_curves.png",
            "plots/valid_confusion_matrix.png"} <= artifacts
    history = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="history.csv"))
    assert list(history["epoch"]) == [1, 2] and set(EPOCH_METRICS) <= set(history.columns)
    config = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.json"))
    assert config["image_size"] == TINY["image_size"]


def test_registered_model_loads_by_version_and_alias_and_matches_the_network(trained_model, synth_data):
    result, cfg = trained_model["result"], trained_model["config"]
    files = sorted(synth_data.rglob("*.bmp"))[:3] + sorted(synth_data.rglob("*.bmp"))[-2:]
    payload = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    batch = torch.stack([prepare_image(open_image(f), cfg.image_size, cfg.channels, cfg.resize) for f in files])
    network = result.network.cpu().eval()
    with torch.no_grad():
        expected = torch.softmax(network(normalize(batch)), 1).numpy()
    for uri in (f"models:/tiny/{result.version}", "models:/tiny@champion"):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(payload)
        assert list(out.columns) == ["label", "confidence", *result.dataset.classes]
        np.testing.assert_allclose(out[result.dataset.classes].to_numpy(), expected, atol=1e-6)
        assert list(out["label"]) == [result.dataset.classes[i] for i in expected.argmax(1)]
    version = MlflowClient().get_model_version("tiny", result.version)
    assert version.run_id == result.run_id
    signature = mlflow.models.get_model_info(f"models:/tiny/{result.version}").signature
    assert signature.inputs.input_names() == ["image"]


def test_same_seed_gives_the_same_metrics(tracking, synth_data):
    cfg = TrainConfig(data=str(synth_data), **TINY).validate()
    first = train(cfg, experiment=tracking).history.epochs
    second = train(cfg, experiment=tracking).history.epochs
    for a, b in zip(first, second):
        for key in ("train_loss", "valid_loss", "valid_acc", "valid_f1"):
            assert a[key] == b[key], key
    other = train(cfg.replace(seed=7), experiment=tracking).history.epochs
    assert other[-1]["train_loss"] != first[-1]["train_loss"]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--dropout-rate", "1.0"], "--dropout-rate must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--batch", "0"], "--batch must be at least 1"),
])
def test_bad_values_fail_before_any_run(tracking, synth_data, flags, message):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *flags])
    assert_one_line_error(result, message)
    assert mlflow.get_experiment_by_name(tracking) is None


@pytest.mark.parametrize("flags", [["--model", "vgg99"], ["--optimizer", "RMSprop"], ["--channels", "2"]])
def test_unknown_choices_are_usage_errors(tracking, synth_data, flags):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *flags])
    assert_one_line_error(result, flags[0], exit_code=2)
    assert mlflow.get_experiment_by_name(tracking) is None


def test_mlflow_run_train_attaches_to_the_run_it_created(tracking, synth_data):
    mlflow_run("train", tracking, {**TINY, "data": synth_data, "augment": "no"}, ROOT)
    runs = mlflow.search_runs(experiment_names=[tracking])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.augment"] == "no" and run["params.epochs"] == "2"
    assert run["metrics.valid_acc"] >= 0 and run["params.best_epoch"] in ("1", "2")
    assert len(MlflowClient().get_metric_history(run["run_id"], "valid_f1")) == 2
