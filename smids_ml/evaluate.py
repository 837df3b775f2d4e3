"""Evaluate a logged model on data it was never tuned on: `python -m smids_ml.evaluate models:/best@champion`.

By default the test split recorded with the model's training run (its manifest.csv artifact) is
evaluated, on the data root that run used, with the model's own preprocessing. Metrics, figures
and per-image predictions go to a new MLflow run tagged with the model; `compare` tabulates the
latest evaluations of several models. `smids_ml.cv` scores its folds with `log_evaluation` below.

Why scikit-learn and not `mlflow.models.evaluate`: its classifier evaluator would call the pyfunc
on base64 strings (re-encoding and re-decoding every image), cannot score cross-validation folds
(an in-memory network, not a logged model), and lacks calibration error, bootstrap intervals and
the gallery; computing everything from one probability matrix keeps evaluate and cv identical.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sklearn.metrics import accuracy_score, log_loss, matthews_corrcoef, precision_recall_fscore_support, roc_auc_score

from smids_ml import SmidsError, plots, tracking
from smids_ml.console import Command
from smids_ml.data import MANIFEST_COLUMNS, Dataset, check, load_manifest, load_tensors, open_image, scan
from smids_ml.explain import explain, side_by_side
from smids_ml.serving import load_classifier, one_line
from smids_ml.tracking import ModelSource, resolve_model, use_experiment

DEFAULT_EXPERIMENT = "smids-ml-evaluation"
SPLITS = ("test", "valid", "train", "all")
ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
GALLERY_SIZE = 18
# Shown in the terminal, set as registered-version tags and tabulated by `compare` (after the split prefix).
HEADLINE = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro", "f1_macro_ci_low", "f1_macro_ci_high",
            "mcc", "precision_macro", "recall_macro", "roc_auc_macro", "log_loss", "ece")
PER_CLASS = ("precision", "recall", "f1", "roc_auc")


# --------------------------------------------------------------------------- metrics


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Equal-width confidence bins (lower, upper]: image count, mean confidence and accuracy of each."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    seen = np.maximum(count, 1)
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count,
                         "confidence": np.bincount(which, weights=confidence, minlength=n_bins) / seen,
                         "accuracy": np.bincount(which, weights=correct, minlength=n_bins) / seen})


def expected_calibration_error(bins: pd.DataFrame) -> float:
    """Mean gap between confidence and accuracy, weighted by how many images fall in each bin."""
    return float((bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / bins["count"].sum())


def bootstrap_ci(targets: np.ndarray, predicted: np.ndarray, n_classes: int, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Percentile intervals for accuracy and macro F1, all resamples at once (a resamples × n index)."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(targets), size=(resamples, len(targets)))
    t, p = targets[index], predicted[index]
    accuracy = (t == p).mean(1)
    f1 = np.zeros(resamples)
    for k in range(n_classes):  # F1 = 2 TP / (true + predicted); 0 where the class is absent (as zero_division=0)
        true_positives = ((t == k) & (p == k)).sum(1)
        denominator = (t == k).sum(1) + (p == k).sum(1)
        f1 += np.divide(2.0 * true_positives, denominator, out=np.zeros(resamples), where=denominator > 0)
    f1 /= n_classes
    tails = [50 * (1 - level), 50 * (1 + level)]
    (acc_low, acc_high), (f1_low, f1_high) = np.percentile(accuracy, tails), np.percentile(f1, tails)
    return {"accuracy_ci_low": acc_low, "accuracy_ci_high": acc_high,
            "f1_macro_ci_low": f1_low, "f1_macro_ci_high": f1_high}


def compute_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str], prefix: str) -> dict[str, float]:
    """Every metric of one evaluated set, named `<prefix>_<metric>` so runs line up in `mlflow ui`.

    ROC AUC is one-vs-rest per class; the macro value averages the classes present in `targets`
    (a class with no image has no ROC curve). MCC (Matthews' correlation, multi-class) is 0 for a model that
    always answers the majority class, whatever the balance: the figure to read beside accuracy on imbalanced sets.
    """
    predicted = probs.argmax(1)
    labels = list(range(len(classes)))
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, labels=labels, average=None,
                                                               zero_division=0)
    out = {"accuracy": accuracy_score(targets, predicted), "precision_macro": precision.mean(),
           "recall_macro": recall.mean(), "f1_macro": f1.mean(), "mcc": matthews_corrcoef(targets, predicted),
           "log_loss": log_loss(targets, probs, labels=labels),
           "ece": expected_calibration_error(calibration_bins(probs.max(1), predicted == targets))}
    out.update(bootstrap_ci(targets, predicted, len(classes)))
    aucs = []
    for k, name in enumerate(classes):
        out.update({f"precision_{name}": precision[k], f"recall_{name}": recall[k], f"f1_{name}": f1[k]})
        positives = targets == k
        if positives.any() and not positives.all():
            aucs.append(out.setdefault(f"roc_auc_{name}", roc_auc_score(positives, probs[:, k])))
    if aucs:
        out["roc_auc_macro"] = np.mean(aucs)
    return {f"{prefix}_{name}": float(value) for name, value in out.items()}


# --------------------------------------------------------------------------- logging (shared with cv)


def predictions_frame(frame: pd.DataFrame, classes: list[str], probs: np.ndarray) -> pd.DataFrame:
    """One row per image: path, label, predicted, confidence, a probability per class, correct."""
    out = pd.DataFrame({"path": frame["path"].to_numpy(), "label": frame["label"].to_numpy(),
                        "predicted": [classes[i] for i in probs.argmax(1)], "confidence": probs.max(1)})
    for k, name in enumerate(classes):
        out[name] = probs[:, k]
    out["correct"] = out["label"] == out["predicted"]
    return out


def log_evaluation(frame: pd.DataFrame, root: Path, classes: list[str], probs: np.ndarray, prefix: str,
                   folder: str = "", model=None) -> tuple[dict[str, float], pd.DataFrame]:
    """Score `probs` (one row per row of `frame`, a manifest part); log metrics, figures and predictions.
    With the loaded `model`, the gallery of mistakes shows each crop beside the Grad-CAM of its wrong class."""
    probs = np.asarray(probs, dtype=np.float64)
    probs /= probs.sum(1, keepdims=True)  # float32 softmax rows miss 1 by ~1e-7; sklearn's log_loss warns
    index = {c: i for i, c in enumerate(classes)}
    targets = frame["label"].map(index).to_numpy()
    metrics = compute_metrics(targets, probs, classes, prefix)
    mlflow.log_metrics(metrics)
    predictions = predictions_frame(frame, classes, probs)
    tracking.log_frame(predictions, posixpath.join(folder, "predictions.csv"))

    def figure(fig, name):
        tracking.log_figure(fig, posixpath.join(folder, "plots", name))

    predicted, n = probs.argmax(1), len(frame)
    figure(plots.confusion_matrix(targets, predicted, classes, title=f"{prefix}: counts ({n} images)"),
           "confusion_matrix.png")
    figure(plots.confusion_matrix(targets, predicted, classes, normalize="true",
                                  title=f"{prefix}: rows normalised (recall on the diagonal)"),
           "confusion_matrix_normalized.png")
    figure(plots.roc_curves(targets, probs, classes, title=f"{prefix}: ROC curves (one vs rest)"), "roc_curves.png")
    ece = metrics[f"{prefix}_ece"]
    figure(plots.reliability_diagram(calibration_bins(probs.max(1), predicted == targets), ece,
                                     title=f"{prefix}: reliability (ECE {ece:.3f}, {ECE_BINS} bins)"),
           "reliability_diagram.png")
    worst = predictions[~predictions["correct"]].nlargest(GALLERY_SIZE, "confidence")
    crops = [open_image(root / p).convert("RGB") for p in worst["path"]]
    if model is not None and crops:
        crops = [side_by_side(crop, heat) for crop, heat in
                 zip(crops, explain(model, crops, [classes.index(p) for p in worst["predicted"]]))]
    figure(plots.misclassified_gallery(crops, list(worst["label"]), list(worst["predicted"]), list(worst["confidence"]),
                                       title=f"{prefix}: most confident mistakes"
                                             + (" (right: Grad-CAM of the predicted class)" if model else "")),
           "misclassified.png")
    return metrics, predictions


# --------------------------------------------------------------------------- the model and its data


def evaluation_data(source: ModelSource, data: str | None, split_manifest: str | None, workdir: str,
                    labels: str | None = None, label_column: str | None = None) -> Dataset:
    """The verified manifest (the training run's unless given) on the data root (the run's `data` unless given),
    its labels checked against the labels table the run used (or `labels`), when it used one."""
    if source.run_id is None and not (data and split_manifest):
        raise SmidsError(f"cannot tell which run trained {source.uri}: pass --data and --split-manifest")
    name = None
    try:
        if not split_manifest:
            name = f"runs:/{source.run_id}/manifest.csv"  # what errors call it, not the temporary download
            split_manifest = mlflow.artifacts.download_artifacts(run_id=source.run_id, artifact_path="manifest.csv",
                                                                 dst_path=workdir)
        params = MlflowClient().get_run(source.run_id).data.params if source.run_id else {}
        if not data:  # the absolute class root the run used; `data` as typed may be relative to another folder
            data = params.get("data_root") or params.get("data")
        if not labels and params.get("labels_table"):
            labels, label_column = params["labels_table"], params.get("label_column")
    except MlflowException as exc:
        raise SmidsError(f"training run {source.run_id} of {source.uri} has no usable manifest.csv "
                         f"({one_line(exc)}); pass --split-manifest") from None
    if not data:
        raise SmidsError(f"training run {source.run_id} has no `data` parameter; pass --data")
    return load_manifest(split_manifest, data, labels=labels, label_column=label_column, name=name)


def training_manifest(source: ModelSource, workdir: str) -> pd.DataFrame:
    """The manifest rows logged with the model's training run (every image it trained or was selected on)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=source.run_id, artifact_path="manifest.csv",
                                                   dst_path=f"{workdir}/training-run-{source.run_id}")
        return pd.read_csv(path)
    except (MlflowException, OSError, ValueError) as exc:
        raise SmidsError(f"training run {source.run_id} of {source.uri} has no usable manifest.csv "
                         f"({one_line(exc)}); cannot tell which images it trained on") from None


