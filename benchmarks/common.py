"""What the benchmarks share: a reusable synthetic data set, the original study's input pipeline, tables."""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

from smids_ml.config import TrainConfig
from smids_ml.data import default_cache_dir
from smids_ml.synth import generate


def machine() -> str:
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__.split('+')[0]} "
            f"with {torch.get_num_threads()} threads, load average {load:.1f} at start")


def synthetic_set(images: int, seed: int = 0) -> Path:
    """Exactly `images` synthetic crops (about a third per class), generated once into the cache folder."""
    root = default_cache_dir() / "bench-data" / f"{images}-{seed}"
    marker = root / ".complete"
    if not marker.exists():
        generate(root, per_class=-(-images // 3), seed=seed)
        for extra in sorted(root.rglob("*.bmp"))[images:]:
            extra.unlink()
        marker.touch()
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def original_transform(size: int = 112, augment: bool = True):
    """The original study's per-image preprocessing: grayscale, stretch, rotate ±30°, flip, jitter."""
    steps = [transforms.Grayscale(1), transforms.Resize((size, size))]
    if augment:
        steps += [transforms.RandomRotation(30), transforms.RandomHorizontalFlip(),
                  transforms.ColorJitter(brightness=0.2, contrast=0.2)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def original_loader(root: Path, size: int = 112, batch: int = 32, limit: int | None = None, workers: int = 0):
    """PIL decode + transforms per item through a DataLoader, as the original study trained."""
    dataset = datasets.ImageFolder(str(root), transform=original_transform(size))
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def recipe_config(recipe: str, data: Path, overrides: dict) -> TrainConfig:
    """`preset+field=value+...` on `data`: the preset, its `+` overrides, then the command's own overrides."""
    return TrainConfig.from_recipe(recipe, data=str(data), **overrides)
