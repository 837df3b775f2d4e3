"""A k-fold ensemble is one registered model: loaded, predicted with, evaluated and served like a
single one, with the same probabilities everywhere; `evaluate --split all` scores a foreign folder
and leaves out what the training run saw."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from smids_ml.data import SMIDS_CLASSES, normalize, open_image, prepare_image
from smids_ml.predict import main as predict
from smids_ml.serving import load_classifier
from smids_ml.synth import generate
from tests.conftest import BIN, TINY, free_port, stop, wait_for_http
from tests.helpers import invoke, mlflow_run
from tests.test_serving import payload, post

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def ensemble(mlflow_server, synth_data):
    """A 2-fold cross-validation of the default network at a non-default width, registered as `ens@champion`."""
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    mlflow.set_tracking_uri(mlflow_server)
    result = invoke(["cv", "--folds", "2", "--data", str(synth_data), *TINY_FLAGS, "--model", "smids_resnet",
                     "--width", "8", "--experiment", "ensemble",
                     "--register-as", "ens", "--alias", "champion"])
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    assert result.exit_code == 0, result.output
    assert "registered the 2-model ensemble as models:/ens/1 (@champion)" in result.output
    return "models:/ens@champion"


@pytest.fixture(scope="module")
def foreign(synth_data, tmp_path_factory):
    """A labelled folder the training never listed, plus one copy of a training image."""
    root = tmp_path_factory.mktemp("foreign") / "lab2"
    generate(root, per_class=3, seed=77)
    shutil.copy(synth_data / "Normal_Sperm" / "Normal_Sperm (1).bmp", root / "Normal_Sperm" / "seen-before.bmp")
    return root


def files_of(root) -> list:
    return sorted(p for label in SMIDS_CLASSES for p in (root / label).glob("*.bmp") if p.name != "seen-before.bmp")


def test_the_ensemble_averages_its_fold_models(ensemble, foreign):
    model = load_classifier(ensemble)
    assert len(model.networks) == 2 and model.classes == list(SMIDS_CLASSES)
    cfg = model.config
    assert cfg.model == "smids_resnet" and cfg.width == 8
    assert model.networks[0].features[0].out_channels == 8  # rebuilt at the width it trained with
    assert_averages_two_different_members(model, files_of(foreign))


def assert_averages_two_different_members(model, files) -> None:
    cfg = model.config
    batch = torch.stack([prepare_image(open_image(f), cfg.image_size, cfg.channels, cfg.resize) for f in files])
    with torch.no_grad():
        alone = [torch.softmax(network(normalize(batch)), 1).numpy() for network in model.networks]
    assert not np.allclose(alone[0], alone[1])  # two different members
    np.testing.assert_allclose(model.probabilities(batch), np.mean(alone, axis=0), atol=1e-6)


def test_predict_evaluate_and_serve_give_the_same_probabilities(ensemble, foreign, tmp_path):
    files = files_of(foreign)
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(predict, [ensemble, *map(str, files), "--output", str(out)])
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(out)

    result = invoke(["evaluate", ensemble, "--data", str(foreign), "--split", "all", "--experiment", "ens-eval"])
    assert result.exit_code == 0, result.output
    assert "left out 1 of 10 images whose pixels are in the training run's manifest: Normal_Sperm/seen-before.bmp" \
        in result.output
    [run] = mlflow.search_runs(experiment_names=["ens-eval"], output_format="list")
    assert run.data.params["n_excluded_seen_in_training"] == "1" and run.data.params["n_images"] == "9"
    evaluated = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                               artifact_path="predictions.csv", dst_path=str(tmp_path)))
    assert "Normal_Sperm/seen-before.bmp" not in set(evaluated["path"])
    evaluated = evaluated.set_index(evaluated["path"].map(lambda p: str(foreign / p))).loc[map(str, files)]
    np.testing.assert_allclose(evaluated[list(SMIDS_CLASSES)].to_numpy(float),
                               predicted[list(SMIDS_CLASSES)].to_numpy(float), atol=1e-5)

    port = free_port()
    process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", ensemble, "--env-manager", "local",
                                "--host", "127.0.0.1", "--port", str(port)],
                               stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process)
        encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
        status, answer = post(f"http://127.0.0.1:{port}", payload("dataframe_split", encoded))
    finally:
        stop(process)
    assert status == 200, answer
    served = pd.DataFrame(answer["predictions"])
    np.testing.assert_allclose(served[list(SMIDS_CLASSES)], predicted[list(SMIDS_CLASSES)], atol=1e-5)


def test_the_ensemble_has_no_test_split_of_its_own(ensemble):
    result = invoke(["evaluate", ensemble])
    assert result.exit_code == 1 and "--data FOLDER --split all" in result.output


def test_a_single_model_scores_a_foreign_folder_without_its_training_images(trained_model, foreign, tracking):
    result = invoke(["evaluate", trained_model["uri"], "--data", str(foreign), "--split", "all",
                     "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert "left out 1 of 10 images" in result.output and "9 images of split all" in result.output


def parent_and_children(experiment: str):
    """The experiment's one top-level run and its nested runs (the members)."""
    [parent] = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.mlflow.parentRunId IS NULL",
                                  output_format="list")
    return parent, mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_train_members_logs_one_model_of_seeds_that_all_saw_the_whole_training_split(tracking, synth_data, tmp_path):
    """Through `mlflow run . -e train -P members=2`: the members nest under the run `mlflow run` created."""
    done = mlflow_run("train", tracking, {**TINY, "data": synth_data, "members": 2, "register_as": "seeds",
                                          "alias": "both"}, tmp_path)
    assert "logged the 2-model ensemble" in done.stdout and "registered models:/seeds/1 (@both)" in done.stdout
    parent, children = parent_and_children(tracking)
    assert sorted(r.data.params["seed"] for r in children) == ["42", "43"]
    assert parent.data.params["members"] == "2"
    for key in ("data_fingerprint", "n_train", "n_test", "num_parameters"):  # the parent describes what they share
        assert {parent.data.params[key]} == {r.data.params[key] for r in children}, key
    manifests = [pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="manifest.csv",
                                                                 dst_path=str(tmp_path / r.info.run_id)))
                 for r in [parent, *children]]
    for manifest in manifests[1:]:  # one split, shared by every member and recorded on the parent
        pd.testing.assert_frame_equal(manifest, manifests[0])
    config = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="config.json",
                                                 dst_path=str(tmp_path / "parent-config"))
    assert json.loads(open(config).read())["seed"] == 42  # the recipe, with the first member's seed

    model = load_classifier("models:/seeds@both")
    assert len(model.networks) == 2
    assert_averages_two_different_members(model, sorted((synth_data / "Normal_Sperm").glob("*.bmp"))[:4])

    result = invoke(["evaluate", "models:/seeds@both", "--experiment", tracking])  # its own held-out test split
    assert result.exit_code == 0, result.output
    test_rows = manifests[0]["split"].eq("test").sum()
    assert f"{test_rows} images of split test" in result.output