def foreign_data(source: ModelSource, data: str, workdir: str, strict: bool = False, labels: str | None = None,
                 label_column: str | None = None) -> tuple[Dataset, pd.DataFrame]:
    """Every readable image of a labelled folder (or table) the training run never listed, as split `all`, and
    the rows left out because their pixels are in the training run's manifest (any split of it)."""
    class_root, frame = scan(data, labels=labels, label_column=label_column)
    report = check(class_root, frame, strict=strict)
    for line in report.lines():
        click.echo(line, err=True)
    if source.run_id is None:
        raise SmidsError(f"cannot tell which run trained {source.uri}, so its training images cannot be left out "
                         f"of {data}; use a models:/ or runs:/ URI")
    seen = set(training_manifest(source, workdir)["hash"])
    manifest = report.frame.assign(split="all")
    overlap = manifest["hash"].isin(seen)
    if overlap.any():
        names = ", ".join(manifest.loc[overlap, "path"].head(5))
        more = f" and {overlap.sum() - 5} more" if overlap.sum() > 5 else ""
        click.echo(f"left out {overlap.sum()} of {len(manifest)} images whose pixels are in the training run's "
                   f"manifest: {names}{more}", err=True)
    if overlap.all():
        raise SmidsError(f"every readable image in {class_root} is in the training run's manifest: nothing to evaluate")
    kept = manifest[~overlap].sort_values("path").reset_index(drop=True)
    return (Dataset(class_root, kept, sorted(set(kept["label"])), table=Path(labels) if labels else None,
                    label_column=label_column if labels else None), manifest[overlap].reset_index(drop=True))


