"""Accuracy on real crops: k-fold cross-validation of named recipes, and an honest k-fold ensemble.

    python -m benchmarks.bench_accuracy                      # default and original, 5 folds, smids-dev
    python -m benchmarks.bench_accuracy --recipes default --folds 3 --epochs 15    # a quick screen
    python -m benchmarks.bench_accuracy --recipes default,default+image_size=128 --folds 3 --no-ensemble
    python -m benchmarks.bench_accuracy --recipes default --no-cv --ensemble-of seeds --members 3 --outer-folds 5

A recipe is a preset name, optionally followed by `+field=value` overrides of TrainConfig fields.

Every recipe row is `smids_ml.cv.cross_validate` (the code `smids-ml cv` runs), logged to MLflow
(experiment `smids-ml-bench-accuracy`): test accuracy and macro F1 as mean ± std over the folds.

The ensemble rows never score an image that a member trained or was selected on: one stratified
fold (1/k of the data) is held out, the members of the first recipe train on the rest, and the
ensemble (mean of their probabilities) and each member are scored on the held-out images. With
`--ensemble-of folds` the members are the fold models of cross-validation on the rest (what
`smids-ml cv --register-as` registers: each sees (m-1)/m of it); with `--ensemble-of seeds` they
are seeds trained on all of it (what `smids-ml train --members m` registers). `--outer-folds`
repeats this with each of the first n folds held out in turn (n = k: nested cross-validation,
every image scored once), so the ensemble's figure does not rest on one fold of the data.
With `--ensemble-of recipes` the members are the listed recipes themselves, at no extra training:
each image's out-of-fold probabilities from every recipe's cross-validation (one model of each
recipe that never saw it) are averaged, and scored per fold of the first recipe.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd

from benchmarks.common import machine, recipe_config, table
from smids_ml import SmidsError, tracking
from smids_ml.adapt import adapt
from smids_ml.config import PRESETS, TrainConfig
from smids_ml.compute import training_flops
from smids_ml.cv import cross_validate, fold_dataset, fold_probabilities
from smids_ml.data import MANIFEST_COLUMNS, Dataset, assign_folds, load_tensors, make_batches, prepare_data
from smids_ml.engine import classification_metrics, predict_proba, resolve_device
from smids_ml.evaluate import predictions_frame
from smids_ml.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "smids-dev"
EXPERIMENT = "smids-ml-bench-accuracy"


HEADERS = ["recipe", "accuracy", "macro F1", "MCC", "TFLOP/model", "min/fold"]


def spread(values) -> str:
    """mean ± sample standard deviation, 4 decimals (the mean alone for one value)."""
    values = list(values)
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def cv_row(recipe: str, cfg: TrainConfig, folds: int) -> tuple[list[list], pd.DataFrame, float]:
    """The recipe's table row (and, with test-time averaging, the same fold models scored on one view: a
    paired comparison at no extra training), its out-of-fold predictions (for an ensemble of recipes) and
    its TFLOP per model."""
    dataset = prepare_data(cfg)
    start = time.perf_counter()
    result = cross_validate(cfg, folds, EXPERIMENT, run_name=f"bench {recipe} ({folds}-fold)", dataset=dataset)
    minutes = (time.perf_counter() - start) / 60 / folds
    s = result.summary
    cfg = result.cfg
    cost = training_flops(cfg, len(dataset.classes), round(result.folds["n_train"].mean())) / 1e12
    rows = [[f"{recipe} ({folds}-fold CV)", spread(result.folds["test_accuracy"]), spread(result.folds["test_f1_macro"]),
             spread(result.folds["test_mcc"]), f"{cost:.1f}", f"{minutes:.1f}"]]
    if cfg.tta != "none":
        rows.append(single_view_row(cfg, folds, dataset, result.networks) + [f"{cost:.1f}", ""])
    return rows, result.out_of_fold, cost


def single_view_row(cfg: TrainConfig, folds: int, dataset: Dataset, networks: list) -> list:
    """The fold models of a test-time-averaging recipe, each scored on one view of its test fold."""
    fold = assign_folds(dataset.manifest, folds, cfg.seed)
    scores = []
    for k, network in enumerate(networks):
        part = fold_dataset(dataset, fold, k, cfg.valid_frac, cfg.seed)
        targets = part.part("test")["label"].map({c: i for i, c in enumerate(part.classes)}).to_numpy()
        probs = fold_probabilities(network.network, part, cfg)
        scores.append(classification_metrics(targets, probs, "test"))
    return ["  the same fold models, one view (no test-time averaging)", spread(m["test_acc"] for m in scores),
            spread(m["test_f1"] for m in scores), spread(m["test_mcc"] for m in scores)]


def recipes_ensemble_row(names: list[str], out_of_fold: list[pd.DataFrame], tflops: list[float]) -> list:
    """The mean of the recipes' out-of-fold probabilities per image, scored per fold of the first recipe:
    nested cross-validation of an ensemble of one model per recipe, every image scored by models that
    never saw it. Logged to MLflow with the averaged predictions."""
    frames = [frame.set_index("path").sort_index() for frame in out_of_fold]
    if any(not frame.index.equals(frames[0].index) for frame in frames):
        raise SmidsError("--ensemble-of recipes: the recipes scored different images (their data or classes differ)")
    classes = [c for c in frames[0].columns if c not in ("label", "predicted", "confidence", "correct", "fold")]
    probs = np.mean([frame[classes].to_numpy() for frame in frames], axis=0)
    first = frames[0]
    targets = first["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = first["fold"].to_numpy()
    per_fold = [classification_metrics(targets[folds == k], probs[folds == k], "test") for k in np.unique(folds)]
    acc, f1 = [m["test_acc"] for m in per_fold], [m["test_f1"] for m in per_fold]
    mcc = [m["test_mcc"] for m in per_fold]
    with mlflow.start_run(run_name=f"bench ensemble of {' & '.join(names)} (out-of-fold)"):
        mlflow.log_metrics({"cv_ensemble_accuracy_mean": float(np.mean(acc)), "cv_ensemble_f1_macro_mean": float(np.mean(f1)),
                            "cv_ensemble_mcc_mean": float(np.mean(mcc))})
        tracking.log_frame(predictions_frame(first.reset_index(), classes, probs).assign(fold=folds), "predictions.csv")
    return [f"ensemble of the {len(names)} recipes (mean of their out-of-fold probabilities: one model of each, "
            f"none saw the crop), {len(np.unique(folds))}-fold", spread(acc), spread(f1), spread(mcc),
            f"{sum(tflops):.1f}", ""]


def holdout_scores(recipe: str, cfg: TrainConfig, dataset: Dataset, held: pd.Series, members: int, members_of: str,
                   label: str) -> dict:
    """Train `members` models without the `held` rows; score each of them and their mean on those rows.
    The held-out rows go to the run as holdout.csv, beside the manifest.csv of what the members saw."""
    held_out = dataset.with_manifest(dataset.manifest[held].assign(split="test").reset_index(drop=True))
    rest = dataset.with_manifest(dataset.manifest[~held].reset_index(drop=True))
    start = time.perf_counter()
    if members_of == "folds":
        result = cross_validate(cfg, members, EXPERIMENT, run_name=f"bench {recipe} {members}-fold ensemble{label}",
                                dataset=rest)
    else:
        both = dataset.with_manifest(pd.concat([rest.manifest.assign(split="train"), held_out.manifest],
                                               ignore_index=True))
        result = train(cfg, EXPERIMENT, f"bench {recipe} {members}-seed ensemble{label}", members=members, dataset=both)
    minutes = (time.perf_counter() - start) / 60 / members
    device = resolve_device(cfg.device)
    images = load_tensors(held_out, cfg.image_size, cfg.channels, cfg.resize)
    batches = make_batches(held_out, images, 128, augment=False, strength=0.0, seed=0, device=device)["test"]
    scored = [predict_proba(network, batches, device) for network in result.networks]
    targets = scored[0][1]
    alone = [classification_metrics(targets, probs, "holdout") for probs, _ in scored]
    mean = classification_metrics(targets, np.mean([probs for probs, _ in scored], axis=0), "holdout")
    with mlflow.start_run(run_id=result.run_id):
        tracking.log_frame(held_out.manifest[MANIFEST_COLUMNS], "holdout.csv")
        mlflow.log_metrics({"holdout_ensemble_accuracy": mean["holdout_acc"],
                            "holdout_ensemble_f1_macro": mean["holdout_f1"],
                            "holdout_members_accuracy_mean": float(np.mean([m["holdout_acc"] for m in alone])),
                            "holdout_images": len(targets)})
    trained_on = len(rest.manifest) * ((members - 1) / members if members_of == "folds" else 1)
    return {"member_acc": [m["holdout_acc"] for m in alone], "member_f1": [m["holdout_f1"] for m in alone],
            "member_mcc": [m["holdout_mcc"] for m in alone],
            "acc": mean["holdout_acc"], "f1": mean["holdout_f1"], "mcc": mean["holdout_mcc"], "images": len(targets), "minutes": minutes,
            "tflop": training_flops(cfg, len(dataset.classes), round(trained_on)) / 1e12}


def ensemble_rows(recipe: str, cfg: TrainConfig, folds: int, members_of: str = "folds", members: int | None = None,
                  outer_folds: int = 1) -> list[list]:
    """Split the data into `folds` stratified parts; hold out each of the first `outer_folds` in turn, train
    the members on the rest and score them and their mean on it. Mean ± std over the held-out parts (and,
    for the members alone, over every member)."""
    members = members or folds
    dataset = prepare_data(cfg)
    cfg = adapt(cfg, dataset, round(len(dataset.manifest) * (folds - 1) / folds))
    outer = assign_folds(dataset.manifest, folds, cfg.seed + 1)
    scores = [holdout_scores(recipe, cfg, dataset, pd.Series(outer == i, index=dataset.manifest.index), members,
                             members_of, f" (held-out part {i + 1}/{folds})" if outer_folds > 1 else "")
              for i in range(outer_folds)]
    images = sum(s["images"] for s in scores)
    where = (f"the same {images} held-out images" if outer_folds == 1 else
             f"{outer_folds} held-out parts of 1/{folds} in turn ({images} images)")
    described = (f"{members} fold models of CV on the rest" if members_of == "folds"
                 else f"{members} seeds trained on all the rest")

    return [[f"its members ({described}), each alone, on {where}",
             spread([a for s in scores for a in s["member_acc"]]), spread([f for s in scores for f in s["member_f1"]]),
             spread([m for s in scores for m in s["member_mcc"]]), f"{np.mean([s['tflop'] for s in scores]):.1f}", f"{np.mean([s['minutes'] for s in scores]):.1f}"],
            [f"{recipe}: {members}-model ensemble (mean of probabilities), {where}",
             spread([s["acc"] for s in scores]), spread([s["f1"] for s in scores]), spread([s["mcc"] for s in scores]),
             f"{members * np.mean([s['tflop'] for s in scores]):.1f}", ""]]


@click.command()
@click.option("--data", "data_sets", multiple=True, default=[str(DEFAULT_DATA)], show_default=True,
              help="Labelled real crops: a folder of class folders, or TABLE.csv:COLUMN (a table of labels, paths "
                   "relative to its folder, e.g. ../shared/data/mhsma-dev/labels.csv:head); give it again for more "
                   "data sets (one table each, the same recipes and folds).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--recipes", default="default,original", show_default=True,
              help=f"Comma-separated recipes: a preset ({', '.join(PRESETS)}) with optional +field=value "
                   "overrides; the first one is also the ensemble's.")
@click.option("--cv/--no-cv", "cv_rows", default=True, show_default=True, help="The k-fold row of each recipe.")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True, help="Add the held-out ensemble rows.")
@click.option("--ensemble-of", type=click.Choice(["folds", "seeds", "recipes"]), default="folds", show_default=True,
              help="Ensemble members: the fold models of CV on the non-held-out data (cv --register-as), "
                   "seeds trained on all of it (train --members), or one model of each recipe (their "
                   "out-of-fold predictions averaged: nested, no extra training).")
@click.option("--members", type=click.IntRange(min=2), default=None,
              help="Ensemble size: the inner folds or the seeds (default: --folds).")
@click.option("--outer-folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hold out this many of the --folds parts in turn (--folds: nested cross-validation, every image "
                   "scored once by an ensemble that never saw it).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override every recipe's epochs (screening).")
@click.option("--image-size", type=click.IntRange(min=16), default=None, help="Override every recipe's input size.")
@click.option("--num-threads", type=click.IntRange(min=0), default=0, help="Torch CPU threads (0: torch's default).")
def main(data_sets: tuple[str, ...], folds: int, recipes: str, cv_rows: bool, ensemble: bool, ensemble_of: str,
         members: int | None, outer_folds: int, epochs: int | None, image_size: int | None, num_threads: int) -> None:
    """Cross-validated accuracy of recipes on real crops, and of their k-fold ensemble: one table per data set."""
    sources = [data_source(spec) for spec in data_sets]  # every spec checked before anything trains
    overrides = {k: v for k, v in {"epochs": epochs, "image_size": image_size,
                                   "num_threads": num_threads or None}.items() if v is not None}
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    if ensemble and ensemble_of == "recipes" and (len(names) < 2 or not cv_rows or members or outer_folds > 1):
        raise SmidsError("--ensemble-of recipes averages the cross-validation rows of two or more --recipes: "
                         "it needs --cv, and takes no --members or --outer-folds")
    if ensemble and ensemble_of != "recipes" and outer_folds > folds:
        raise SmidsError(f"--outer-folds {outer_folds} is more than the {folds} parts of --folds")
    tables = [(spec, data_set_rows(data, names, {**overrides, **labels}, folds, cv_rows, ensemble, ensemble_of,
                                   members, outer_folds))
              for spec, (data, labels) in zip(data_sets, sources)]
    for spec, rows in tables:
        print(f"\n{spec}")
        print(table(HEADERS, rows))


def data_source(spec: str) -> tuple[Path, dict]:
    """(the data root, the config fields of a table of labels) for `FOLDER` or `TABLE.csv:COLUMN`."""
    table_path, sep, column = spec.rpartition(":")
    if sep and table_path.lower().endswith(".csv"):
        if not Path(table_path).is_file():
            raise SmidsError(f"no table of labels at {table_path}")
        return Path(table_path).resolve().parent, {"labels": str(Path(table_path).resolve()), "label_column": column}
    if not Path(spec).is_dir():
        raise SmidsError(f"no real crops at {spec}: pass --data with a folder of class folders or TABLE.csv:COLUMN "
                         "(the benchmark needs real data; tests use synthetic sets)")
    return Path(spec), {}


def data_set_rows(data: Path, names: list[str], overrides: dict, folds: int, cv_rows: bool, ensemble: bool,
                  ensemble_of: str, members: int | None, outer_folds: int) -> list[list]:
    """Every row of one data set's table, each recipe's printed as soon as it is measured."""
    labelled = f" labelled by {overrides['labels']} ({overrides['label_column']})" if "labels" in overrides else ""
    print(f"accuracy on {data}{labelled}, {machine()}", flush=True)
    rows, out_of_fold, tflops = [], [], []
    for name in names if cv_rows else []:
        recipe_rows, predictions, cost = cv_row(name, recipe_config(name, data, overrides), folds)
        rows += recipe_rows
        out_of_fold.append(predictions)
        tflops.append(cost)
        print(table(HEADERS, recipe_rows), flush=True)
    if ensemble and ensemble_of == "recipes":
        rows.append(recipes_ensemble_row(names, out_of_fold, tflops))
    elif ensemble:
        rows += ensemble_rows(names[0], recipe_config(names[0], data, overrides), folds, ensemble_of, members,
                              outer_folds)
    return rows


if __name__ == "__main__":
    main()
