"""MLflow glue: parameters, epoch metrics, artifacts, the pyfunc model, the registry.

The tracking store is whatever MLflow resolves (MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db`
in the working directory), so the registry works without a server.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

import smids_ml
from smids_ml import SmidsError
from smids_ml.config import TrainConfig
from smids_ml.data import MANIFEST_COLUMNS, Dataset, open_image
from smids_ml.plots import close
from smids_ml.serving import SmidsClassifier, one_line

PACKAGE_DIR = Path(smids_ml.__file__).parent
LIBRARIES = ("torch", "torchvision", "mlflow", "optuna", "pillow", "pandas", "numpy", "scikit-learn")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pip_requirements() -> list[str]:
    """Pinned explicitly: inferring requirements costs seconds per logged model."""
    v = library_versions()
    return [f"torch=={v['torch'].split('+')[0]}", f"torchvision=={v['torchvision'].split('+')[0]}",
            f"mlflow=={v['mlflow']}", f"pillow=={v['pillow']}", f"pandas=={v['pandas']}", f"numpy=={v['numpy']}",
            f"scikit-learn=={v['scikit-learn']}", f"click=={importlib.metadata.version('click')}",
            f"pyyaml=={importlib.metadata.version('pyyaml')}"]


def config_params(cfg: TrainConfig, prefix: str = "") -> dict:
    """A config as MLflow params: every field, unset ones (None) as "" (a param cannot be None)."""
    return {f"{prefix}{k}": "" if v is None else v for k, v in cfg.to_dict().items()}


def log_run_context(cfg: TrainConfig, dataset: Dataset, num_parameters: int) -> None:
    """Config, data fingerprint, class counts, split sizes, versions and commit."""
    params = config_params(cfg)
    counts = dataset.counts()
    params.update(class_names=",".join(dataset.classes), num_classes=len(dataset.classes),
                  num_parameters=num_parameters, data_fingerprint=dataset.fingerprint(), **data_params(dataset))
    for part in ("train", "valid", "test"):
        params[f"n_{part}"] = int(counts[part].sum()) if part in counts else 0
    for label in dataset.classes:
        params[f"count_{label}"] = int(counts.loc[label].sum()) if label in counts.index else 0
    log_new_params(params)
    log_dataset(dataset, "train")
    tags = {f"version.{k}": v for k, v in library_versions().items()} | process_tags()
    tags["version.smids_ml"] = smids_ml.__version__
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)


EXPERIMENT_KIND = "mlflow.experimentKind"


def mark_experiment(experiment) -> None:
    """Tag an experiment as model training, unless it says otherwise already: MLflow 3's UI opens an untagged
    experiment on its GenAI overview (traces, token usage) instead of its runs."""
    if EXPERIMENT_KIND not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")


def use_experiment(name: str | None) -> None:
    """Select the experiment, unless `mlflow run` already created our run (it chose the experiment), and mark
    it as model training (`mark_experiment`). A tracking server that does not answer is one line naming it
    (MLflow would retry for minutes)."""
    check_server()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        mark_experiment(mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id))
    elif name:
        try:
            experiment = mlflow.set_experiment(name)
        except MlflowException as exc:  # another worker created it between our look-up and our create
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow.set_experiment(name)
        mark_experiment(experiment)


def log_dataset(dataset: Dataset, context: str) -> None:
    """The run's data as an MLflow dataset input (the runs table's Dataset column, and a way to find every run
    on the same data): the manifest, named by the data root or the labels table and its column, with the data
    fingerprint (images by pixel hash, labels, split) as digest and the folder or table as source."""
    frame = dataset.manifest[[c for c in MANIFEST_COLUMNS if c in dataset.manifest]]
    # sizes as floats: an integer column draws MLflow's long hint about missing values on every run
    frame = frame.astype({c: "float64" for c in frame.select_dtypes("integer").columns})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")  # MLflow's own duplicate
        data = mlflow.data.from_pandas(frame, source=str(dataset.source), targets="label", name=dataset.name,
                                       digest=dataset.fingerprint())
    mlflow.log_input(data, context=context)


def data_params(dataset: Dataset) -> dict[str, str]:
    """Where a run's images and labels are, so that `evaluate` finds them again: the data root, and the labels
    table (absolute) when the labels come from one."""
    return {"data_root": str(dataset.root), **({"labels_table": str(dataset.table.resolve())} if dataset.table else {})}


HOST_TAG, PID_TAG = "smids_ml.host", "smids_ml.pid"


def process_tags() -> dict[str, str]:
    """Which process owns a run: `smids-ml runs --fix-stale` and `tune` fail runs whose process is gone."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def process_is_gone(host: str | None, pid: str | None) -> bool:
    """True only when the owner ran on this machine and no such process exists any more."""
    if host != socket.gethostname() or not (pid or "").isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


