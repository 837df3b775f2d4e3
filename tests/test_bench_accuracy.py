"""The accuracy benchmark's ensemble rows are honest: no held-out image was trained or selected on by
a member, each held-out part is scored once, and the table says what it measured."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from benchmarks.bench_accuracy import EXPERIMENT, main
from tests.conftest import TINY
from tests.helpers import grey_imbalanced_set

RECIPE = "default+" + "+".join(f"{k}={v}" for k, v in {**TINY, "valid_frac": 0.0}.items())


def artifact(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name))


@pytest.mark.parametrize("members_of", ["folds", "seeds"])
def test_nested_ensemble_rows_hold_out_each_part_once_and_never_train_on_it(tracking, synth_data, members_of):
    result = CliRunner().invoke(main, ["--data", str(synth_data), "--recipes", RECIPE, "--folds", "3", "--no-cv",
                                       "--ensemble-of", members_of, "--members", "2", "--outer-folds", "2"])
    assert result.exit_code == 0, result.output
    assert f"{RECIPE}: 2-model ensemble (mean of probabilities), 2 held-out parts of 1/3 in turn" in result.output

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    names = [f"bench {RECIPE} 2-{members_of[:-1]} ensemble (held-out part {i}/3)" for i in (1, 2)]
    runs = [client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")[0] for name in names]
    held_out = []
    for run in runs:
        holdout = artifact(run.info.run_id, "holdout.csv")
        seen = artifact(run.info.run_id, "manifest.csv")  # what the members trained (and could select) on
        trained = set(seen.loc[seen["split"].isin(["train", "valid"]), "hash"])
        assert len(holdout) and not trained & set(holdout["hash"])
        assert 0 <= run.data.metrics["holdout_ensemble_accuracy"] <= 1
        assert run.data.metrics["holdout_images"] == len(holdout)
        held_out.append(set(holdout["hash"]))
    assert not held_out[0] & held_out[1]  # two different parts


def test_ensemble_of_recipes_averages_their_out_of_fold_probabilities(tracking, synth_data):
    other = RECIPE.replace("model=improved_cnn", "model=simple_cnn")
    result = CliRunner().invoke(main, ["--data", str(synth_data), "--recipes", f"{RECIPE},{other}", "--folds", "3",
                                       "--ensemble-of", "recipes"])
    assert result.exit_code == 0, result.output
    assert "ensemble of the 2 recipes (mean of their out-of-fold probabilities" in result.output

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    cv_runs = [client.search_runs([experiment], f"tags.mlflow.runName = 'bench {r} (3-fold)'")[0] for r in (RECIPE, other)]
    members = [artifact(run.info.run_id, "out_of_fold/predictions.csv").set_index("path").sort_index() for run in cv_runs]
    run = client.search_runs([experiment], f"tags.mlflow.runName = 'bench ensemble of {RECIPE} & {other} (out-of-fold)'")[0]
    ensemble = artifact(run.info.run_id, "predictions.csv").set_index("path").sort_index()
    classes = sorted(ensemble["label"].unique())
    assert ensemble.index.equals(members[0].index) and ensemble.index.is_unique  # every image, once
    assert ((members[0][classes] + members[1][classes]) / 2).sub(ensemble[classes]).abs().max().max() < 1e-6
    per_fold = [group["correct"].mean() for _, group in ensemble.groupby("fold")]
    assert len(per_fold) == 3
    assert abs(run.data.metrics["cv_ensemble_accuracy_mean"] - sum(per_fold) / 3) < 1e-9


def test_ensemble_of_recipes_needs_two_recipes_and_their_cv_rows(synth_data):
    result = CliRunner().invoke(main, ["--data", str(synth_data), "--recipes", RECIPE, "--ensemble-of", "recipes"])
    assert result.exit_code != 0
    assert "--ensemble-of recipes averages the cross-validation rows of two or more --recipes" in result.output


def test_several_data_sets_get_a_table_each_with_mcc_beside_accuracy(tracking, synth_data, tmp_path):
    grey = grey_imbalanced_set(tmp_path / "grey", synth_data, counts=(10, 6))
    # the second data set labelled by a table (paths relative to its folder), as MHSMA's labels.csv
    files = sorted(grey.rglob("*.png"))
    pd.DataFrame({"path": [f.relative_to(grey).as_posix() for f in files],
                  "kind": [f.parent.name.lower() for f in files]}).to_csv(grey / "labels.csv", index=False)
    spec = f"{grey / 'labels.csv'}:kind"
    result = CliRunner().invoke(main, ["--data", str(synth_data), "--data", spec, "--recipes",
                                       "default+epochs=2+image_size=32+model=improved_cnn", "--folds", "2", "--no-ensemble"])
    assert result.exit_code == 0, result.output
    summary = result.output[result.output.rindex(f"\n{synth_data}\n"):].splitlines()
    headers = [i for i, line in enumerate(summary) if line.startswith("recipe")]
    assert len(headers) == 2 and summary[headers[1] - 1] == spec
    for i in headers:
        assert summary[i].split()[:5] == ["recipe", "accuracy", "macro", "F1", "MCC"]
        row = summary[i + 2]
        assert row.startswith("default+epochs=2+image_size=32+model=improved_cnn (2-fold CV)")
        assert len([cell for cell in row.split("  ") if "±" in cell]) == 3  # accuracy, macro F1 and MCC over folds


def test_a_data_set_that_is_neither_a_folder_nor_a_table_is_one_line_before_anything_trains(tmp_path, synth_data):
    result = CliRunner().invoke(main, ["--data", str(synth_data), "--data", str(tmp_path / "none.csv:head")])
    assert result.exit_code == 1 and "no table of labels at" in result.output and "(2-fold CV)" not in result.output
