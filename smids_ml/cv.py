"""Stratified k-fold cross-validation under one parent run: `python -m smids_ml.cv --folds 5 --data data`.

Fold k is the test fold; a validation part for early stopping is carved (stratified, seeded) from
the other folds, unless --valid-frac is 0. Each fold trains in a nested child run (`train.run_training`) and is scored on its
test fold by `evaluate.log_evaluation`, the code `smids-ml evaluate` uses. The parent run holds the
mean and sample standard deviation of every test metric (`cv_test_accuracy_mean`, `..._std`), as
published 5-fold SMIDS results are reported, the per-fold table, and the pooled out-of-fold
predictions (every image scored once, by the model that never saw it).

With `--register-as`, the K fold models become one logged model (the mean of their probabilities,
the same pyfunc class as a single model) on the parent run, registered under that name.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import mlflow
import numpy as np
import pandas as pd

from smids_ml import tracking
from smids_ml.adapt import adapt
from smids_ml.config import CV_EXPERIMENT as DEFAULT_EXPERIMENT, TrainConfig
from smids_ml.data import MANIFEST_COLUMNS, Dataset, assign_folds, carve_valid, load_tensors, make_batches, prepare_data
from smids_ml.engine import predict_proba, resolve_device, resolve_precision
from smids_ml.evaluate import HEADLINE, log_evaluation
from smids_ml.train import run_training



def fold_dataset(dataset: Dataset, fold: pd.Series, k: int, valid_frac: float, seed: int) -> Dataset:
    """The data set with fold k as test, a validation part of the other folds, and the rest as train."""
    manifest = dataset.manifest.copy()
    manifest["split"] = np.where(fold == k, "test", "train")
    rest = manifest[fold != k]
    manifest.loc[rest.index[carve_valid(rest, valid_frac, seed).to_numpy()], "split"] = "valid"
    return dataset.with_manifest(manifest)


def fold_probabilities(network, dataset: Dataset, cfg: TrainConfig) -> np.ndarray:
    """The trained network's probabilities for the test rows (manifest order), from the cached tensors."""
    device = resolve_device(cfg.device)
    images = load_tensors(dataset, cfg.image_size, cfg.channels, cfg.resize)
    batches = make_batches(dataset, images, cfg.batch, augment=False, strength=0.0, seed=cfg.seed, device=device)
    return predict_proba(network, batches["test"], device, resolve_precision(cfg.precision, device, cfg.model))[0]


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Mean and sample standard deviation over folds of every test metric (intervals are per fold: left out)."""
    metrics = [c for c in table.columns if c.startswith("test_") and "_ci_" not in c]
    return {**{f"cv_{m}_mean": float(table[m].mean()) for m in metrics},
            **{f"cv_{m}_std": float(table[m].std()) for m in metrics}}


@dataclass
class CVResult:
    run_id: str
    folds: pd.DataFrame  # one row per fold: run id, sizes, best epoch and test metrics
    summary: dict[str, float]
    networks: list  # the fold models, in fold order
    cfg: TrainConfig  # as trained: with the values decided from the data
    out_of_fold: pd.DataFrame  # every image's prediction by the fold model that never saw it, with its fold
    model_uri: str | None = None  # the ensemble, when logged
    version: str | None = None  # its registered version


def cross_validate(cfg: TrainConfig, folds: int = 5, experiment: str | None = DEFAULT_EXPERIMENT,
                   run_name: str | None = None, register_as: str | None = None, alias: str | None = None,
                   dataset: Dataset | None = None, nested: bool = False) -> CVResult:
    """Train and test `folds` models in nested runs of one parent run (or `mlflow run`'s run; itself nested in
    the active run with `nested`); with `register_as`, log and register their ensemble. `dataset` skips
    scanning `cfg.data` again."""
    tracking.check_registry_names(register_as, alias)
    dataset = dataset or prepare_data(cfg)
    fold = assign_folds(dataset.manifest, folds, cfg.seed)
    # decided once for every fold, from the images a fold model trains on
    cfg = adapt(cfg, dataset, round(len(dataset.manifest) * (folds - 1) / folds * (1 - cfg.valid_frac)))
    tracking.use_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tracking.process_tags(), nested=nested) as parent:
        tracking.log_new_params({**tracking.config_params(cfg),
                           "folds": folds, "n_images": len(dataset.manifest), **tracking.data_params(dataset)})
        tracking.log_dataset(dataset, "train")
        tracking.log_frame(dataset.manifest[MANIFEST_COLUMNS[:-1]].assign(fold=fold), "cv_manifest.csv")
        # every image trained some fold model: what `evaluate --split all` leaves out for the ensemble
        tracking.log_frame(dataset.manifest.assign(split="train")[MANIFEST_COLUMNS], "manifest.csv")
        rows, out_of_fold, networks = [], [], []
        for k in range(folds):
            part = fold_dataset(dataset, fold, k, cfg.valid_frac, cfg.seed)
            with mlflow.start_run(run_name=f"fold {k + 1}/{folds}", nested=True) as child:
                mlflow.set_tag("fold", k)
                result = run_training(cfg, part, log_model=False)
                probs = fold_probabilities(result.network, part, cfg)
                metrics, _ = log_evaluation(part.part("test"), part.root, part.classes, probs, prefix="test")
            sizes = part.manifest["split"].value_counts()
            rows.append({"fold": k, "run_id": child.info.run_id, "best_epoch": result.history.best_epoch,
                         **{f"n_{s}": int(sizes.get(s, 0)) for s in ("train", "valid", "test")}, **metrics})
            out_of_fold.append((part.part("test").assign(fold=k), probs))
            networks.append(result.network)
        table = pd.DataFrame(rows)
        tracking.log_frame(table, "cv_folds.csv")
        summary = summarize(table)
        mlflow.log_metrics(summary)
        pooled = pd.concat([frame for frame, _ in out_of_fold], ignore_index=True)
        _, predictions = log_evaluation(pooled, dataset.root, dataset.classes,
                                        np.concatenate([p for _, p in out_of_fold]), prefix="cv_oof", folder="out_of_fold")
        result = CVResult(parent.info.run_id, table, summary, networks, cfg,
                          predictions.assign(fold=pooled["fold"].to_numpy()))
        if register_as:
            result.model_uri = tracking.log_model([(n, cfg) for n in networks], dataset).model_uri
            result.version = tracking.register(result.model_uri, register_as, alias, tags={
                "run_id": parent.info.run_id, "members": folds,
                **{k: round(v, 6) for k, v in summary.items() if k.startswith("cv_test_") and k.endswith("_mean")}}).version
    return result


def run(cfg: TrainConfig, folds, experiment, run_name, register_as, alias) -> None:
    """What `smids-ml cv` does once its flags are checked (`commands.cv`): the folds, then their summary."""
    result = cross_validate(cfg, folds, experiment, run_name, register_as or None, alias or None)
    rows = [(f"test_{m}", result.summary[f"cv_test_{m}_mean"], result.summary[f"cv_test_{m}_std"])
            for m in HEADLINE if f"cv_test_{m}_mean" in result.summary]
    click.echo(f"{folds}-fold cross-validation, parent run {result.run_id}")
    table = pd.DataFrame(rows, columns=["metric", "mean", "std"])
    click.echo(table.to_string(index=False, float_format="{:.4f}".format))
    if result.version:
        click.echo(f"registered the {folds}-model ensemble as models:/{register_as}/{result.version}"
                   + (f" (@{alias})" if alias else ""))



from smids_ml.commands import cv as main  # noqa: E402  (`python -m smids_ml.cv`, the MLproject's entry)

if __name__ == "__main__":
    main()