def test_train_member_models_logs_one_model_of_different_networks(tracking, synth_data):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS,
                     "--member-models", "improved_cnn,simple_cnn", "--register-as", "mixed"])
    assert result.exit_code == 0, result.output
    assert "logged the 2-model ensemble" in result.output and "registered models:/mixed/1" in result.output
    parent, children = parent_and_children(tracking)
    assert sorted(r.data.params["model"] for r in children) == ["improved_cnn", "simple_cnn"]
    assert parent.data.params["member_models"] == "improved_cnn,simple_cnn"
    model = load_classifier("models:/mixed/1")
    assert [cfg.model for cfg in model.members] == ["improved_cnn", "simple_cnn"]
    assert_averages_two_different_members(model, sorted((synth_data / "Normal_Sperm").glob("*.bmp"))[:4])


def test_train_member_models_names_an_unknown_network_before_training(tracking, synth_data):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *TINY_FLAGS,
                     "--member-models", "improved_cnn,vgg99"])
    assert result.exit_code != 0
    assert "--member-models: 'vgg99' is not one of smids_resnet" in result.output
    assert not mlflow.search_runs(experiment_names=[tracking], output_format="list")  # nothing was started


RECIPES = ("default+image_size=32+epochs=2+width=8+batch=16",  # the pooled stem, one view, 32 px
           "fast+image_size=24+epochs=2+width=8+batch=16")  # the plain stem, test-time averaged, 24 px


