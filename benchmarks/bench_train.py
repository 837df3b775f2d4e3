"""Training throughput on this CPU: `python -m benchmarks.bench_train`.

improved_cnn at 112 px, batch 32, one epoch over 2100 synthetic images: this project's pipeline
(tensor cache + batched augmentation) against the original study's (PIL decode and transforms per
item), on the same grayscale model; then every model of the zoo through this project's pipeline.
Targets: at least 1.5x the original pipeline, input overhead under 10% of the epoch.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine, original_loader, synthetic_set, table
from smids_ml.config import MODELS
from smids_ml.data import Batches, build_dataset, load_tensors
from smids_ml.engine import train_one_epoch
from smids_ml.models import build

IMAGES, SIZE, BATCH = 2100, 112, 32
ZOO_BATCHES = 10  # per zoo model: enough for a stable rate, short enough for resnet18 on 2 cores
SPEEDUP_TARGET, OVERHEAD_TARGET = 1.5, 0.10


def train_rate(model: nn.Module, batches, limit: int | None = None) -> tuple[int, float]:
    """(images, seconds) for one training pass of Adam over `batches` (first `limit` batches)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    items = list(itertools.islice(batches, limit)) if limit else batches
    start = time.perf_counter()
    metrics = train_one_epoch(model, items if limit else batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"))
    seconds = time.perf_counter() - start
    return round(metrics["images_per_second"] * seconds), seconds


def input_seconds(batches) -> float:
    start = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - start


def main() -> None:
    print(f"bench_train: {IMAGES} synthetic images at {SIZE} px, batch {BATCH}; {machine()}")
    root = synthetic_set(IMAGES)
    dataset = build_dataset(root)
    labels = torch.tensor([sorted(dataset.classes).index(c) for c in dataset.manifest["label"]])
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        gray = load_tensors(dataset, SIZE, 1, "pad", Path(cache))
        colour = load_tensors(dataset, SIZE, 3, "pad", Path(cache))

    original = original_loader(root, SIZE, BATCH)
    n, seconds = train_rate(build("improved_cnn", 3, channels=1), original)
    base_rate = n / seconds
    original_input = input_seconds(original_loader(root, SIZE, BATCH))
    rows.append(["improved_cnn 1 ch, original pipeline", n, seconds, base_rate, 1.0, original_input / seconds])

    results = {}
    for channels, images in ((1, gray), (3, colour)):
        batches = Batches(images, labels, BATCH, shuffle=True, augment=True, seed=0)
        n, seconds = train_rate(build("improved_cnn", 3, channels=channels), batches)
        overhead = input_seconds(batches) / seconds
        results[channels] = (n / seconds / base_rate, overhead)
        rows.append([f"improved_cnn {channels} ch, this pipeline", n, seconds, n / seconds, n / seconds / base_rate,
                     overhead])

    for name in MODELS:
        batches = Batches(colour, labels, BATCH, shuffle=True, augment=True, seed=0)
        n, seconds = train_rate(build(name, 3, channels=3), batches, ZOO_BATCHES)
        rows.append([f"zoo: {name} 3 ch ({ZOO_BATCHES} batches)", n, seconds, n / seconds, "", ""])

    print(table(["model and pipeline", "images", "seconds", "images/s", "vs original", "input share"],
                [[*r[:5], f"{r[5]:.1%}" if isinstance(r[5], float) else r[5]] for r in rows]))
    speedup, overhead = results[1]
    print(f"target: >= {SPEEDUP_TARGET}x the original on the same model: {speedup:.2f}x "
          f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}; input overhead < {OVERHEAD_TARGET:.0%}: "
          f"{overhead:.1%} {'met' if overhead < OVERHEAD_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
