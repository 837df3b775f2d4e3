"""Labels from a table (`--labels FILE --label-column NAME`): the same checks as class folders, one line for a
table that would make the data a lie, the table's own split, and manifests that reload against the table."""

from __future__ import annotations

import shutil

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from smids_ml import SmidsError
from smids_ml.data import build_dataset, load_manifest, write_manifest
from tests.conftest import TINY
from tests.helpers import assert_one_line_error, invoke

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def copy_table(synth_table, tmp_path, edit=None):
    """A changeable copy of the table data set; `edit` rewrites the table's text."""
    root = tmp_path / "data"
    shutil.copytree(synth_table, root)
    if edit:
        table = root / "labels.csv"
        table.write_text(edit(table.read_text()))
    return root


def test_a_table_trains_a_model_whose_classes_are_its_column(tracking, synth_table, tmp_path):
    table = synth_table / "labels.csv"
    result = invoke(["train", "--data", str(synth_table), "--labels", str(table), "--label-column", "shape",
                     "--experiment", tracking, "--register-as", "shape-model", *FLAGS])
    assert result.exit_code == 0, result.output
    assert "left out 12 row(s)" in result.output  # the non-sperm crops have no shape
    client = MlflowClient()
    version = client.get_latest_versions("shape-model")[0]
    run = client.get_run(version.run_id)
    assert run.data.params["class_names"] == "abnormal,normal"
    assert run.data.params["labels_table"] == str(table.resolve()) and run.data.params["label_column"] == "shape"
    manifest = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="manifest.csv"))
    labels = pd.read_csv(table).set_index("path")["shape"]
    assert len(manifest) == 24 and (manifest["label"] == labels[manifest["path"]].to_numpy()).all()
    # the manifest reloads against the table, and evaluate finds the table through the run
    again = invoke(["train", "--data", str(synth_table), "--labels", str(table), "--label-column", "shape",
                    "--split-manifest", str(tmp_path / "m.csv"), "--experiment", tracking, *FLAGS])
    assert again.exit_code != 0  # no such manifest yet
    manifest.to_csv(tmp_path / "m.csv", index=False)
    again = invoke(["train", "--data", str(synth_table), "--labels", str(table), "--label-column", "shape",
                    "--split-manifest", str(tmp_path / "m.csv"), "--experiment", tracking, *FLAGS, "--epochs", "1"])
    assert again.exit_code == 0, again.output
    evaluated = invoke(["evaluate", f"models:/shape-model/{version.version}", "--experiment", tracking])
    assert evaluated.exit_code == 0, evaluated.output
    assert "images of split test" in evaluated.output
    [evaluation] = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.evaluated_split = 'test'",
                                      output_format="list")
    [entry] = client.get_run(evaluation.info.run_id).inputs.dataset_inputs
    assert entry.dataset.name == "synth-table/labels.csv:shape" and {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "test"


def test_the_tables_own_split_is_honoured(synth_table):
    table = synth_table / "labels.csv"
    given = pd.read_csv(table).set_index("path")["split"]
    # train/valid only (as MHSMA): its valid rows are the test part; a validation part is carved from train
    dataset = build_dataset(synth_table, labels=table, label_column="debris", split_column="split", valid_frac=0.15)
    split = dataset.manifest.set_index("path")["split"]
    assert (split[given[given == "valid"].index] == "test").all()
    assert set(split[given[given == "train"].index]) == {"train", "valid"}
    assert dataset.classes == ["no", "yes"]


def test_a_manifest_whose_label_is_not_the_tables_is_refused(synth_table, tmp_path):
    table = synth_table / "labels.csv"
    dataset = build_dataset(synth_table, labels=table, label_column="debris", valid_frac=0)
    manifest = write_manifest(dataset, tmp_path / "manifest.csv")
    assert len(load_manifest(manifest, synth_table, labels=table, label_column="debris").manifest) == 36
    frame = pd.read_csv(manifest)
    frame.loc[3, "label"] = "yes" if frame.loc[3, "label"] == "no" else "no"
    frame.to_csv(manifest, index=False)
    with pytest.raises(SmidsError, match=r"line 5 \(images/crop_\d+\.bmp\): label .* is not the one labels table"):
        load_manifest(manifest, synth_table, labels=table, label_column="debris")


BAD_TABLES = {
    "missing file": (lambda t: t.replace("images/crop_05.bmp", "images/gone.bmp"), ["line 7", "images/gone.bmp",
                                                                                   "no such file"]),
    "outside the root": (lambda t: t.replace("images/crop_05.bmp", "../synth/x.bmp"), ["line 7", "../synth/x.bmp",
                                                                                      "leaves the data root"]),
    "absolute path": (lambda t: t.replace("images/crop_05.bmp", "/etc/passwd"), ["line 7", "/etc/passwd",
                                                                                "leaves the data root"]),
    "repeated row": (lambda t: t + t.splitlines()[3] + "\n", ["line 38", "images/crop_02.bmp", "listed twice (also line 4)"]),
    "two labels": (lambda t: t + t.splitlines()[3].replace(",no", ",yes") + "\n",
                   ["line 38", "images/crop_02.bmp", "two labels, 'no' (line 4) and 'yes'"]),
    "unknown column": (lambda t: t.replace("debris", "junk", 1), ["no column 'debris'", "path, split, shape, junk"]),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_a_bad_table_is_one_line_naming_it_and_nothing_runs(tracking, synth_table, tmp_path, case):
    edit, fragments = BAD_TABLES[case]
    root = copy_table(synth_table, tmp_path, edit)
    result = invoke(["train", "--data", str(root), "--labels", str(root / "labels.csv"), "--label-column", "debris",
                     "--experiment", tracking, *FLAGS])
    assert_one_line_error(result, f"labels table {root / 'labels.csv'}", *fragments)
    assert MlflowClient().get_experiment_by_name(tracking) is None


def test_labels_flags_go_together(synth_table):
    assert_one_line_error(invoke(["train", "--data", str(synth_table), "--labels", str(synth_table / "labels.csv")]),
                          "--labels and --label-column go together")
    assert_one_line_error(invoke(["train", "--data", str(synth_table), "--split-column", "split"]),
                          "--split-column", "give --labels")


def test_explore_reads_a_table(tracking, synth_table):
    result = invoke(["explore", str(synth_table), "--labels", str(synth_table / "labels.csv"), "--label-column",
                     "debris", "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert f"{synth_table}: 36 readable images in 2 classes" in result.output


def test_several_label_columns_train_one_model_each_and_predict_gives_a_column_each(tracking, synth_table):
    result = invoke(["train", "--data", str(synth_table), "--labels", str(synth_table / "labels.csv"),
                     "--label-column", "shape,debris", "--experiment", tracking, "--register-as", "per-label",
                     *FLAGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "registered models:/per-label-shape/1" in result.output
    assert "registered models:/per-label-debris/1" in result.output
    runs = mlflow.search_runs(experiment_names=[tracking], output_format="list")
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["label_column"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["debris", "shape"] and len(runs) == 3
    assert children["shape"].data.params["class_names"] == "abnormal,normal"
    crops = [str(synth_table / "images" / f"crop_0{i}.bmp") for i in range(3)]
    predicted = invoke(["predict", "models:/per-label-shape/1,models:/per-label-debris/1", *crops])
    assert predicted.exit_code == 0, predicted.output
    header = predicted.output.splitlines()[0].split()
    assert header == ["path", "frame", "shape", "shape_confidence", "debris", "debris_confidence"]
    assert_one_line_error(invoke(["cv", "--data", str(synth_table), "--labels", str(synth_table / "labels.csv"),
                                  "--label-column", "shape,debris"]), "one model each with `train`")
