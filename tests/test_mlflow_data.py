"""MLflow knows the data: every run logs its data set as a dataset input (name, pixel-hash digest, source,
context), and every experiment the project creates opens on its training runs in MLflow 3's UI."""

from __future__ import annotations

import json

import mlflow
from mlflow import MlflowClient

from smids_ml.config import TrainConfig
from smids_ml.cv import cross_validate
from tests.conftest import TINY
from tests.helpers import invoke

KIND = ("mlflow.experimentKind", "custom_model_development")


def dataset_input(run):
    [entry] = run.inputs.dataset_inputs
    return entry.dataset, {tag.key: tag.value for tag in entry.tags}


def test_cv_runs_log_the_table_they_trained_on_and_its_digest(tracking, synth_table):
    table = synth_table / "labels.csv"
    cfg = TrainConfig(data=str(synth_table), labels=str(table), label_column="debris", **{**TINY, "valid_frac": 0})
    result = cross_validate(cfg.validate(), folds=2, experiment=tracking)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking)
    assert experiment.tags.get(KIND[0]) == KIND[1]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    for run in runs:  # the parent (every image) and each fold (its own split): digest = the data fingerprint
        dataset, tags = dataset_input(run)
        assert dataset.name == "synth-table/labels.csv:debris" and tags["mlflow.data.context"] == "train"
        assert json.loads(dataset.source) == {"uri": str(table.resolve())}
        assert json.loads(dataset.profile)["num_rows"] == 36
        if run.info.run_id != result.run_id:
            assert dataset.digest == run.data.params["data_fingerprint"]


def test_train_and_tune_tag_their_experiments_and_a_training_run_names_its_folder(tracking, synth_data, tmp_path):
    train = invoke(["train", "--data", str(synth_data), "--experiment", f"{tracking}-train", "--epochs", "1",
                    *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"]])
    assert train.exit_code == 0, train.output
    space = tmp_path / "one.yaml"
    space.write_text("params:\n  lr: [0.001]\n")
    tune = invoke(["tune", "--data", str(synth_data), "--experiment", f"{tracking}-tune", "--sampler", "grid",
                   "--space", str(space), "--storage", str(tmp_path / "optuna.journal"), "--epochs", "1",
                   "--image-size", "32", "--batch", "16", "--num-threads", "1", "--finalists", "0", "--register-as", ""])
    assert tune.exit_code == 0, tune.output
    client = MlflowClient()
    for name in (f"{tracking}-train", f"{tracking}-tune"):
        assert client.get_experiment_by_name(name).tags.get(KIND[0]) == KIND[1], name
    [run] = mlflow.search_runs(experiment_names=[f"{tracking}-train"], output_format="list")
    run = client.get_run(run.info.run_id)
    dataset, tags = dataset_input(run)
    assert dataset.name == synth_data.name and dataset.digest == run.data.params["data_fingerprint"]
    assert tags["mlflow.data.context"] == "train"


def test_the_runs_page_shows_the_dataset_column_filled(tracking, mlflow_server, synth_table):
    """What a user sees in `mlflow ui`: the experiment's training runs, whose Dataset column names the table and its
    label column. (Opened at the experiment's root, MLflow 3.17's UI still showed its GenAI overview in this
    headless browser despite the experiment's kind tag, so the runs page is opened directly.)"""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    result = invoke(["train", "--data", str(synth_table), "--labels", str(synth_table / "labels.csv"),
                     "--label-column", "debris", "--experiment", tracking, "--epochs", "1",
                     *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"]])
    assert result.exit_code == 0, result.output
    experiment = MlflowClient().get_experiment_by_name(tracking)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs")
        WebDriverWait(driver, 90).until(lambda d: "synth-table/labels.csv:debris" in d.find_element("tag name", "body").text)
        text = driver.find_element("tag name", "body").text
    finally:
        driver.quit()
    assert "Training runs" in text and "Dataset" in text
