"""Figures people would rather look at than read; each returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and MLflow, never to a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def training_curves(history: pd.DataFrame, best_epoch: int | None = None):
    """Loss and accuracy per epoch, train against valid, with the kept epoch marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        ax.plot(history["epoch"], history[f"train_{metric}"], label="train")
        ax.plot(history["epoch"], history[f"valid_{metric}"], label="valid")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", ylabel=metric, title={"loss": "Loss", "acc": "Accuracy"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(targets, predicted, classes: list[str], normalize: str | None = None, title: str = ""):
    """Counts (normalize=None) or row-normalised rates (normalize='true')."""
    fig, ax = plt.subplots(figsize=(1.6 * len(classes) + 2.5, 1.6 * len(classes) + 1.5))
    ConfusionMatrixDisplay.from_predictions(
        targets, predicted, labels=list(range(len(classes))), display_labels=classes, normalize=normalize,
        values_format=".2f" if normalize else "d", cmap="Blues", ax=ax, colorbar=False, xticks_rotation=30)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid(images: list, titles: list[str], columns: int = 6, title: str = ""):
    """A grid of PIL images or HxW(xC) arrays with a caption each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        ax.imshow(image, cmap="gray" if np.asarray(image).ndim == 2 else None)
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
