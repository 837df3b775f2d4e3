"""The model zoo: shapes, channel adaptation and the pretrained-weights path (with a weights file we write)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torchvision import models as tv

from smids_ml import SmidsError
from smids_ml.models import TORCHVISION, build, count_parameters, weights_path


@pytest.mark.parametrize("name", ["smids_resnet", "simple_cnn", "improved_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_classifies_any_channel_count(name, channels):
    model = build(name, num_classes=4, channels=channels, dropout=0.2, image_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 64, 64))
    assert out.shape == (2, 4)
    assert count_parameters(model) > 0


def test_study_cnns_follow_the_original_architecture():
    simple = build("simple_cnn", 3, channels=1, dropout=0.5, image_size=112)
    improved = build("improved_cnn", 3, channels=1, dropout=0.5, image_size=112)
    assert [m.out_channels for m in simple.features if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in simple.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in improved.modules()) == 3
    assert simple.classifier[1].in_features == 64 * 14 * 14 and simple.classifier[1].out_features == 128


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_pretrained_weights_load_from_the_torch_cache(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with socket.socket() as closed:  # a proxy that refuses: offline on any machine, connected or not
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(SmidsError, match=f"ImageNet weights for {name} are not in the torch cache .* and could "
                                             "not be downloaded .*; download https://download.pytorch.org/"):
            build(name, 3, pretrained=True)
    assert not os.listdir(tmp_path / "hub" / "checkpoints")  # no partial file left to load next time
    reference = TORCHVISION[name][0](weights=None)
    path = weights_path(name)
    assert path.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(reference.state_dict(), path)
    for channels in (3, 1):
        model = build(name, 3, channels=channels, pretrained=True)
        inner = dict(model.named_parameters())
        for key, value in reference.state_dict().items():
            if key in inner and inner[key].shape == value.shape and "fc" not in key and "classifier" not in key:
                assert torch.equal(inner[key], value), key
        first = model.conv1 if isinstance(model, tv.ResNet) else model.features[0][0]
        expected = reference.conv1.weight if isinstance(model, tv.ResNet) else reference.features[0][0].weight
        if channels == 1:
            assert torch.allclose(first.weight, expected.sum(dim=1, keepdim=True))


def test_study_cnns_have_no_pretrained_weights():
    with pytest.raises(SmidsError, match="no ImageNet weights exist for improved_cnn"):
        build("improved_cnn", 3, pretrained=True)
    with pytest.raises(SmidsError, match="unknown model"):
        build("vgg99", 3)
