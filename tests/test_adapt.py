"""Defaults that follow the data: grey sets train on one channel, small crops at their own size, small sets for as
many steps as a SMIDS fold, imbalanced sets with weighted classes; each value logged with its reason, flags win."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from smids_ml.adapt import BASE_EPOCHS, BASE_STEPS, MAX_SIDE, adapt
from smids_ml.config import TrainConfig
from smids_ml.data import build_dataset
from smids_ml.engine import class_weights
from tests.helpers import grey_imbalanced_set, invoke


def test_a_small_grey_imbalanced_set_adapts_channels_size_length_and_class_weights(tmp_path, synth_data):
    root = grey_imbalanced_set(tmp_path / "grey", synth_data)
    dataset = build_dataset(root, valid_frac=0, test_frac=0.15)
    cfg = adapt(TrainConfig(data=str(root)), dataset)
    n_train = int((dataset.manifest["split"] == "train").sum())
    steps = -(-n_train // 32)
    assert (cfg.channels, cfg.image_size, cfg.class_weights) == (1, 48, "sqrt")
    assert cfg.epochs == max(BASE_EPOCHS, -(-BASE_STEPS // steps)) > BASE_EPOCHS
    assert "channels=1 (grey crops)" in cfg.adapted
    assert "image_size=48 (median crop side 48 px" in cfg.adapted
    assert steps == 1 and f"epochs={cfg.epochs} ({n_train} training crops, 1 step an epoch: ~7,000 optimizer steps, " \
                          "like a SMIDS model" in cfg.adapted  # the count in words a person reads
    assert "class_weights=sqrt (largest class 2.3× the smallest)" in cfg.adapted
    assert adapt(cfg, dataset) is cfg  # nothing left to decide


def test_colour_crops_of_smids_size_keep_the_smids_recipe(synth_data):
    dataset = build_dataset(synth_data, valid_frac=0, test_frac=0.2)
    # a SMIDS fold trains ~1,440 crops: the defaults' 155 epochs at 96 px in colour, classes unweighted
    cfg = adapt(TrainConfig(), dataset, train_images=1438)
    assert (cfg.channels, cfg.image_size, cfg.epochs, cfg.class_weights) == (3, MAX_SIDE, BASE_EPOCHS, "none")


def test_large_crops_train_at_96_px_and_tiny_ones_at_32(tmp_path, synth_data):
    for side, expected in ((300, MAX_SIDE), (20, 32)):
        root = grey_imbalanced_set(tmp_path / f"side{side}", synth_data, side=side, counts=(6, 6))
        assert adapt(TrainConfig(), build_dataset(root, valid_frac=0, test_frac=0.2)).image_size == expected


def test_class_weights_balance_the_classes_total_weight():
    labels = np.array([0] * 30 + [1] * 10)
    import torch

    for kind, ratio in (("balanced", 3.0), ("sqrt", 3.0 ** 0.5)):
        weights = class_weights(kind, torch.from_numpy(labels), 2)
        assert weights[1] / weights[0] == pytest.approx(ratio)
        assert float((weights[torch.from_numpy(labels)]).mean()) == pytest.approx(1.0)
    assert class_weights("none", torch.from_numpy(labels), 2) is None


def test_train_logs_each_adapted_value_with_its_reason_and_given_flags_win(tracking, tmp_path, synth_data):
    root = grey_imbalanced_set(tmp_path / "grey", synth_data)
    common = ["--data", str(root), "--experiment", tracking, "--model", "improved_cnn", "--epochs", "1",
              "--batch", "8", "--num-threads", "1"]
    result = invoke(["train", *common])
    assert result.exit_code == 0, result.output
    assert "from the data: channels=1 (grey crops); image_size=48" in result.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(tracking).experiment_id])[0]
    params = run.data.params
    assert (params["channels"], params["image_size"], params["epochs"], params["class_weights"]) == ("1", "48", "1", "sqrt")
    assert "epochs" not in params["adapted"] and "image_size=48 (median crop side 48 px" in params["adapted"]
    given = invoke(["train", *common, "--channels", "3", "--image-size", "32", "--class-weights", "none"])
    assert given.exit_code == 0, given.output
    assert "from the data" not in given.output
    latest = MlflowClient().search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert (latest.data.params["channels"], latest.data.params["image_size"]) == ("3", "32")
    assert latest.data.params["adapted"] == ""


def test_explore_says_what_the_defaults_decide_for_the_data(tracking, tmp_path, synth_data):
    root = grey_imbalanced_set(tmp_path / "grey", synth_data)
    result = invoke(["explore", str(root), "--experiment", tracking])
    assert result.exit_code == 0, result.output
    assert "from the data: channels=1 (grey crops); image_size=48" in result.output
    assert "class_weights=sqrt" in result.output
