"""Training through a real `mlflow server`: what a run records, the servable model, reproducibility, bad flags."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from smids_ml.config import TrainConfig, config_from_options
from smids_ml.data import normalize, open_image, prepare_image
from smids_ml.engine import cpu_has_native_bf16, make_mix, resolve_precision
from smids_ml.train import main as train_command
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


@pytest.mark.parametrize("pairs", ["any", "class"])
def test_mixup_blends_the_training_batches_reproducibly(tracking, synth_data, pairs):
    cfg = TrainConfig(data=str(synth_data), **TINY, mixup=0.4, mixup_pairs=pairs).validate()
    first = train(cfg, experiment=tracking).history.epochs
    second = train(cfg, experiment=tracking).history.epochs
    plain = train(cfg.replace(mixup=0.0), experiment=tracking).history.epochs
    assert [e["train_loss"] for e in first] == [e["train_loss"] for e in second]
    assert all(np.isfinite(e["train_loss"]) for e in first)
    assert first[0]["train_loss"] != plain[0]["train_loss"]  # same seed, same batches: only the blending differs


def test_intra_class_mixup_blends_only_images_of_one_class_and_keeps_their_labels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1, 0, 3])  # class 3 has one image: it is blended with itself
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4) + torch.rand(10, 1, 4, 4) * 0.1
    mixed, soft = make_mix(0.4, "class", 4)(images, labels)
    assert torch.equal(soft, torch.nn.functional.one_hot(labels, 4).float())
    assert torch.equal(mixed.round(), labels.float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4))  # no class leaks in
    assert not torch.allclose(mixed[labels != 3], images[labels != 3])  # yet they are blended


def test_ema_keeps_and_validates_the_averaged_weights_without_changing_training(tracking, synth_data):
    cfg = TrainConfig(data=str(synth_data), **{**TINY, "valid_frac": 0.0}).validate()

    def floats(result):
        return [t for t in result.network.state_dict().values() if t.is_floating_point()]

    plain = train(cfg, experiment=tracking)
    averaged = train(cfg.replace(ema=0.5), experiment=tracking)
    nearly_raw = train(cfg.replace(ema=1e-9), experiment=tracking)
    losses = [[e["train_loss"] for e in r.history.epochs] for r in (plain, averaged, nearly_raw)]
    assert losses[0] == losses[1] == losses[2]  # the average only watches the weights
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(floats(plain), floats(nearly_raw)))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(floats(plain), floats(averaged)))
    validated = cfg.replace(valid_frac=0.15)
    plain, averaged = train(validated, experiment=tracking), train(validated.replace(ema=0.5), experiment=tracking)
    assert [e["train_loss"] for e in plain.history.epochs] == [e["train_loss"] for e in averaged.history.epochs]
    assert [e["valid_loss"] for e in plain.history.epochs] != [e["valid_loss"] for e in averaged.history.epochs]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--dropout-rate", "1.0"], "--dropout-rate must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--width", "2"], "--width must be at least 4"),
    (["--mixup", "-0.2"], "--mixup must be 0 or more"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--valid-frac", "0", "--patience", "3"], "--patience 3 needs a validation split"),
    (["--augment-strength", "5"], "--augment-strength must be in [0, 5)"),
    (["--scale-shift", "0.2", "--augment-strength", "3"], "--scale-shift times --augment-strength must stay below 0.5"),
])
def test_bad_values_fail_before_any_run(tracking, synth_data, flags, message):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *flags])
    assert_one_line_error(result, message)
    assert mlflow.get_experiment_by_name(tracking) is None


@pytest.mark.parametrize("flags", [["--model", "vgg99"], ["--optimizer", "RMSprop"], ["--channels", "2"]])
def test_unknown_choices_are_usage_errors(tracking, synth_data, flags):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *flags])
    assert_one_line_error(result, flags[0])
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


def config_of(args: list[str]) -> TrainConfig:
    """The config `train ARGS` would run with (parsed by the real command)."""
    with train_command.make_context("train", args) as context:
        return config_from_options(dict(context.params))


def test_tune_carves_a_validation_split_unless_a_preset_or_flag_says_otherwise(monkeypatch):
    from smids_ml.config import TUNE_DEFAULTS
    from smids_ml.tune import main as tune_command

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    def tune_config(args):
        with tune_command.make_context("tune", args) as context:
            return config_from_options(dict(context.params), TUNE_DEFAULTS)

    assert config_of([]).valid_frac == 0 and tune_config([]).valid_frac == 0.15
    assert tune_config(["--preset", "original"]).valid_frac == 0.09
    assert tune_config(["--valid-frac", "0.2"]).valid_frac == 0.2


def test_presets_set_a_recipe_and_explicit_flags_override_it(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert config_of([]) == TrainConfig()
    original = config_of(["--preset", "original"])
    assert (original.channels, original.resize, original.image_size, original.model, original.optimizer,
            original.lr, original.scheduler, original.rotation, original.scale_shift, original.monitor) == \
        (1, "stretch", 112, "improved_cnn", "Adam", 1e-4, "cosine", 30.0, 0.0, "valid_acc")
    # an explicit flag wins, even one equal to the default recipe's value
    mixed = config_of(["--preset", "original", "--channels", "3", "--lr", "0.002"])
    assert (mixed.channels, mixed.lr, mixed.resize, mixed.preset) == (3, 0.002, "stretch", "original")
    assert_one_line_error(invoke(["train", "--preset", "fancy"]), "--preset")


def test_mlflow_run_with_a_preset_logs_the_values_that_trained(tracking, synth_data):
    mlflow_run("train", tracking, {**TINY, "data": synth_data, "preset": "original"}, ROOT)
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    # mlflow run logged every -P default; the preset's values are what trained, and are logged beside them
    assert run["params.preset"] == "original" and run["params.channels"] == "0"
    assert run["params.effective_channels"] == "1" and run["params.effective_resize"] == "stretch"
    assert run["params.image_size"] == "32" and "params.effective_image_size" not in run  # explicit -P wins
    config = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run["run_id"],
                                                                 artifact_path="config.json")).read_text())
    assert (config["channels"], config["rotation"], config["image_size"]) == (1, 30.0, 32)


def test_a_run_off_a_terminal_prints_one_line_per_epoch(tracking, synth_data):
    """stderr is a pipe here, as in a log file, CI or nohup: each epoch must still show."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 3}.items()]
    done = subprocess.run([sys.executable, "-m", "smids_ml.train", "--data", str(synth_data), "--experiment",
                           tracking, *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("valid_acc" in line and "train_loss" in line for line in lines)


def test_without_a_validation_split_the_schedule_runs_out_and_the_last_epoch_is_kept(tracking, synth_data):
    """--valid-frac 0: those images train too; nothing is selected on validation, so the last epoch is kept."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 3, "valid_frac": 0}.items()]
    done = subprocess.run([sys.executable, "-m", "smids_ml.train", "--data", str(synth_data), "--experiment",
                           tracking, *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and all("train_acc" in line and "valid" not in line for line in lines)
    assert "kept the last epoch (3; no validation split)" in done.stdout
    run = mlflow.search_runs(experiment_names=[tracking], output_format="list")[0]
    assert run.data.params["n_valid"] == "0" and run.data.params["best_epoch"] == "3"
    assert int(run.data.params["n_train"]) + int(run.data.params["n_test"]) == 36
    assert not any(key.startswith("valid_") for key in run.data.metrics)
    manifest = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="manifest.csv"))
    assert "valid" not in set(pd.read_csv(manifest)["split"])
    # the manifest is reused as it is with --valid-frac 0, and refused where validation is expected
    reuse = ["train", "--data", str(synth_data), "--experiment", tracking, "--split-manifest", str(manifest), *flags]
    again = invoke(reuse)
    assert again.exit_code == 0, again.output
    refused = invoke([*reuse, "--valid-frac", "0.15"])
    assert_one_line_error(refused, str(manifest), "has no valid rows")


def test_bf16_precision_trains_on_the_cpu_and_auto_picks_by_device(tracking, synth_data):
    cfg = TrainConfig(data=str(synth_data), **TINY, precision="bf16").validate()
    history = train(cfg, experiment=tracking).history
    assert all(np.isfinite(epoch["train_loss"]) for epoch in history.epochs)
    assert resolve_precision("auto", torch.device("cpu"), "improved_cnn") == "fp32"
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu"), "smids_resnet") == native
    assert resolve_precision("auto", torch.device("cuda"), "smids_resnet") == "bf16"
    assert resolve_precision("fp32", torch.device("cuda"), "resnet18") == "fp32"


def start_training(tracking, synth_data) -> tuple[subprocess.Popen, str]:
    """A long training in a subprocess, once its run has logged an epoch; (process, run id)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 500}.items()]
    process = subprocess.Popen([sys.executable, "-m", "smids_ml.train", "--data", str(synth_data), "--experiment",
                                tracking, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = mlflow.search_runs(experiment_names=[tracking], output_format="list")
        if runs and runs[0].data.metrics.get("valid_f1") is not None:
            return process, runs[0].info.run_id
        assert process.poll() is None, process.communicate()
        time.sleep(0.3)
    process.kill()
    raise AssertionError("the training logged no epoch within 120 s")


def test_sigterm_ends_a_training_like_ctrl_c(tracking, synth_data):
    process, run_id = start_training(tracking, synth_data)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Error: interrupted: the run is marked FAILED" in err
    assert "Traceback" not in err
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def test_runs_fix_stale_fails_a_killed_trainings_run(tracking, synth_data):
    process, run_id = start_training(tracking, synth_data)
    process.kill()
    process.communicate(timeout=30)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    listed = invoke(["runs"])
    assert run_id in listed.output and "--fix-stale" in listed.output
    fixed = invoke(["runs", "--fix-stale"])
    assert fixed.exit_code == 0 and "stale run(s) FAILED" in fixed.output, fixed.output
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    assert invoke(["runs", "--fix-stale"]).output.count(run_id) == 0  # nothing RUNNING of ours is left
