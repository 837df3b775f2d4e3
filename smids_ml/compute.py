"""Training compute counted, not timed: FLOPs of the convolutions and matrix products per training step
(forward and backward, torch's own flop counter), times images, times epochs at each epoch's input size.
A count holds across machines, where minutes differ several-fold between CPUs."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from smids_ml.config import TrainConfig
from smids_ml.engine import epoch_sizes
from smids_ml.models import build_for


def _convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                                _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient (input, weight) of a convolution costs what its forward pass does. torch's own formula
    leaves out the groups, which counts a depthwise convolution's backward pass many times over."""
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(network: torch.nn.Module, channels: int, size: int) -> float:
    """FLOPs of one training step (forward and backward) per image at `size` px, in train mode."""
    network.train()
    images = torch.zeros(2, channels, size, size)  # batch norm needs two images in train mode
    corrected = {torch.ops.aten.convolution_backward: _convolution_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        network(images).sum().backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def training_flops(cfg: TrainConfig, num_classes: int, train_images: int) -> float:
    """FLOPs of a whole training run of `cfg` on `train_images` images (every epoch, at its size). The global
    random state is left as it was, so counting does not change what a seeded run draws."""
    with torch.random.fork_rng():
        network = build_for(cfg, num_classes)  # in train mode a test-time-averaging wrapper passes one view
        sizes = epoch_sizes(cfg)
        per_size = {size: step_flops(network, cfg.channels, size) for size in set(sizes)}
    return sum(per_size[size] for size in sizes) * train_images