def select_split(dataset: Dataset, split: str, classes: list[str], uri: str) -> Dataset:
    """The rows to evaluate, labelled in the model's class order; refuses labels the model never learned."""
    unknown = sorted(set(dataset.manifest["label"]) - set(classes))
    if unknown:
        raise SmidsError(f"the data has label(s) {', '.join(unknown)} that {uri} does not know "
                         f"(its classes: {', '.join(classes)})")
    rows = dataset.manifest if split == "all" else dataset.part(split)
    if rows.empty:
        raise SmidsError(f"the manifest has no {split} images (a cross-validation ensemble trained on all of its "
                         "data); score a folder the model never saw with --data FOLDER --split all")
    return dataset.with_manifest(rows.reset_index(drop=True), list(classes))


@dataclass
class Evaluation:
    run_id: str
    source: ModelSource
    split: str
    classes: list[str]
    metrics: dict[str, float]
    predictions: pd.DataFrame


def evaluate(model_uri: str, data: str | None = None, split_manifest: str | None = None, split: str = "test",
             batch: int = 64, experiment: str | None = DEFAULT_EXPERIMENT, labels: str | None = None,
             label_column: str | None = None) -> Evaluation:
    """Evaluate one model in a new (or `mlflow run`'s) run; tag its registered version with the headline metrics."""
    if bool(labels) != bool(label_column):
        raise SmidsError("--labels and --label-column go together: the table, and which of its columns holds the classes")
    source = resolve_model(model_uri)
    model = load_classifier(source.uri)  # first: a model that is no classifier is refused before its data is read
    excluded = None
    with tempfile.TemporaryDirectory() as workdir:
        if split == "all" and data and not split_manifest:
            dataset, excluded = foreign_data(source, data, workdir, labels=labels, label_column=label_column)
        else:
            dataset = evaluation_data(source, data, split_manifest, workdir, labels, label_column)
    part = select_split(dataset, split, model.classes, model_uri)
    images = model.pack([load_tensors(part, *spec) for spec in model.inputs])
    probs = np.concatenate([model.probabilities(images[i:i + batch]) for i in range(0, len(images), batch)])
    use_experiment(experiment)
    with mlflow.start_run(run_name=f"evaluate {source.canonical} ({split})") as run:
        mlflow.set_tags({"evaluated_model_uri": model_uri, "evaluated_model": source.canonical,
                         "evaluated_split": split, "training_run_id": source.run_id or ""})
        tracking.log_new_params({"model_uri": model_uri, "split": split, "data_root": str(part.root),
                           "n_images": len(part.manifest), "classes": ",".join(model.classes)})
        tracking.log_frame(part.manifest[MANIFEST_COLUMNS], "manifest.csv")  # exactly the images evaluated
        tracking.log_dataset(part, "test")
        if excluded is not None:
            mlflow.log_param("n_excluded_seen_in_training", len(excluded))
            tracking.log_frame(excluded[MANIFEST_COLUMNS], "excluded_seen_in_training.csv")
        metrics, predictions = log_evaluation(part.manifest, part.root, model.classes, probs, prefix=split, model=model)
    if source.version:
        client = MlflowClient()
        tags = {name: f"{metrics[name]:.4f}" for name in (f"{split}_{m}" for m in HEADLINE) if name in metrics}
        for key, value in {**tags, f"{split}_evaluation_run_id": run.info.run_id}.items():
            client.set_model_version_tag(source.name, source.version, key, value)
    return Evaluation(run.info.run_id, source, split, list(model.classes), metrics, predictions)


