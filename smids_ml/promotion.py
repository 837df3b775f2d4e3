"""Promotion: the study's best trial (or its top-k ensemble) logged and registered as @challenger, and the
champion alias moved only to a better model on the same data.
"""

from __future__ import annotations

import tempfile

import click
import mlflow
import optuna
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smids_ml import SmidsError, tracking
from smids_ml.models import build_for
from smids_ml.search import WEIGHTS, Search
from smids_ml.studies import RUN_ID_ATTR, best_trial, ranked_trials

CHALLENGER = "challenger"  # every study's newly registered best; --alias (champion) moves only when it wins


def promote_best(study: optuna.Study, search: Search, register_as: str, alias: str | None, promote: bool = False):
    """Log the best trial's model on its own child run and register it as @challenger (once per best
    trial); move `alias` (@champion) to it only as `champion_decision` says.

    With `search.keep` > 1 the model is the ensemble of the best `keep` trials that share the best
    trial's resize mode (one model, the mean of their probabilities; each member keeps its input size).
    """
    best = best_trial(study)
    if best is None:
        click.echo("no trial completed: nothing to register", err=True)
        return None
    run_id = best.user_attrs[RUN_ID_ATTR]
    client = MlflowClient()
    if client.get_run(run_id).data.tags.get("smids_ml.model_uri"):
        click.echo(f"best trial {best.number} is already registered", err=True)
        return None
    members, chosen = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in ranked_trials(study):
            cfg = search.config_of(trial)
            if len(chosen) == search.keep or cfg.resize != search.config_of(best).resize:
                continue
            try:
                path = mlflow.artifacts.download_artifacts(run_id=trial.user_attrs[RUN_ID_ATTR], artifact_path=WEIGHTS,
                                                           dst_path=f"{tmp}/{trial.number}")
            except (MlflowException, OSError):  # a trial that was never among the best kept no weights
                continue
            network = build_for(cfg, len(search.dataset.classes))
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            members.append((network, cfg))
            chosen.append(trial)
    if best not in chosen:
        raise SmidsError(f"the weights of best trial {best.number} are not in its run's artifacts ({WEIGHTS}); "
                         "rerun that trial to register it")
    if len(chosen) < search.keep:
        click.echo(f"ensemble of {len(chosen)} trials, not {search.keep}: only these completed with the best "
                   "trial's input size and colour mode and kept their weights", err=True)
    with mlflow.start_run(run_id=run_id, nested=True):
        info = tracking.log_model(members, search.dataset)
        mlflow.set_tag("smids_ml.model_uri", info.model_uri)
    run = client.get_run(run_id)
    metrics = {k: round(v, 6) for k, v in run.data.metrics.items() if k.startswith("best_valid_")}
    return register_challenger(info.model_uri, register_as, alias, promote, score=f"best_{search.base.monitor}", tags={
        "study": study.study_name, "trial": best.number, "run_id": run_id,
        "members": ",".join(str(t.number) for t in chosen), "monitor": search.base.monitor,
        "data_fingerprint": run.data.params.get("data_fingerprint", ""), **metrics})


def register_challenger(model_uri: str, name: str, alias: str | None, promote: bool, score: str, tags: dict):
    """Register a study's model as @challenger, tagged with `score` (the name of the tag that ranks it: a trial's
    `best_valid_f1`, a refit's cross-validated `cv_test_f1_macro_mean`), and move `alias` as `champion_decision`
    says."""
    client = MlflowClient()
    version = tracking.register(model_uri, name, CHALLENGER, tags={**tags, "score": score})
    if alias:
        move, why = champion_decision(client, name, alias, version, promote)
        if move:
            client.set_registered_model_alias(name, alias, version.version)
        click.echo(f"@{alias} {'moves to' if move else 'stays on'} version "
                   f"{version.version if move else client.get_model_version_by_alias(name, alias).version}: {why}",
                   err=True)
    return version


def champion_decision(client: MlflowClient, name: str, alias: str, challenger, promote: bool) -> tuple[bool, str]:
    """Whether `alias` should move to the challenger, and why: when nothing holds it yet, when the user
    says --promote, or when the challenger's score beats the champion's on the same data and the same kind of
    score (a validation metric and a cross-validated one are not compared)."""
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"{name} had no @{alias} yet"
    if promote:
        return True, "--promote"
    metric = challenger.tags.get("score") or f"best_{challenger.tags['monitor']}"
    theirs, ours = champion.tags.get(metric), challenger.tags.get(metric)
    same_kind = (champion.tags.get("score") or f"best_{champion.tags.get('monitor')}") == metric
    if champion.tags.get("data_fingerprint") != challenger.tags["data_fingerprint"] or theirs is None or ours is None \
            or not same_kind:
        return False, (f"version {champion.version} was validated on other data or another metric, so the two "
                       f"cannot be compared; pass --promote to move @{alias} anyway")
    better = float(ours) < float(theirs) if metric.endswith("loss") else float(ours) > float(theirs)
    verdict = "beats" if better else "does not beat"
    return better, (f"the challenger's {metric} {float(ours):.4f} {verdict} version {champion.version}'s "
                    f"{float(theirs):.4f} on the same data")

