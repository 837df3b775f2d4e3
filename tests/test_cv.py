"""`smids-ml cv` end to end: one parent run, one nested run per fold, mean ± std on the parent."""

from __future__ import annotations


import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY
from tests.helpers import mlflow_run


def test_two_fold_cv_gives_a_parent_with_two_fold_runs_and_mean_std(synth_data, tracking, tmp_path):
    """Through `mlflow run . -e cv`, so the entry point and its logged -P params are exercised too."""
    done = mlflow_run("cv", tracking, {**TINY, "folds": 2, "data": synth_data}, tmp_path)
    assert "test_accuracy" in done.stdout

    # `mlflow run` created the experiment; the command marks it as model training for MLflow 3's UI
    assert mlflow.get_experiment_by_name(tracking).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    for metric in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc_macro", "log_loss", "ece"):
        values = [child.data.metrics[f"test_{metric}"] for child in children]
        assert parent.data.metrics[f"cv_test_{metric}_mean"] == pytest.approx(np.mean(values))
        assert parent.data.metrics[f"cv_test_{metric}_std"] == pytest.approx(np.std(values, ddof=1))
    assert "cv_oof_accuracy" in parent.data.metrics  # the pooled out-of-fold predictions, scored once

    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="cv_folds.csv",
                                                            dst_path=str(tmp_path)))
    assert sorted(folds["run_id"]) == sorted(child.info.run_id for child in children)
    tested = []
    for child in children:
        where = tmp_path / child.info.run_id
        manifest, predictions = (
            pd.read_csv(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=name,
                                                            dst_path=str(where)))
            for name in ("manifest.csv", "predictions.csv"))
        assert set(predictions["path"]) == set(manifest.loc[manifest["split"] == "test", "path"])
        assert (manifest["split"] == "valid").any()  # early stopping saw a part carved from the training folds
        tested += list(predictions["path"])
    assert len(tested) == len(set(tested)) == 36  # the test folds partition the 3 × 12 images


def test_without_validation_each_fold_trains_on_all_other_folds(synth_data, tracking):
    from smids_ml.config import TrainConfig
    from smids_ml.cv import cross_validate

    cfg = TrainConfig(data=str(synth_data), **{**TINY, "valid_frac": 0}).validate()
    result = cross_validate(cfg, folds=2, experiment=tracking)
    assert list(result.folds["n_valid"]) == [0, 0]
    assert list(result.folds["n_train"] + result.folds["n_test"]) == [36, 36]
    assert list(result.folds["best_epoch"]) == [TINY["epochs"]] * 2  # the last epoch, as nothing selects another
