"""Finalists: the study's best trials re-scored by k-fold cross-validation, and the winner refit on all the data.

One validation carve-out ranks every trial (about 270 crops of smids-dev: a standard error of ~1.8 points at
90%), so the maximum of many noisy scores picks luck. The best `--finalists` trials, with the defaults trial
whenever it completed, are cross-validated on the training part of the study's split (its train and valid
rows; the test rows stay unseen), on the same folds for all, so they are compared pairwise: `finalists.csv`
on the study's parent run has each finalist's per-fold scores, mean, standard deviation and its paired mean
difference to the defaults with that difference's standard error. The winner by mean is trained again on
the whole training part (no carve-out, the full schedule) and that model is registered (`--refit model`), or
its k fold models are registered as one ensemble (`--refit ensemble`).
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import mlflow
import numpy as np
import optuna
import pandas as pd

from smids_ml import tracking
from smids_ml.cv import cross_validate
from smids_ml.data import Dataset
from smids_ml.search import Search
from smids_ml.studies import DEFAULTS_ATTR, RUN_ID_ATTR, ranked_trials
from smids_ml.train import run_training

REFIT_OF = "smids_ml.refit_of"  # tag of the refit run: the run id of the trial it refits
SCORED_ATTR = "finalists_scored"  # study attr: how many trials had completed when the finalists were scored
# the cross-validated test metric that stands for each validation monitor, and whether higher is better
CV_METRIC = {"valid_f1": ("test_f1_macro", True), "valid_acc": ("test_accuracy", True), "valid_loss": ("test_log_loss", False)}


def choose(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The best `count` completed trials, and the defaults trial (when it completed) if not among them."""
    ranked = ranked_trials(study)
    chosen = ranked[:count]
    defaults = [t for t in ranked if t.user_attrs.get(DEFAULTS_ATTR)]
    return chosen + [t for t in defaults if t not in chosen]


def training_part(dataset: Dataset) -> Dataset:
    """The rows every trial trained or was selected on (train and valid), all as `train`; test stays out."""
    rows = dataset.manifest[dataset.manifest["split"] != "test"].assign(split="train").reset_index(drop=True)
    return dataset.with_manifest(rows)


def part_ratio(dataset: Dataset) -> float:
    """How much larger the training part is than a trial's training split (what a finalist's model costs more)."""
    return len(training_part(dataset).manifest) / max(len(dataset.part("train")), 1)


@dataclass
class Outcome:
    table: pd.DataFrame  # finalists.csv
    winner: optuna.trial.FrozenTrial
    verdict: str
    fold_networks: list  # the winner's fold models (for --refit ensemble)


def score(finalists: list[optuna.trial.FrozenTrial], search: Search, folds: int) -> Outcome:
    """Cross-validate each finalist (nested runs under the active parent) on the same folds; the table and
    the winner by mean, with one line on whether it beat the defaults beyond the folds' noise."""
    metric, higher = CV_METRIC[search.base.monitor]
    part = training_part(search.dataset)
    rows, networks = [], {}
    for trial in finalists:
        cfg = search.config_of(trial)
        result = cross_validate(cfg, folds, experiment=None, dataset=part, nested=True,
                                run_name=f"finalist trial-{trial.number:03d} ({folds}-fold)")
        scores = result.folds[metric].to_numpy()
        networks[trial.number] = result.networks
        rows.append({"trial": trial.number, "run_id": trial.user_attrs.get(RUN_ID_ATTR), "cv_run_id": result.run_id,
                     "defaults": bool(trial.user_attrs.get(DEFAULTS_ATTR)), "validation": trial.value,
                     **{f"fold_{k + 1}": s for k, s in enumerate(scores)},
                     "mean": scores.mean(), "std": scores.std(ddof=1)})
    table = pd.DataFrame(rows)
    folds_columns = [f"fold_{k + 1}" for k in range(folds)]
    baseline = table[table["defaults"]]
    if not baseline.empty:
        differences = table[folds_columns].to_numpy() - baseline[folds_columns].to_numpy()
        table["diff_to_defaults"] = differences.mean(1)
        table["diff_se"] = differences.std(1, ddof=1) / np.sqrt(folds)
    table = table.sort_values("mean", ascending=not higher).reset_index(drop=True)
    best = table.iloc[0]
    winner = next(t for t in finalists if t.number == best["trial"])
    name = f"trial {winner.number}" + (" (the defaults)" if best["defaults"] else "")
    if baseline.empty:
        verdict = f"{name} wins on {metric} {best['mean']:.4f} over {folds} folds; no defaults trial to compare with"
    elif best["defaults"]:
        verdict = f"the defaults win on {metric} {best['mean']:.4f} over {folds} folds"
    else:
        gain, se = best["diff_to_defaults"] * (1 if higher else -1), best["diff_se"]
        beyond = gain > 2 * se
        verdict = (f"{name} wins on {metric} {best['mean']:.4f}: {gain:+.4f} ± {se:.4f} against the defaults, paired "
                   f"over {folds} folds, " + ("beyond the folds' noise" if beyond else "within the folds' noise (2 SE)"))
    return Outcome(table, winner, verdict, networks[winner.number])


def refit(winner: optuna.trial.FrozenTrial, search: Search, outcome: Outcome | None, how: str) -> tuple[str, str]:
    """The winner as a logged model in a nested run tagged with the trial it refits: trained again on the whole
    training part (`model`), or its fold models as one averaging model (`ensemble`); the study's test rows stay
    the run's test split, which no model saw. Returns (model URI, run id)."""
    cfg = search.config_of(winner)
    tags = {REFIT_OF: winner.user_attrs.get(RUN_ID_ATTR, ""), "optuna.trial": str(winner.number)}
    part = training_part(search.dataset)
    whole = part.with_manifest(pd.concat([part.manifest, search.dataset.part("test")], ignore_index=True))
    name = f"refit trial-{winner.number:03d}" + (" (fold ensemble)" if how == "ensemble" else "")
    with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
        mlflow.log_param("refit", how)
        if how == "ensemble":
            mlflow.log_param("members", len(outcome.fold_networks))
            tracking.log_split_and_config(whole, cfg)
            uri = tracking.log_model([(n, cfg) for n in outcome.fold_networks], whole).model_uri
        else:
            uri = run_training(cfg.replace(valid_frac=0.0), whole, log_model=True).model_uri
    return uri, run.info.run_id


def echo(outcome: Outcome) -> None:
    shown = outcome.table.drop(columns=["run_id", "cv_run_id"]).set_index("trial")
    click.echo(shown.to_string(float_format="{:.4f}".format), err=True)
    click.echo(outcome.verdict, err=True)