_ANSWERED: set[str] = set()  # servers that answered once in this process: asked again, they only cost a round trip


def check_server(timeout: float = 10.0) -> None:
    """One line naming the URL when the tracking store is a server that does not answer /health."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                _ANSWERED.add(uri)
                return
            reason = f"HTTP {response.status}"
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise SmidsError(f"cannot reach the tracking server {uri}: {reason}")


def log_new_params(params: dict) -> None:
    """Log params on the active run, keeping any that `mlflow run` already logged from its -P values
    (MLflow refuses to change a param, and those carry the user's own spelling). A value that differs
    from the one already logged (a preset's) is logged as `effective_<name>`."""
    already = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in already})
    differing = {f"effective_{k}": v for k, v in params.items()
                 if k in already and str(already[k]).lower() != str(v).lower() and already[k] != ""}
    if differing:  # e.g. `-P preset=original` under mlflow run: the preset's value is what trained
        mlflow.log_params(differing)


def epoch_logger(epoch: int, metrics: dict) -> None:
    """Engine callback: one value per metric per epoch, with the epoch as step."""
    mlflow.log_metrics(metrics, step=epoch)


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    close(fig)


def log_frame(frame: pd.DataFrame, path: str) -> None:
    """A DataFrame as a CSV artifact at `path`."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(path).name
        frame.to_csv(file, index=False)
        mlflow.log_artifact(str(file), str(Path(path).parent) if Path(path).parent != Path(".") else None)


def log_split_and_config(dataset: Dataset, cfg: TrainConfig) -> None:
    """manifest.csv (what `evaluate` scores and leaves out) and config.json on the active run."""
    log_frame(dataset.manifest[MANIFEST_COLUMNS], "manifest.csv")
    mlflow.log_text(cfg.to_json(), "config.json")


def model_meta(configs: list[TrainConfig], classes: list[str], pretrained: str | None = None) -> dict:
    """What the pyfunc needs besides weights: the classes and each member's config; for a network pretrained
    without labels (`smids-ml pretrain`), the method, so that nothing serves its placeholder classifier."""
    return {"classes": list(classes), "members": [cfg.to_dict() for cfg in configs],
            **({"pretrained": pretrained} if pretrained else {})}


def log_model(members: list[tuple[torch.nn.Module, TrainConfig]], dataset: Dataset, name: str = "model",
              pretrained: str | None = None):
    """Log the pyfunc (members' weights + configs + this package's code) with a signature and a 2-image example.

    `members` is one (network, config) pair for a single model, or several for an ensemble; they may differ
    in input size and channels (each is served its own preprocessing) but must share the resize mode, so that
    their activation maps lie over the same crop geometry.
    """
    configs = [cfg for _, cfg in members]
    modes = sorted({cfg.resize for cfg in configs})
    if len(modes) != 1:
        raise SmidsError(f"ensemble members must share --resize; got {', '.join(modes)}")
    examples = dataset.manifest.groupby("label").head(1).head(2)["path"]
    if len(examples) < 2:
        examples = dataset.manifest["path"].head(2)
    encoded = [base64.b64encode((dataset.root / p).read_bytes()).decode("ascii") for p in examples]
    example = pd.DataFrame({"image": encoded})
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta_file = Path(tmp) / "weights.pt", Path(tmp) / "config.json"
        torch.save({"members": [{k: v.detach().cpu() for k, v in network.state_dict().items()}
                                for network, _ in members]}, weights)
        meta = model_meta(configs, dataset.classes, pretrained)
        meta_file.write_text(json.dumps(meta, indent=2))
        classifier = SmidsClassifier().load(meta, str(weights))
        batch = torch.stack([classifier.preprocess(open_image(dataset.root / p)) for p in examples])
        output = classifier.to_frame(classifier.probabilities(batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints": the signature is given explicitly
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(PACKAGE_DIR / "model_code.py"),
                artifacts={"weights": str(weights), "config": str(meta_file)},
                # MLflow checks an input example by predicting it, which a pretrained network refuses
                signature=infer_signature(example, output), input_example=None if pretrained else example,
                pip_requirements=pip_requirements(), code_paths=[str(PACKAGE_DIR)],
            )


ALIAS_PATTERN = re.compile(r"[\w-]{1,255}")
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)  # models:/NAME@latest and @v3 mean MLflow's own


def registry_name_problem(flag: str, value: str) -> str | None:
    """Why the registry would refuse a model name (`--register-as`) or an alias (`--alias`), or None.

    The project's own copy of MLflow's rules (its validators are private and were renamed in 3.18); a test holds
    it against a real registry, so a rule MLflow changes shows there, not in a user's run."""
    if flag == "--register-as":
        if not value.strip():
            return "a model name cannot be empty"
        bad = sorted({c for c in value if c in "/:"})
        return f"a model name cannot contain {' or '.join(map(repr, bad))}" if bad else None
    if not ALIAS_PATTERN.fullmatch(value):
        return "an alias holds only letters, digits, '_' and '-', at most 255 of them"
    if RESERVED_ALIAS.fullmatch(value):
        return "'latest' and 'v<number>' are reserved: MLflow's own references to versions"
    return None


