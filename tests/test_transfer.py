"""`--init-from`: a network trained on one class set starts another; its source is recorded; a source whose
weights cannot fit is one line before any run."""

from __future__ import annotations

import mlflow
import torch
from mlflow import MlflowClient

from smids_ml.serving import load_classifier
from tests.conftest import TINY
from tests.helpers import assert_one_line_error, invoke

# the architecture and input size are left to follow the source
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("model", "image_size")]


def test_a_three_class_model_starts_a_two_class_set_and_the_run_names_it(tracking, trained_model, synth_table):
    source = f"models:/{trained_model['name']}/{trained_model['version']}"
    result = invoke(["train", "--data", str(synth_table), "--labels", str(synth_table / "labels.csv"),
                     "--label-column", "debris", "--init-from", source, "--freeze-epochs", "1", "--backbone-lr", "0.1",
                     "--experiment", tracking, "--register-as", "debris-from-tiny", *FLAGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    version = client.get_latest_versions("debris-from-tiny")[0]
    run = client.get_run(version.run_id)
    assert run.data.params["init_from"] == source and run.data.tags["smids_ml.init_from"] == source
    assert run.data.tags["smids_ml.init_from_run"] == trained_model["result"].run_id
    assert run.data.params["model"] == "improved_cnn" and run.data.params["image_size"] == "32"  # followed
    started, original = load_classifier(f"models:/debris-from-tiny/{version.version}"), load_classifier(source)
    assert started.classes == ["no", "yes"] and len(original.classes) == 3
    # the backbone was frozen for the one epoch: its convolutions are the source's, the classifier is new
    new, old = started.networks[0].state_dict(), original.networks[0].state_dict()
    assert torch.equal(new["features.0.weight"], old["features.0.weight"])
    assert new["classifier.4.weight"].shape[0] == 2


def test_a_source_whose_channels_cannot_match_is_one_line_and_no_run(tracking, trained_model, synth_data):
    source = f"models:/{trained_model['name']}/{trained_model['version']}"
    result = invoke(["train", "--data", str(synth_data), "--init-from", source, "--channels", "1",
                     "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, f"--init-from {source}", "--channels 3", "--channels 1 cannot take its weights")
    assert mlflow.get_experiment_by_name(tracking) is None


def test_tune_from_a_source_leaves_its_architecture_out_of_the_search(tracking, trained_model, synth_data, tmp_path):
    source = f"models:/{trained_model['name']}/{trained_model['version']}"
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  model: [smids_resnet, improved_cnn]\n  lr: [0.001]\n")
    result = invoke(["tune", "--data", str(synth_data), "--init-from", source, "--experiment", tracking, "--sampler",
                     "grid", "--space", str(space), "--storage", str(tmp_path / "optuna.journal"), "--epochs", "1",
                     "--batch", "16", "--num-threads", "1", "--finalists", "0", "--register-as", ""])
    assert result.exit_code == 0, result.output
    assert f"--init-from {source} fixes model (the source's): left out of the search" in result.output
    runs = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [t.data.params["model"] for t in trials] == ["improved_cnn"]
    assert all(t.data.tags["smids_ml.init_from"] == source for t in trials)


def test_a_network_pretrained_without_labels_starts_a_classifier_and_is_no_classifier_itself(tracking, synth_data):
    result = invoke(["pretrain", str(synth_data), "--model", "improved_cnn", "--image-size", "32", "--epochs", "2",
                     "--batch", "16", "--num-threads", "1", "--experiment", tracking, "--register-as", "ssl-tiny"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    version = client.get_latest_versions("ssl-tiny")[0]
    run = client.get_run(version.run_id)
    assert run.data.tags["smids_ml.pretrained"] == "simclr" and run.data.params["class_names"] == "unlabelled"
    assert len(client.get_metric_history(run.info.run_id, "pretrain_loss")) == 2 and run.data.metrics["train_tflop"] > 0
    source = f"runs:/{run.info.run_id}/model"
    assert f"--init-from {source}" in result.output
    for command in (["predict", source, str(next(synth_data.rglob("*.bmp")))], ["evaluate", "models:/ssl-tiny/1"]):
        assert_one_line_error(invoke(command), "pretrained without labels (simclr), not a classifier", "--init-from")
    result = invoke(["train", "--data", str(synth_data), "--init-from", source, "--freeze-epochs", "1",
                     "--experiment", tracking, *FLAGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    trained = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.smids_ml.init_from != ''",
                                 output_format="list")[0]
    assert trained.data.tags["smids_ml.init_from_run"] == run.info.run_id
    assert trained.data.params["model"] == "improved_cnn" and trained.data.params["image_size"] == "32"  # followed
    new = load_classifier(f"runs:/{trained.info.run_id}/model").networks[0].state_dict()
    old = load_classifier(source, pretrained_ok=True).networks[0].state_dict()
    assert torch.equal(new["features.0.weight"], old["features.0.weight"]) and new["classifier.4.weight"].shape[0] == 3