def summary(metrics: dict[str, float], classes: list[str], prefix: str) -> str:
    """Headline metrics (with their 95% intervals) and a per-class table, for the terminal."""
    def value(name):
        return metrics.get(f"{prefix}_{name}", float("nan"))

    lines = []
    for name in (m for m in HEADLINE if "_ci_" not in m):
        line = f"{prefix}_{name:<16}{value(name):.4f}"
        if f"{prefix}_{name}_ci_low" in metrics:
            line += f"  95% CI [{value(name + '_ci_low'):.4f}, {value(name + '_ci_high'):.4f}]"
        lines.append(line)
    per_class = pd.DataFrame({kind: [value(f"{kind}_{c}") for c in classes] for kind in PER_CLASS}, index=classes)
    return "\n".join(lines) + "\n\n" + per_class.to_string(float_format="{:.4f}".format)


@click.command("evaluate", cls=Command)
@click.argument("model_uri")
@click.option("--data", default=None, help="Data root (default: the one the model's training run used).")
@click.option("--labels", default=None, help="A CSV table of labels (paths relative to --data) in place of class "
                                            "folders (default: the table the model's training run used, if any).")
@click.option("--label-column", default=None, help="The --labels column whose values are the classes.")
@click.option("--split-manifest", default=None,
              help="Manifest CSV to evaluate (default: the manifest.csv logged with the model's training run).")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True,
              help="Manifest split to evaluate; metric names start with it (test_accuracy, valid_accuracy, ...). "
                   "--split all with --data FOLDER (no --split-manifest) scores every image of a labelled folder, "
                   "leaving out and reporting those whose pixels are in the training run's manifest.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment for the run.")
