"""Figures people would rather look at than read; each returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves; notebooks draw inline
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay


def training_curves(history: pd.DataFrame, best_epoch: int | None = None):
    """Loss and accuracy per epoch, train against valid (when there is one), with the kept epoch marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        ax.plot(history["epoch"], history[f"train_{metric}"], label="train")
        if f"valid_{metric}" in history:
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


def roc_curves(targets, probs, classes: list[str], title: str = ""):
    """One-vs-rest ROC curve per class with its AUC; a class absent from `targets` has no curve."""
    from sklearn.metrics import RocCurveDisplay

    targets, probs = np.asarray(targets), np.asarray(probs)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        positives = targets == k
        if positives.any() and not positives.all():
            RocCurveDisplay.from_predictions(positives, probs[:, k], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC curves (one vs rest)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_diagram(bins: pd.DataFrame, ece: float, title: str = ""):
    """Accuracy against confidence per bin (bins: lower, upper, count, confidence, accuracy), with counts below.

    Bars under the diagonal mean the model is more confident than it is right (overconfident).
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins["upper"] - bins["lower"]
    filled = bins["count"] > 0
    top.bar(bins["lower"][filled], bins["accuracy"][filled], width=width[filled], align="edge",
            edgecolor="black", alpha=0.8, label="accuracy")
    top.plot(bins["confidence"][filled], bins["confidence"][filled], "o", color="tab:red", markersize=4,
             label="mean confidence")
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title or f"Reliability diagram (ECE {ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(bins["lower"], bins["count"], width=width, align="edge", edgecolor="black", color="tab:grey")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
    fig.tight_layout()
    return fig


def misclassified_gallery(images: list, true: list[str], predicted: list[str], confidence: list[float],
                          title: str = "Most confident mistakes"):
    """Misclassified images captioned with true label, predicted label and the model's confidence."""
    if not images:
        return image_grid([], [], columns=1, title="No misclassified images")
    captions = [f"true: {t}\npred: {p} ({c:.2f})" for t, p, c in zip(true, predicted, confidence)]
    return image_grid(images, captions, columns=min(6, len(images)), title=title)


def sample_shares(sample: dict, classes: list[str], normal: str | None):
    """A sample at a glance: its crops per predicted class (and the adjusted shares as counts), and the share
    of normal forms among the cells, counted and adjusted, with their 95% intervals."""
    fig, axes = plt.subplots(1, 2 if normal else 1, figsize=(9 if normal else 5, 3), squeeze=False)
    ax, n, x = axes[0][0], sample["n_crops"], np.arange(len(classes))
    adjusted = sample.get("shares_adjusted")
    width = 0.4 if adjusted else 0.8
    ax.bar(x - (width / 2 if adjusted else 0), [sample["counts"][c] for c in classes], width, label="predicted")
    if adjusted:
        ax.bar(x + width / 2, [adjusted[c] * n for c in classes], width, label="adjusted", color="#dd8452")
        ax.legend(fontsize=8)
    ax.set_xticks(x, classes, rotation=15, fontsize=8)
    ax.set(ylabel="crops", title=f"{n} crops")
    if normal:
        ax = axes[0][1]
        rows = [("counted", sample.get("normal_fraction"), sample.get("normal_fraction_ci"))]
        if "normal_fraction_adjusted" in sample:
            rows.append(("adjusted", sample["normal_fraction_adjusted"], sample.get("normal_fraction_adjusted_ci")))
        for y, (name, value, ci) in enumerate(rows):
            if value is None:
                continue
            low, high = ci or (value, value)
            ax.errorbar(100 * value, y, xerr=[[100 * max(value - low, 0)], [100 * max(high - value, 0)]], fmt="o",
                        capsize=4)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set(xlabel=f"{normal} among cells (%), 95% CI", title="Normal forms")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
