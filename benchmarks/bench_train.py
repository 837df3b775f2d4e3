"""Training throughput on this CPU: `python -m benchmarks.bench_train`.

improved_cnn at 112 px, batch 32, one epoch over 2100 synthetic images: this project's pipeline
(tensor cache + batched augmentation + channels-last engine) against the original study's (PIL decode
and transforms per item, default memory layout), on the same grayscale model, with a row that adds
only channels-last to the original so the two gains can be told apart; then every model of the zoo,
and fp32 against bf16 autocast at the default input size for the default network and the torchvision
ones (bf16 pays only on CPUs with native bf16, AVX512-BF16 or AMX, and only for the dense convolutions of
smids_resnet and resnet18: `--precision auto` uses it only there). Those rows also give the achieved
GFLOP/s of a training step (counted FLOPs, `smids_ml.compute`, times images/s) beside this machine's own peak
for that precision, measured in the same run by a large matrix product on the same threads.
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
from smids_ml.adapt import MAX_SIDE
from smids_ml.compute import step_flops
from smids_ml.config import MODELS, TrainConfig
from smids_ml.data import Batches, build_dataset, load_tensors
from smids_ml.engine import cpu_has_native_bf16, train_one_epoch
from smids_ml.models import build

IMAGES, SIZE, BATCH = 2100, 112, 32
ZOO_BATCHES = 10  # per zoo model: enough for a stable rate, short enough for resnet18 on 2 cores
SPEEDUP_TARGET, OVERHEAD_TARGET = 1.5, 0.10


def train_rate(model: nn.Module, batches, limit: int | None = None, channels_last: bool = True,
               precision: str = "fp32") -> tuple[int, float]:
    """(images, seconds) for one Adam pass over `batches` (the first `limit`), input included.

    channels_last=True is this project's engine (engine.train_one_epoch); False is the original
    study's plain loop in torch's default memory layout.
    """
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # as engine.fit does
        metrics = train_one_epoch(model, itertools.islice(batches, limit), optimizer, criterion, torch.device("cpu"),
                                  precision)
        images = round(metrics["images_per_second"] * (time.perf_counter() - start))
    else:
        model.train()
        images = 0
        for x, y in itertools.islice(batches, limit):
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            images += len(y)
    return images, time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of repeated n×n matrix products in `dtype` on torch's threads: the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9


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
    n, seconds = train_rate(build("improved_cnn", 3, channels=1), original, channels_last=False)
    base_rate = n / seconds
    original_input = input_seconds(original_loader(root, SIZE, BATCH))
    rows.append(["improved_cnn 1 ch, original pipeline", n, seconds, base_rate, 1.0, original_input / seconds])
    n, seconds = train_rate(build("improved_cnn", 3, channels=1), original_loader(root, SIZE, BATCH))
    rows.append(["  the same + channels-last only", n, seconds, n / seconds, n / seconds / base_rate,
                 original_input / seconds])

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

    size = MAX_SIDE  # the input side the defaults choose on SMIDS
    with tempfile.TemporaryDirectory() as cache:
        small = load_tensors(dataset, size, 3, "pad", Path(cache))
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16 on this CPU"
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    for name in (TrainConfig().model, "resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        fp32 = None
        flops = step_flops(build(name, 3, channels=3, image_size=size), 3, size)
        for precision in ("fp32", "bf16"):
            batches = Batches(small, labels, BATCH, shuffle=True, augment=True, seed=0)
            n, seconds = train_rate(build(name, 3, channels=3, image_size=size), batches, ZOO_BATCHES,
                                    precision=precision)
            fp32 = fp32 or n / seconds
            achieved = flops * n / seconds / 1e9
            rows.append([f"{name} {size} px {precision} ({native})", n, seconds, n / seconds,
                         f"{n / seconds / fp32:.2f}x fp32", "", f"{achieved:.0f}", f"{achieved / peaks[precision]:.0%}"])

    print(table(["model and pipeline", "images", "seconds", "images/s", "vs original", "input share", "GFLOP/s",
                 "of peak"],
                [[*r[:5], f"{r[5]:.1%}" if isinstance(r[5], float) else r[5], *(r[6:] or ["", ""])] for r in rows]))
    print(f"peak of a 2048² matrix product on {torch.get_num_threads()} threads: fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s ({native})")
    speedup, overhead = results[1]
    print(f"target: >= {SPEEDUP_TARGET}x the original on the same model: {speedup:.2f}x "
          f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}; input overhead < {OVERHEAD_TARGET:.0%}: "
          f"{overhead:.1%} {'met' if overhead < OVERHEAD_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
