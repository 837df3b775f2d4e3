"""The model zoo, built by name: the original study's two CNNs, a compact residual network sized
for SMIDS crops (the default) and three torchvision networks."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torchvision import models as tv

from smids_ml import SmidsError

OWN = ("simple_cnn", "improved_cnn", "smids_resnet")
FIXED_INPUT_MODELS = ("simple_cnn", "improved_cnn")  # their classifier expects the --image-size they were built for
TORCHVISION = {
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    "efficientnet_b0": (tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1),
}


class StudyCNN(nn.Module):
    """The original study's CNN: three 3×3 conv blocks (16, 32, 64) with 2×2 max-pooling, then a
    128-unit hidden layer with dropout. `batch_norm=True` is its improved variant."""

    def __init__(self, num_classes: int, channels: int, dropout: float, image_size: int, batch_norm: bool):
        super().__init__()
        layers, width = [], channels
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1)]
            layers += [nn.BatchNorm2d(out)] if batch_norm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs),
        )
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmidsResNet(nn.Module):
    """A compact ResNet for 64–128 px crops trained from scratch: a stride-2 stem, four one-block
    stages (`width` channels, doubling per stage), global average pooling. At width 32 about 1.2 M
    parameters and about 3× resnet18's training speed on a CPU at 96 px; the last feature map is 6×6 there.
    `stem="pool"` max-pools the stem's output (stride 2, as torchvision's ResNets do): every stage then
    runs at a quarter of the positions, so a 96 px input costs what a 48 px one does, yet the stem still
    sees every input pixel. `stem="patch"` reaches the same map in one step, a 4×4 stride-4 convolution over
    non-overlapping patches (ConvNeXt's stem): the half-size maps, the stem's costliest memory traffic on a
    CPU, are never made. `stem="overlap"` does the same with 7×7 patches at stride 4 (PVT v2's overlapping
    patch embedding): each position sees the 7×7 pixels the pooled stem's does, linearly."""

    def __init__(self, num_classes: int, channels: int, dropout: float, width: int = 32, stem: str = "conv"):
        super().__init__()
        widths = [width * 2 ** stage for stage in range(4)]
        kernel, stride, padding = {"patch": (4, 4, 0), "overlap": (7, 4, 3)}.get(stem, (3, 2, 1))
        layers = [nn.Conv2d(channels, width, kernel, stride, padding, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True)]
        if stem == "pool":
            layers.append(nn.MaxPool2d(3, 2, 1))
        for stage, out in enumerate(widths):
            layers.append(BasicBlock(width, out, stride=1 if stage == 0 else 2))
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(width, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in self.modules():  # zero-init the last BN of each block: every block starts as identity
            if isinstance(block, BasicBlock):
                nn.init.zeros_(block.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class D4Average(nn.Module):
    """Test-time averaging over the dihedral group of the square: in eval mode the logits are the mean over
    the 8 rotations by 90° and mirror images of the input (a cell lies in every orientation, so these are
    exact symmetries of the task); training sees one view, as before."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.network(x)
        views = [torch.rot90(image, k, (2, 3)) for image in (x, x.flip(3)) for k in range(4)]
        return self.network(torch.cat(views)).unflatten(0, (8, len(x))).mean(0)


def weights_path(name: str) -> str:
    """Where torchvision looks for `name`'s ImageNet weights (the torch hub cache)."""
    url = TORCHVISION[name][1].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def imagenet_weights(name: str) -> dict:
    """torchvision's ImageNet weights for `name`: from the torch cache, else downloaded into it (a progress bar on
    a terminal). Offline, one line says where to put the file."""
    weights, path = TORCHVISION[name][1], weights_path(name)
    if not os.path.isfile(path):
        print(f"downloading ImageNet weights for {name} into {path}", file=sys.stderr)
    try:
        return weights.get_state_dict(progress=sys.stderr.isatty(), weights_only=True)
    except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise SmidsError(f"--pretrained: ImageNet weights for {name} are not in the torch cache ({path}) and could "
                         f"not be downloaded ({reason}); download {weights.url} on a connected machine and copy it "
                         "there, or train without --pretrained") from None


def _first_conv(model: nn.Module) -> tuple[nn.Module, str]:
    if isinstance(model, tv.ResNet):
        return model, "conv1"
    return model.features[0], "0"


def _adapt_input(model: nn.Module, channels: int) -> None:
    """Swap the first convolution for one taking `channels` inputs (grayscale: summed RGB weights)."""
    parent, attr = _first_conv(model)
    conv = getattr(parent, attr)
    if conv.in_channels == channels:
        return
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels)
    setattr(parent, attr, new)


def _replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    if isinstance(model, tv.ResNet):
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    else:  # mobilenet_v3 and efficientnet: classifier ends with Linear, has a Dropout before it
        last = model.classifier[-1]
        for layer in model.classifier:
            if isinstance(layer, nn.Dropout):
                layer.p = dropout
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def build(name: str, num_classes: int, channels: int = 3, dropout: float = 0.35, image_size: int = 112,
          pretrained: bool = False, width: int = 32, stem: str = "conv") -> nn.Module:
    """A fresh network for `num_classes` classes on `channels`-channel `image_size` inputs."""
    if name not in OWN and name not in TORCHVISION:
        raise SmidsError(f"unknown model {name!r}; choose one of {', '.join([*OWN, *TORCHVISION])}")
    if pretrained and name in OWN:
        raise SmidsError(f"--pretrained: no ImageNet weights exist for {name}; use one of {', '.join(TORCHVISION)}")
    if name == "smids_resnet":
        return SmidsResNet(num_classes, channels, dropout, width, stem)
    if name in OWN:
        return StudyCNN(num_classes, channels, dropout, image_size, batch_norm=name == "improved_cnn")
    factory, weights = TORCHVISION[name]
    model = factory(weights=None)
    if pretrained:
        model.load_state_dict(imagenet_weights(name))
    _adapt_input(model, channels)
    _replace_head(model, num_classes, dropout)
    return model


def build_for(cfg, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The network a TrainConfig describes, wrapped for test-time averaging with --tta d4; ImageNet weights
    only for a training run that asks for them (a trained model's weights replace them anyway)."""
    if not (cfg.channels and cfg.image_size):
        raise ValueError("the config still leaves its channels or input size to the data: pass it through adapt()")
    network = build(cfg.model, num_classes, cfg.channels, cfg.dropout_rate, cfg.image_size, pretrained, cfg.width,
                    cfg.stem)
    return D4Average(network) if cfg.tta == "d4" else network


def unwrap(model: nn.Module) -> nn.Module:
    """The network itself, without the test-time averaging wrapper."""
    return model.network if isinstance(model, D4Average) else model


def classifier_name(model: nn.Module) -> str:
    """The attribute of the unwrapped network that maps features to classes (replaced when a network starts
    another class set); everything else is the backbone."""
    return "fc" if isinstance(unwrap(model), tv.ResNet) else "classifier"


def classifier_of(model: nn.Module) -> nn.Module:
    return getattr(unwrap(model), classifier_name(model))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
