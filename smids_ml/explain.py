"""Where a model looked: Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, as overlays.

The map of a class is the ReLU of the last stage's activations weighted by the spatial mean of that
class logit's gradient. A model that averages the 8 orientations at test time (`--tta d4`) is explained
the same way: each view's map is turned back to the crop's orientation before the mean, and an ensemble's
map is its members' mean, so the overlay explains the prediction the model actually makes. The map is
drawn over the original crop at its own size (the padding or stretching of the network input undone).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision import models as tv

from smids_ml.data import normalize, padded_box
from smids_ml.models import D4Average

OVERLAY_ALPHA = 0.45  # share of the heat map in the blend: the crop stays readable underneath


def last_stage(network: nn.Module) -> nn.Module:
    """The last convolutional stage: `features` of the study CNNs, smids_resnet, mobilenet and efficientnet,
    `layer4` of resnet18."""
    return network.layer4 if isinstance(network, tv.ResNet) else network.features


def _grad_cam(network: nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N×h×w maps (non-negative, unnormalised) of `targets` for a normalised batch, at the stage's resolution."""
    stage, seen = last_stage(network), {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["activation"] = output

    handle = stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = network(batch.requires_grad_(True))
            logits.gather(1, targets[:, None]).sum().backward()
    finally:
        handle.remove()
    activation = seen["activation"]
    weights = activation.grad.mean((2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(1)).detach()


def _network_map(network: nn.Module, x: torch.Tensor, targets: torch.Tensor, side: int) -> torch.Tensor:
    """One network's N×side×side map (side: the largest member input of an ensemble); a test-time-averaging
    network's is the mean over its 8 views, each turned back to the input's orientation."""
    def upsample(maps):
        return F.interpolate(maps[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]

    if not isinstance(network, D4Average):
        return upsample(_grad_cam(network, x, targets))
    views = [(mirror, k) for mirror in (False, True) for k in range(4)]  # the order D4Average uses
    batch = torch.cat([torch.rot90(x.flip(3) if mirror else x, k, (2, 3)) for mirror, k in views])
    maps = upsample(_grad_cam(network.network, batch, targets.repeat(8))).unflatten(0, (8, len(x)))
    back = [torch.rot90(maps[i], -k, (1, 2)) for i, (_, k) in enumerate(views)]
    return torch.stack([b.flip(2) if mirror else b for b, (mirror, _) in zip(back, views)]).mean(0)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def activation_maps(networks: list[nn.Module], images: torch.Tensor | list[torch.Tensor],
                    targets: torch.Tensor) -> np.ndarray:
    """N×S×S maps in [0, 1], each explaining class `targets[i]` of image i, for uint8 N×C×H×W network inputs:
    one batch for all networks, or one per network (members of different input sizes; S is the largest).
    An ensemble's map is the mean of its members' maps, each scaled to a peak of 1."""
    inputs = images if isinstance(images, list) else [images] * len(networks)
    side = max(x.shape[-1] for x in inputs)
    for network in networks:
        network.eval()
    return _unit(torch.stack([_unit(_network_map(n, normalize(x), targets, side))
                              for n, x in zip(networks, inputs, strict=True)]).mean(0)).numpy()


def overlay(crop: Image.Image, heat: np.ndarray, resize: str = "pad") -> Image.Image:
    """The crop (RGB, its own size) with `heat` (a map over the square network input) blended over it."""
    crop = crop.convert("RGB")
    side = heat.shape[0]
    box = (0, 0, side, side) if resize == "stretch" else padded_box(crop.width, crop.height, side)
    region = Image.fromarray((heat * 255).astype(np.uint8)).crop(box).resize(crop.size, Image.Resampling.BILINEAR)
    colours = colormaps["jet"](np.asarray(region, dtype=np.float32) / 255.0)[..., :3]
    blend = (1 - OVERLAY_ALPHA) * np.asarray(crop, dtype=np.float32) / 255.0 + OVERLAY_ALPHA * colours
    return Image.fromarray((blend * 255).round().astype(np.uint8))


def side_by_side(crop: Image.Image, heat: Image.Image) -> Image.Image:
    """The crop and its overlay in one image, for galleries."""
    pair = Image.new("RGB", (crop.width * 2 + 4, crop.height), "white")
    pair.paste(crop.convert("RGB"), (0, 0))
    pair.paste(heat, (crop.width + 4, 0))
    return pair


def explain(model, crops: list[Image.Image], targets: list[int] | None = None, batch: int = 32) -> list[Image.Image]:
    """Overlays for `crops` (PIL images) under a loaded SmidsClassifier: each explains the class in `targets`,
    by default the class the model predicts for that crop."""
    out = []
    for start in range(0, len(crops), batch):
        chunk = crops[start:start + batch]
        images = torch.stack([model.preprocess(crop) for crop in chunk])
        wanted = (torch.as_tensor(targets[start:start + batch]) if targets is not None
                  else torch.as_tensor(model.probabilities(images).argmax(1)))
        heat = activation_maps(model.networks, model.member_inputs(images), wanted)
        out += [overlay(crop, h, model.config.resize) for crop, h in zip(chunk, heat)]
    return out