def check_registry_names(name: str | None, alias: str | None) -> None:
    """Refuse a --register-as or --alias the registry would refuse before any training: otherwise the whole
    training runs, then MLflow's traceback ends it."""
    for flag, value in (("--register-as", name), ("--alias", alias)):
        problem = value and registry_name_problem(flag, value)
        if problem:
            raise SmidsError(f"{flag} {value!r}: {problem}")


def register(model_uri: str, name: str, alias: str | None = None, tags: dict | None = None):
    """Register a model version, tag it and point `alias` at it."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


@dataclass
class ModelSource:
    """A model URI resolved to the run that trained it (None when MLflow cannot tell) and its registry entry."""

    uri: str
    run_id: str | None
    canonical: str  # what evaluations are tagged with: an alias resolves to its version
    name: str | None = None
    version: str | None = None


def resolve_model(uri: str) -> ModelSource:
    """Find the training run behind a models:/ (version, alias or model id) or runs:/ URI."""
    client = MlflowClient()
    try:
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/")[0]
            return ModelSource(uri, client.get_run(run_id).info.run_id, uri)
        if uri.startswith("models:/"):
            ref = uri.removeprefix("models:/")
            if "@" in ref:
                version = client.get_model_version_by_alias(*ref.split("@", 1))
            elif "/" in ref:
                version = client.get_model_version(*ref.split("/", 1))
            else:  # a logged model id, models:/m-...
                return ModelSource(uri, mlflow.get_logged_model(ref).source_run_id, uri)
            return ModelSource(uri, version.run_id, f"models:/{version.name}/{version.version}",
                               version.name, str(version.version))
    except MlflowException as exc:
        raise SmidsError(f"unknown model {uri}: {one_line(exc)}") from None
    return ModelSource(uri, None, uri)  # a path or artifact URI: loadable, but its training run is unknown