def main(model_uri, data, labels, label_column, split_manifest, split, batch, experiment):
    """Evaluate MODEL_URI (models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID, runs:/RUN/model).

    Empty --data, --labels, --label-column or --split-manifest (as `mlflow run` passes them) mean "not given".
    """
    result = evaluate(model_uri, data or None, split_manifest or None, split, batch, experiment, labels or None,
                      label_column or None)
    click.echo(f"{model_uri} ({result.source.canonical}): {len(result.predictions)} images of split {split}, "
               f"evaluation run {result.run_id}")
    click.echo(summary(result.metrics, result.classes, split))


# --------------------------------------------------------------------------- compare


def latest_evaluation(source: ModelSource):
    """The newest test-split evaluation run of a model (any experiment), or None."""
    runs = mlflow.search_runs(search_all_experiments=True, max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.evaluated_model = '{source.canonical}' "
                                            "and tags.evaluated_split = 'test'")
    return None if runs.empty else runs.iloc[0]


def compare_table(uris: list[str]) -> pd.DataFrame:
    """One row per model: its latest test metrics, or a hint to evaluate it first."""
    rows = []
    for uri in uris:
        source = resolve_model(uri)
        run = latest_evaluation(source)
        row = {"model": uri, "resolves_to": source.canonical}
        if run is None:
            row["evaluation_run"] = f"not evaluated yet: run smids-ml evaluate {uri}"
        else:
            row.update(evaluation_run=run["run_id"], n_images=run.get("params.n_images"))
            row.update({f"test_{m}": run.get(f"metrics.test_{m}") for m in HEADLINE})
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "resolves_to", "evaluation_run", "n_images",
                                       *(f"test_{m}" for m in HEADLINE)])


@click.command("compare", cls=Command)
@click.argument("model_uris", nargs=-1, required=True)
@click.option("--output", default="compare.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the table as CSV.")
def compare(model_uris, output):
    """Tabulate the latest test metrics of several models (from their `smids-ml evaluate` runs)."""
    table = compare_table(list(model_uris))
    table.to_csv(output, index=False)
    shown = table.drop(columns=[c for c in table.columns if "_ci_" in c]).set_index("model").T
    click.echo(shown.to_string(float_format="{:.4f}".format, na_rep="-"))
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
