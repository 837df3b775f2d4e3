"""`explore`: the printed summary and what it logs to MLflow, read back through MlflowClient."""

from __future__ import annotations

import shutil

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from tests.helpers import invoke, mlflow_run


def test_explore_prints_a_summary_and_logs_figures_and_tables(tracking, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "Normal_Sperm" / "broken.bmp").write_bytes(b"BM not really")
    shutil.copy(data / "Normal_Sperm" / "Normal_Sperm (1).bmp", data / "Normal_Sperm" / "again.bmp")
    result = invoke(["explore", str(data), "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert "37 readable images in 3 classes" in result.output  # 36 + the copy; not the broken file
    assert "skipped Normal_Sperm/broken.bmp" in result.output
    assert "unique resolutions; most common:" in result.output
    run_id = result.output.strip().splitlines()[-1].split()[-1]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["images"] == 37
    assert run.data.metrics["unreadable"] == 1 and run.data.metrics["duplicate_groups"] == 1
    logged = {a.path for a in client.list_artifacts(run_id, "explore")}
    assert logged == {f"explore/{name}" for name in (
        "class_counts.csv", "resolutions.csv", "check_report.csv", "duplicates.csv", "class_distribution.png",
        "top_resolutions.png", "resolution_scatter.png", "samples.png")}
    counts = pd.read_csv(download_artifacts(run_id=run_id, artifact_path="explore/class_counts.csv"))
    assert dict(zip(counts["label"], counts["images"])) == {"Abnormal_Sperm": 12, "Non-Sperm": 12, "Normal_Sperm": 13}
    resolutions = pd.read_csv(download_artifacts(run_id=run_id, artifact_path="explore/resolutions.csv"))
    assert resolutions["images"].sum() == 37 and resolutions["images"].is_monotonic_decreasing
    report = pd.read_csv(download_artifacts(run_id=run_id, artifact_path="explore/check_report.csv"))
    assert list(report["path"]) == ["Normal_Sperm/broken.bmp"]


def test_mlflow_run_explore_logs_into_the_run_it_created(tracking, synth_data, tmp_path):
    mlflow_run("explore", tracking, {"data": synth_data}, tmp_path)
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name(tracking).experiment_id])
    assert run.data.metrics["images"] == 36 and run.data.params["class_names"].count(",") == 2
    assert len(MlflowClient().list_artifacts(run.info.run_id, "explore")) == 8
