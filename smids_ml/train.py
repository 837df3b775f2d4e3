"""Train one model and track it in MLflow: `python -m smids_ml.train --data data --epochs 50`.

Under `mlflow run` the script attaches to the run MLflow created (MLFLOW_RUN_ID) instead of
opening a second one; `tune` calls `run_training` inside its own nested runs.

With `--members K`, K models train on the same split (seeds seed, seed+1, ...), each in a nested
run, and are logged on the parent run as one model that averages their probabilities: every member
sees all the training images, unlike the fold models of `cv --register-as`. `--member-models A,B`
makes the members different networks (K seeds of each): they disagree more than seeds of one do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import click
import mlflow
import numpy as np
import pandas as pd
import torch

from smids_ml import SmidsError
from smids_ml import plots, tracking, transfer
from smids_ml.adapt import adapt
from smids_ml.compute import training_flops
from smids_ml.config import MODELS, TRAIN_EXPERIMENT as DEFAULT_EXPERIMENT, TrainConfig
from smids_ml.console import steps, stop_if_signalled
from smids_ml.data import Dataset, load_tensors, make_batches, prepare_data
from smids_ml.engine import History, fit, predict_proba, resolve_device, resolve_precision, seed_everything
from smids_ml.models import build_for, count_parameters



@dataclass
class TrainResult:
    run_id: str
    history: History
    network: torch.nn.Module
    dataset: Dataset
    cfg: TrainConfig | None = None  # as trained: with the values decided from the data
    model_uri: str | None = None
    version: str | None = None
    networks: list = dataclasses.field(default_factory=list)  # every member; [network] for a single model

    def __post_init__(self):
        self.networks = self.networks or [self.network]


def run_training(cfg: TrainConfig, dataset: Dataset, callbacks=(), log_model: bool = True) -> TrainResult:
    """Train inside the active MLflow run, logging params, epoch metrics, artifacts and the model. Fields left to
    the data are decided here unless the caller did (`adapt`)."""
    run = mlflow.active_run()
    cfg = adapt(cfg, dataset)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    images = load_tensors(dataset, cfg.image_size, cfg.channels, cfg.resize)
    seed_everything(cfg.seed)
    network = build_for(cfg, len(dataset.classes), cfg.pretrained)
    if cfg.init_from:
        transfer.initialise(network, cfg)
    batches = make_batches(dataset, images, cfg.batch, cfg.augment, cfg.augment_strength, cfg.seed, device,
                           cfg.rotation, cfg.scale_shift, cycle=cfg.orientations == "cycle")
    tracking.log_run_context(cfg, dataset, count_parameters(network))
    mlflow.log_metric("train_tflop", training_flops(cfg, len(dataset.classes), int(batches["train"].labels.numel())) / 1e12)
    with steps(f"Training {cfg.model}", cfg.epochs) as bar:
        def show(epoch: int, metrics: dict) -> None:
            stop_if_signalled()
            shown = ("train_loss", "valid_acc", "valid_f1") if "valid_acc" in metrics else ("train_loss", "train_acc")
            bar.label = (f"epoch {epoch}/{cfg.epochs}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in shown)
                         + f" ({metrics['epoch_seconds']:.0f} s)")
            bar.update(1)

        history = fit(network, batches, cfg, device, len(dataset.classes), callbacks=[tracking.epoch_logger, show, *callbacks])
    log_outcome(history, network, batches["valid"], dataset, cfg, device)
    result = TrainResult(run.info.run_id, history, network, dataset, cfg)
    if log_model:
        result.model_uri = tracking.log_model([(network, cfg)], dataset).model_uri
    return result


def log_outcome(history: History, network, valid_batches, dataset: Dataset, cfg: TrainConfig, device) -> None:
    """Best-epoch metrics, history CSV, curves, validation confusion matrix (with a validation split),
    manifest and config."""
    mlflow.log_metrics({f"best_{k}": v for k, v in history.best.items()})
    mlflow.log_params({"best_epoch": history.best_epoch, "epochs_run": len(history.epochs)})
    frame = pd.DataFrame(history.epochs)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    tracking.log_frame(frame, "history.csv")
    tracking.log_figure(plots.training_curves(frame, history.best_epoch), "plots/training_curves.png")
    if len(valid_batches):
        probs, targets = predict_proba(network, valid_batches, device, resolve_precision(cfg.precision, device, cfg.model))
        tracking.log_figure(plots.confusion_matrix(targets, probs.argmax(1), dataset.classes,
                                                   title="Validation confusion matrix (best epoch)"),
                            "plots/valid_confusion_matrix.png")
    tracking.log_split_and_config(dataset, cfg)


def train(cfg: TrainConfig, experiment: str | None = DEFAULT_EXPERIMENT, run_name: str | None = None,
          register_as: str | None = None, alias: str | None = None, members: int = 1,
          dataset: Dataset | None = None, member_models: list[str] | None = None,
          member_recipes: list[str] | None = None, nested: bool = False) -> TrainResult:
    """Prepare data (unless given), train in a new (or `mlflow run`'s, or with `nested` a child) run, optionally
    register the model.
    With several members (`members` seeds of each of `member_models` or `member_recipes`, default cfg's
    recipe) the result's history and network are the first member's; `networks` holds them all."""
    tracking.check_registry_names(register_as, alias)
    configs = member_configs(cfg, members, member_models, member_recipes)
    dataset = dataset or prepare_data(cfg)
    configs = [adapt(c, dataset) for c in configs]
    tracking.use_experiment(experiment)
    members = len(configs)
    with mlflow.start_run(run_name=run_name, nested=nested):
        if members == 1:
            result = run_training(configs[0], dataset)
        else:
            result = train_members(configs, dataset, member_recipes)
        if register_as:
            monitor = configs[0].monitor  # a single --member-recipes recipe may watch another metric than cfg
            score = result.history.best.get(monitor)
            version = tracking.register(result.model_uri, register_as, alias, tags={
                "run_id": result.run_id, **({"members": members} if members > 1 else {}),
                **({f"valid_{monitor}": score} if score is not None and members == 1 else {})})
            result.version = version.version
    return result


def train_per_label(cfg: TrainConfig, experiment: str | None = DEFAULT_EXPERIMENT, run_name: str | None = None,
                    register_as: str | None = None, alias: str | None = None, **options) -> dict[str, TrainResult]:
    """`--label-column a,b,c`: one model per label column, each in a nested run under one parent run and registered
    as REGISTER_AS-<column> (one network per label: each label is its own task, with its own balance). Every
    column is read and checked before any run starts. `options` go to `train` (members)."""
    configs = {column: cfg.replace(label_column=column) for column in cfg.label_columns}
    datasets = {column: prepare_data(config) for column, config in configs.items()}
    tracking.use_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tracking.process_tags()):
        tracking.log_new_params(tracking.config_params(cfg))
        for dataset in datasets.values():
            tracking.log_dataset(dataset, "train")
        return {column: train(configs[column], None, f"label {column}", register_as and f"{register_as}-{column}",
                              alias, dataset=datasets[column], nested=True, **options) for column in configs}


def member_configs(cfg: TrainConfig, members: int, models: list[str] | None = None,
                   recipes: list[str] | None = None) -> list[TrainConfig]:
    """`members` seeds (seed, seed+1, ...) of each of `models` (cfg with another network) or of each of
    `recipes` (`preset+field=value`, on cfg's data, split, seed and device); by default of cfg itself. Every
    name and recipe is checked before any training."""
    if models and recipes:
        raise SmidsError("--member-models and --member-recipes both choose the members: give one of them")
    if recipes:
        # a recipe decides what a search space may change (the tunable fields); the data, its split, the seed
        # and where to train come from the command
        recipe_fields = ["preset"] + [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["tunable"]]
        run = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in recipe_fields}
        default = TrainConfig()
        moved = [name for name in recipe_fields if getattr(cfg, name) != getattr(default, name)]
        if "preset" in moved:
            raise SmidsError("--member-recipes: each recipe starts from its own preset; drop --preset")
        if moved:
            flag = "--" + moved[0].replace("_", "-")
            raise SmidsError(f"--member-recipes: {flag} would change every recipe; put it in the recipes instead "
                             f"(e.g. {recipes[0]}+{moved[0]}={getattr(cfg, moved[0])})")
        bases = [TrainConfig.from_recipe(recipe, **run) for recipe in recipes]
        if len({c.resize for c in bases}) > 1:
            raise SmidsError("--member-recipes: the recipes must share --resize (pad or stretch), so that one crop "
                             "geometry serves them all")
    else:
        unknown = [model for model in models or () if model not in MODELS]
        if unknown:
            raise SmidsError(f"--member-models: {unknown[0]!r} is not one of {', '.join(MODELS)}")
        bases = [cfg.replace(model=model) for model in models or [cfg.model]]
    return [base.replace(seed=base.seed + i) for base in bases for i in range(members)]


def train_members(configs: list[TrainConfig], dataset: Dataset, recipes: list[str] | None = None) -> TrainResult:
    """The members trained on the same split in nested runs, logged as one averaging model on the active run."""
    run = mlflow.active_run()
    results = []
    for i, member in enumerate(configs):
        what = f"{member.model} ({recipes[i * len(recipes) // len(configs)]})" if recipes else member.model
        with mlflow.start_run(run_name=f"member {i + 1}/{len(configs)}: {what} seed {member.seed}", nested=True):
            mlflow.set_tag("member", i)
            results.append(run_training(member, dataset, log_model=False))
    first, cfg = results[0], configs[0]
    tracking.log_run_context(cfg, dataset, count_parameters(first.network))
    tracking.log_new_params({"members": len(configs), "member_models": ",".join(dict.fromkeys(c.model for c in configs)),
                             **({"member_recipes": ",".join(recipes)} if recipes else {})})
    tracking.log_split_and_config(dataset, cfg)
    model_uri = tracking.log_model([(r.network, member) for r, member in zip(results, configs)], dataset).model_uri
    return TrainResult(run.info.run_id, first.history, first.network, dataset, cfg, model_uri,
                       networks=[r.network for r in results])


def run(cfg: TrainConfig, experiment, run_name, register_as, alias, members, member_models, member_recipes) -> None:
    """What `smids-ml train` does once its flags are checked (`commands.train`): train, then one line a model."""
    models = [m.strip() for m in member_models.split(",") if m.strip()]
    recipes = [r.strip() for r in member_recipes.split(",") if r.strip()]
    options = dict(members=members, member_models=models, member_recipes=recipes)
    if len(cfg.label_columns) > 1:
        results = train_per_label(cfg, experiment, run_name, register_as, alias, **options)
    else:
        results = {cfg.label_column: train(cfg, experiment, run_name, register_as, alias, **options)}
    for column, result in results.items():
        members = len(result.networks)
        history, best = result.history, result.history.best
        label = f"{column}: " if len(results) > 1 else ""
        if "valid_acc" in best:
            click.echo(f"{label}run {result.run_id}: best epoch {history.best_epoch}/{len(history.epochs)}, "
                       f"valid_acc {best['valid_acc']:.4f}, valid_f1 {best['valid_f1']:.4f}")
        else:
            click.echo(f"{label}run {result.run_id}: kept the last epoch ({history.best_epoch}; no validation split), "
                       f"train_acc {best['train_acc']:.4f} on augmented batches")
        if members > 1:
            click.echo(f"logged the {members}-model ensemble as {result.model_uri} (the line above is member 1)")
        if result.version:
            name = f"{register_as}-{column}" if len(results) > 1 else register_as
            click.echo(f"registered models:/{name}/{result.version}" + (f" (@{alias})" if alias else ""))



from smids_ml.commands import train as main  # noqa: E402  (`python -m smids_ml.train`, the MLproject's entry)

if __name__ == "__main__":
    main()