def test_train_member_recipes_logs_one_model_whose_members_each_see_their_own_input(tracking, synth_data, tmp_path):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, "--valid-frac", "0.15",
                     "--num-threads", "1", "--member-recipes", ",".join(RECIPES), "--register-as", "recipes"])
    assert result.exit_code == 0, result.output
    assert "logged the 2-model ensemble" in result.output and "registered models:/recipes/1" in result.output
    parent, children = parent_and_children(tracking)
    assert parent.data.params["member_recipes"] == ",".join(RECIPES)
    assert sorted((r.data.params["image_size"], r.data.params["stem"], r.data.params["tta"]) for r in children) == [
        ("24", "conv", "d4"), ("32", "pool", "none")]

    model = load_classifier("models:/recipes/1")
    assert [(c.image_size, c.stem, c.tta) for c in model.members] == [(32, "pool", "none"), (24, "conv", "d4")]
    files = sorted((synth_data / "Abnormal_Sperm").glob("*.bmp"))[:3] + sorted((synth_data / "Non-Sperm").glob("*.bmp"))[:3]
    crops = [open_image(f) for f in files]
    batch = torch.stack([model.preprocess(crop) for crop in crops])
    with torch.no_grad():  # each member on the crop as its training prepared it, at its own size
        alone = [torch.softmax(network(normalize(torch.stack([prepare_image(c, cfg.image_size, cfg.channels,
                                                                            cfg.resize) for c in crops]))), 1).numpy()
                 for network, cfg in zip(model.networks, model.members)]
    expected = np.mean(alone, axis=0)
    np.testing.assert_allclose(model.probabilities(batch), expected, atol=1e-6)

    served = mlflow.pyfunc.load_model("models:/recipes/1").predict(
        pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    np.testing.assert_allclose(served[list(SMIDS_CLASSES)].to_numpy(), expected, atol=1e-5)
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(predict, ["models:/recipes/1", *map(str, files), "--output", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(pd.read_csv(out)[list(SMIDS_CLASSES)].to_numpy(), expected, atol=1e-5)
    result = invoke(["evaluate", "models:/recipes/1", "--experiment", tracking])
    assert result.exit_code == 0, result.output

    from smids_ml.explain import explain
    overlays = explain(model, crops[:2])  # both members' maps, at the larger input's side, over each crop
    assert [o.size for o in overlays] == [c.size for c in crops[:2]]


@pytest.mark.parametrize("flags, message", [
    (["--member-recipes", f"{RECIPES[0]},fast+epoch=3"], "recipe 'fast+epoch=3': 'epoch=3' is not field=value"),
    (["--member-recipes", f"{RECIPES[0]},quick"], "recipe 'quick': 'quick' is not a preset (default, long, fast, original)"),
    (["--member-recipes", RECIPES[0], "--epochs", "3"], "--member-recipes: --epochs would change every recipe"),
    (["--member-recipes", RECIPES[0], "--preset", "fast"], "each recipe starts from its own preset; drop --preset"),
    (["--member-recipes", RECIPES[0], "--member-models", "simple_cnn"], "--member-models and --member-recipes both"),
    (["--member-recipes", f"{RECIPES[0]},{RECIPES[1]}+resize=stretch"], "the recipes must share --resize"),
])
def test_train_member_recipes_refuses_a_bad_recipe_before_training(tracking, synth_data, flags, message):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, *flags])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not mlflow.search_runs(experiment_names=[tracking], output_format="list")  # nothing was started


def test_one_member_recipe_trains_and_registers_that_recipe_alone(tracking, synth_data):
    result = invoke(["train", "--data", str(synth_data), "--experiment", tracking, "--valid-frac", "0.15",
                     "--num-threads", "1", "--member-recipes", "original+image_size=32+epochs=1",
                     "--register-as", "one-recipe"])
    assert result.exit_code == 0, result.output
    [run] = mlflow.search_runs(experiment_names=[tracking], output_format="list")  # no nested members
    assert (run.data.params["model"], run.data.params["monitor"]) == ("improved_cnn", "valid_acc")
    version = mlflow.MlflowClient().get_model_version("one-recipe", "1")
    assert "valid_valid_acc" in version.tags  # the score of the metric the recipe watches, not the default's
