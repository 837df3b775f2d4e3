"""One training epoch of input, 2100 images at 112 px: `python -m benchmarks.bench_data`.

Ours: decode + resize once into a uint8 tensor cache, then batched augmentation on tensors.
Original: PIL decode + torchvision transforms per image, every epoch (DataLoader, batch 32).
Target: ours at least 20x faster per epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, original_loader, synthetic_set, table, timed
from smids_ml.data import Batches, build_dataset, load_tensors

IMAGES, SIZE, BATCH, TARGET = 2100, 112, 32, 20.0


def drain(batches) -> int:
    return sum(len(y) for _, y in batches)


def main() -> None:
    print(f"bench_data: one epoch of {IMAGES} synthetic images at {SIZE} px, batch {BATCH}; {machine()}")
    root = synthetic_set(IMAGES)
    torch.manual_seed(0)
    original_n, original_s = timed(drain, original_loader(root, SIZE, BATCH))
    rows = [["original: PIL decode + transforms per image (1 ch)", original_n, original_s, original_n / original_s, 1.0]]
    dataset, scan_s = timed(build_dataset, root)
    with tempfile.TemporaryDirectory() as cache:
        for channels in (1, 3):
            images, build_s = timed(load_tensors, dataset, SIZE, channels, "pad", Path(cache))
            _, load_s = timed(load_tensors, dataset, SIZE, channels, "pad", Path(cache))
            labels = torch.zeros(len(images), dtype=torch.long)
            n, seconds = timed(drain, Batches(images, labels, BATCH, shuffle=True, augment=True, seed=0))
            rows.append([f"cached tensors + batched augmentation ({channels} ch)", n, seconds, n / seconds,
                         original_s / seconds])
            rows.append([f"  one-off: cache build {build_s:.1f} s, cache load {load_s:.2f} s", "", "", "", ""])
    rows.append([f"  one-off: scan + check + split {scan_s:.1f} s", "", "", "", ""])
    print(table(["pipeline", "images", "seconds", "images/s", "speed-up"], rows))
    worst = min(r[4] for r in rows[1:] if isinstance(r[4], float))
    print(f"target: at least {TARGET:.0f}x faster per epoch: {worst:.1f}x, {'met' if worst >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
