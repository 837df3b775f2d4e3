"""`smids-ml pretrain`: SimCLR's loss against its formula, unlabelled crops read as `train` reads them, bad input
in one line. Pretraining then training from it is in test_transfer.py."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from smids_ml.adapt import adapt
from smids_ml.config import TrainConfig
from smids_ml.models import build_for
from smids_ml.pretrain import nt_xent, pretrain_epochs, unlabelled_dataset
from smids_ml.serving import SmidsClassifier
from smids_ml.tracking import model_meta
from tests.helpers import assert_one_line_error, invoke


def test_nt_xent_is_the_formula_and_prefers_matching_views():
    generator = torch.Generator().manual_seed(0)
    a, b, t = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator), 0.5
    views = [v / v.norm() for v in torch.cat([a, b])]
    terms = []
    for i in range(6):  # -log(exp(sim(i, partner)/t) / sum over k != i of exp(sim(i, k)/t))
        partner = (i + 3) % 6
        denominator = sum(math.exp(float(views[i] @ views[k]) / t) for k in range(6) if k != i)
        terms.append(-math.log(math.exp(float(views[i] @ views[partner]) / t) / denominator))
    assert math.isclose(float(nt_xent(a, b, t)), sum(terms) / 6, rel_tol=1e-5)
    assert float(nt_xent(a, a * 3, t)) < float(nt_xent(a, b, t))  # scale does not matter: cosine similarity


def test_unlabelled_crops_anywhere_under_the_folder_take_trains_rules(tmp_path, synth_data):
    sources = sorted(synth_data.rglob("*.bmp"))[:10]
    for i, source in enumerate(sources):  # grey crops, loose and in a sub-folder, one of them twice
        folder = tmp_path / ("slide2" if i % 2 else "")
        folder.mkdir(exist_ok=True)
        Image.open(source).convert("L").resize((48, 48)).save(folder / f"crop_{i}.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "crop_0.png").read_bytes())
    dataset = unlabelled_dataset(str(tmp_path))
    assert len(dataset.manifest) == 10 and set(dataset.manifest["split"]) == {"train"}
    cfg = pretrain_epochs(TrainConfig(data=str(tmp_path), class_weights="none", batch=128).validate(), dataset)
    supervised = TrainConfig(data=str(tmp_path), class_weights="none").validate()
    assert (cfg.channels, cfg.image_size, cfg.batch) == (1, 48, 128)
    assert cfg.epochs == math.ceil(adapt(supervised, dataset).epochs / 2)


def test_a_folder_without_images_is_one_line_and_no_run(tracking, tmp_path):
    (tmp_path / "notes.txt").write_text("no crops here")
    result = invoke(["pretrain", str(tmp_path), "--experiment", tracking, "--epochs", "1"])
    assert_one_line_error(result, str(tmp_path), "0 distinct readable image(s)", "at least 2")
    assert mlflow.get_experiment_by_name(tracking) is None
    result = invoke(["pretrain", str(tmp_path / "missing"), "--experiment", tracking])
    assert_one_line_error(result, "does not exist")
    result = invoke(["pretrain", str(tmp_path), "--batch", "1", "--experiment", tracking])
    assert_one_line_error(result, "--batch must be at least 2")


def test_a_served_pretrained_network_refuses_to_classify(tmp_path):
    cfg = TrainConfig(model="improved_cnn", image_size=32, channels=3).validate()
    torch.save({"members": [build_for(cfg, 1).state_dict()]}, tmp_path / "weights.pt")
    model = SmidsClassifier().load(model_meta([cfg], ["unlabelled"], "simclr"), str(tmp_path / "weights.pt"))
    with pytest.raises(MlflowException, match="pretrained without labels"):
        model.predict(None, pd.DataFrame({"image": []}))
