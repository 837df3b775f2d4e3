"""Exploratory report of a data root: class counts, resolutions, samples and the check report.

    python -m smids_ml.explore data

Printed as a summary and logged to MLflow (figures and CSVs) so data sets can be compared too.
"""

from __future__ import annotations

import click
import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from smids_ml import SmidsError, plots, tracking
from smids_ml.adapt import adapt
from smids_ml.config import TrainConfig
from smids_ml.console import Command
from smids_ml.data import CheckReport, Dataset, check, open_image, scan


def resolution_table(frame: pd.DataFrame) -> pd.DataFrame:
    """How many images have each (width, height), most common first."""
    table = frame.groupby(["width", "height"]).size().rename("images").reset_index()
    return table.sort_values(["images", "width", "height"], ascending=[False, True, True]).reset_index(drop=True)


def class_counts(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.groupby("label").size().rename("images").reset_index()


def bar_figure(labels, values, title: str, xlabel: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([str(v) for v in labels], values, color="#4c72b0")
    for i, value in enumerate(values):
        ax.annotate(str(value), (i, value), ha="center", va="bottom")
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    fig.tight_layout()
    return fig


def resolution_figure(frame: pd.DataFrame):
    """Width against height of every image, coloured by class."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, group in frame.groupby("label"):
        ax.scatter(group["width"], group["height"], s=8, alpha=0.6, label=label)
    ax.set(title="Image sizes", xlabel="width (px)", ylabel="height (px)")
    ax.legend()
    return fig


def sample_grid(report: CheckReport, class_root, per_class: int = 6, seed: int = 0):
    """A few random images of each class, one row per class."""
    rows = []
    for label, group in report.frame.groupby("label"):
        rows += list(group.sample(min(per_class, len(group)), random_state=seed).itertuples(index=False))
    images = [open_image(class_root / row.path).convert("RGB") for row in rows]
    return plots.image_grid(images, [f"{row.label}\n{row.width}x{row.height}" for row in rows], columns=per_class,
                            title="Sample images per class")


def explore(root, classes=None, experiment: str | None = "smids-ml-explore", labels=None, label_column=None) -> dict:
    """Scan and check `root` (labelled by folders, or by the `labels` table), print a summary, log figures and
    tables to a new MLflow run."""
    if bool(labels) != bool(label_column):
        raise SmidsError("--labels and --label-column go together: the table, and which of its columns holds the classes")
    class_root, frame = scan(root, classes, labels, label_column)
    report = check(class_root, frame)
    if report.frame.empty:
        raise SmidsError(f"{labels or class_root}: no readable image ({len(report.problems)} unreadable); nothing to "
                         "summarise")
    counts, resolutions = class_counts(report.frame), resolution_table(report.frame)
    problems = pd.DataFrame(report.problems, columns=["path", "reason"])
    facts = {"images": len(report.frame), "classes": len(counts), "unreadable": len(problems),
             "duplicate_groups": len(report.duplicates), "label_conflicts": len(report.conflicts),
             "unique_resolutions": len(resolutions),
             "width_median": float(report.frame["width"].median()), "height_median": float(report.frame["height"].median())}
    click.echo(f"{class_root}: {facts['images']} readable images in {facts['classes']} classes")
    for row in counts.itertuples(index=False):
        click.echo(f"  {row.label:<20} {row.images:>6}")
    click.echo(f"{facts['unique_resolutions']} unique resolutions; most common: " + ", ".join(
        f"{r.width}x{r.height} ({r.images})" for r in resolutions.head(5).itertuples(index=False)))
    for line in report.lines():
        click.echo(line)
    # what train's defaults decide from this data (on its default training part), printed by adapt
    defaults = TrainConfig()
    adapted = adapt(defaults, Dataset(class_root, report.frame.assign(split="train"), list(counts["label"])),
                    round(len(report.frame) * (1 - defaults.test_frac))).adapted if len(report.frame) else ""
    tracking.use_experiment(experiment)
    with mlflow.start_run(run_name="explore") as run:
        tracking.log_new_params({"data_root": str(class_root), "class_names": ",".join(counts["label"]),
                                 "defaults_adapted": adapted,
                                 **({"labels": labels, "label_column": label_column} if labels else {})})
        mlflow.log_metrics({k: v for k, v in facts.items()})
        tracking.log_frame(counts, "explore/class_counts.csv")
        tracking.log_frame(resolutions, "explore/resolutions.csv")
        tracking.log_frame(problems, "explore/check_report.csv")
        tracking.log_frame(pd.DataFrame({"group": range(len(report.duplicates + report.conflicts)),
                                         "kind": ["duplicate"] * len(report.duplicates) + ["conflict"] * len(report.conflicts),
                                         "paths": [" | ".join(g) for g in report.duplicates + report.conflicts]}),
                           "explore/duplicates.csv")
        tracking.log_figure(bar_figure(counts["label"], counts["images"].tolist(), "Images per class", "class"),
                            "explore/class_distribution.png")
        top = resolutions.head(5)
        tracking.log_figure(bar_figure([f"{w}x{h}" for w, h in zip(top["width"], top["height"])],
                                       top["images"].tolist(), "Five most common resolutions", "width x height"),
                            "explore/top_resolutions.png")
        tracking.log_figure(resolution_figure(report.frame), "explore/resolution_scatter.png")
        tracking.log_figure(sample_grid(report, class_root), "explore/samples.png")
    click.echo(f"logged to run {run.info.run_id}")
    return {"run_id": run.info.run_id, "adapted": adapted, **facts}


@click.command("explore", cls=Command)
@click.argument("data", type=click.Path(path_type=str))
@click.option("--labels", default=None, help="A CSV table of labels (a `path` column relative to DATA) in place of "
                                            "class folders.")
@click.option("--label-column", default=None, help="The --labels column whose values are the classes.")
@click.option("--classes", default=None, help="Comma-separated class folders (default: every class folder found).")
@click.option("--experiment", default="smids-ml-explore", show_default=True, help="MLflow experiment name.")
def main(data, labels, label_column, classes, experiment):
    """Summarise a data root (classes, resolutions, unreadable files, duplicates) and log it to MLflow."""
    explore(data, [c for c in classes.split(",") if c] if classes else None, experiment, labels or None,
            label_column or None)


if __name__ == "__main__":
    main()
