"""Self-supervised pretraining on unlabelled crops: `smids-ml pretrain FOLDER`, then `train --init-from`.

A lab has far more crops than labels. SimCLR learns from the crops alone: two augmented views of each crop
(the project's own `augment_batch`, at twice train's strength by default) go through the network's backbone
and a small projection head, and the NT-Xent loss pulls each crop's two views together and pushes the other
crops of the batch away. The backbone is then logged as a smids-ml model exactly as `train` logs one, with a
one-class placeholder classifier that `--init-from` replaces; the run and the model are marked
`smids_ml.pretrained=simclr`, and `predict`, `evaluate`, `report` and serving refuse it as a classifier.

Any image file under FOLDER is used (class folders or not; labels are ignored), read and sized by the same
rules as `train` (`adapt`: grey crops train one channel, the input side is the crops' median side).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn

from smids_ml import SmidsError
from smids_ml import tracking
from smids_ml.adapt import adapt
from smids_ml.compute import training_flops
from smids_ml.config import FiniteFloat, TrainConfig, config_from_options, config_options
from smids_ml.console import Command, steps, stop_if_signalled, stops_cleanly
from smids_ml.data import Dataset, augment_batch, check, data_folder, files_under, load_tensors, printable
from smids_ml.engine import (_autocast, _to_device, check_finite, make_optimizer, make_scheduler, resolve_device,
                             resolve_precision, seed_everything)
from smids_ml.models import build_for, classifier_name, count_parameters, unwrap

DEFAULT_EXPERIMENT = "smids-ml-pretrain"
METHOD = "simclr"
PRETRAINED_TAG = "smids_ml.pretrained"
PLACEHOLDER = "unlabelled"  # the logged model's one class: a classifier head is what --init-from replaces
PROJECTION = 128  # SimCLR's projection size
# train's flags that pretraining takes, with its own defaults where they differ; --epochs is its own (half of train's)
PRETRAIN_FIELDS = ("model", "width", "stem", "channels", "image_size", "resize", "batch", "lr", "augment_strength",
                   "seed", "num_threads", "device")
PRETRAIN_DEFAULTS = {"batch": 128, "lr": 1e-3, "augment_strength": 2.0, "class_weights": "none"}


def unlabelled_dataset(folder: str) -> Dataset:
    """Every readable image under `folder`, once by pixels (two copies of a crop would be each other's
    negatives), as a one-class, all-train Dataset: the same reading and checking as `train`'s data."""
    root = data_folder(folder)
    rows = []
    for file in files_under(root):
        rel = file.relative_to(root).as_posix()
        if printable(rel) != rel:
            click.echo(f"skipped {printable(rel)}: the file name is not valid UTF-8; rename the file to use it", err=True)
            continue
        rows.append((rel, PLACEHOLDER))
    report = check(root, pd.DataFrame(rows, columns=["path", "label"]))
    for line in report.lines():
        click.echo(line, err=True)
    manifest = report.frame.drop_duplicates("hash").sort_values("path").reset_index(drop=True).assign(split="train")
    if len(manifest) < 2:
        raise SmidsError(f"{root} holds {len(manifest)} distinct readable image(s) (searched every folder below it); "
                         "pretraining contrasts crops with each other and needs at least 2")
    return Dataset(root, manifest, [PLACEHOLDER], report)


def pretrain_epochs(cfg: TrainConfig, dataset: Dataset) -> TrainConfig:
    """`cfg` with its epochs decided from the data when left at 0: half of what `train` would choose for this many
    crops at its own batch of 32 (two views a crop, so as many images pass through the network as in one
    supervised training). Channels and input size follow `adapt` as in `train`."""
    if cfg.epochs:
        return adapt(cfg, dataset)
    supervised = adapt(cfg.replace(batch=TrainConfig.batch), dataset)
    epochs = math.ceil(supervised.epochs / 2)
    reason = f"pretraining epochs={epochs} (half of train's {supervised.epochs}: each crop is seen in two views)"
    click.echo(reason, err=True)
    return supervised.replace(batch=cfg.batch, epochs=epochs, adapted=f"{supervised.adapted}; {reason}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: for each of the 2N views, cross-entropy of picking its partner (the other view of its
    crop) among the other 2N-1 views by cosine similarity over `temperature`; the mean over the 2N views."""
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    similarity = (z @ z.T / temperature).fill_diagonal_(-float("inf"))
    partner = torch.arange(2 * n, device=z.device).roll(n)
    return nn.functional.cross_entropy(similarity, partner)


class SimCLR(nn.Module):
    """The network with its classifier set aside (what `--init-from` keeps is everything before it), pooled to a
    feature vector, and a 2-layer projection head; the loss looks at the head's output."""

    def __init__(self, network: nn.Module, channels: int, size: int):
        super().__init__()
        self.network = unwrap(network)
        self.name = classifier_name(self.network)
        self.placeholder = getattr(self.network, self.name)
        setattr(self.network, self.name, nn.Identity())
        with torch.no_grad():  # in eval mode: the probe must not move the batch-norm statistics
            self.network.eval()
            features = self.features(torch.zeros(1, channels, size, size)).shape[1]
        self.head = nn.Sequential(nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(inplace=True),
                                  nn.Linear(features, PROJECTION))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out.mean((2, 3)) if out.dim() == 4 else out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def trained_network(self) -> nn.Module:
        """The network with its placeholder classifier back in place, as the logged model holds it."""
        setattr(self.network, self.name, self.placeholder)
        return self.network


def run_pretraining(cfg: TrainConfig, dataset: Dataset, temperature: float) -> tuple[nn.Module, list[dict]]:
    """SimCLR inside the active MLflow run: params, train_tflop, the loss per epoch; returns the trained network
    (with its placeholder classifier) and the epochs' metrics."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    images = load_tensors(dataset, cfg.image_size, cfg.channels, cfg.resize)
    seed_everything(cfg.seed)
    network = build_for(cfg, 1)
    tracking.log_run_context(cfg, dataset, count_parameters(network))
    model = SimCLR(network, cfg.channels, cfg.image_size)
    tracking.log_new_params({"pretrain_method": METHOD, "temperature": temperature, "projection_dim": PROJECTION})
    # the placeholder classifier counted in place of the projection head: both are a sliver of the backbone's cost
    mlflow.log_metric("train_tflop", training_flops(cfg, 1, 2 * len(images)) / 1e12)
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(images) / cfg.batch)
    scheduler, per_step = make_scheduler(optimizer, cfg, steps_per_epoch)
    precision = resolve_precision(cfg.precision, device, cfg.model)
    generator = torch.Generator().manual_seed(cfg.seed)
    epochs = []
    with steps(f"Pretraining {cfg.model} ({METHOD})", cfg.epochs) as bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            start, total, seen = time.perf_counter(), 0.0, 0
            lr = optimizer.param_groups[0]["lr"]
            order = torch.randperm(len(images), generator=generator)
            for first in range(0, len(images), cfg.batch):
                crops = images[order[first:first + cfg.batch]].to(device)
                if len(crops) < 2:  # a last batch of one crop has no negatives
                    continue
                views = [_to_device(augment_batch(crops, generator, cfg.augment_strength, cfg.rotation,
                                                  cfg.scale_shift), device) for _ in range(2)]
                with _autocast(device, precision):
                    z = model(torch.cat(views))
                loss = nt_xent(*z.chunk(2), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if per_step:
                    scheduler.step()
                total += loss.item() * len(crops)
                seen += len(crops)
            if scheduler and not per_step:
                scheduler.step()
            seconds = time.perf_counter() - start
            metrics = {"pretrain_loss": total / seen, "lr": lr, "epoch_seconds": seconds,
                       "images_per_second": 2 * seen / seconds}
            check_finite(epoch, metrics["pretrain_loss"], model)
            epochs.append(metrics)
            tracking.epoch_logger(epoch, metrics)
            stop_if_signalled()
            bar.label = f"epoch {epoch}/{cfg.epochs}: pretrain_loss {metrics['pretrain_loss']:.4f} ({seconds:.0f} s)"
            bar.update(1)
    return model.trained_network().cpu(), epochs


def pretrain(folder: str, cfg: TrainConfig, temperature: float = 0.2, experiment: str | None = DEFAULT_EXPERIMENT,
             run_name: str | None = None, register_as: str | None = None, alias: str | None = None) -> dict:
    """Read the crops, pretrain in a new (or `mlflow run`'s) run, log the network as a smids-ml model, optionally
    register it. Everything that can be refused is refused before the run starts."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise SmidsError(f"--temperature must be a number above 0, got {temperature}")
    if cfg.batch < 2:
        raise SmidsError(f"--batch must be at least 2 (each crop is contrasted with the others of its batch), got {cfg.batch}")
    if alias and not register_as:
        raise SmidsError("--alias needs --register-as")
    tracking.check_registry_names(register_as, alias)
    cfg = cfg.validate()
    resolve_device(cfg.device)
    dataset = unlabelled_dataset(folder)
    cfg = pretrain_epochs(cfg, dataset)
    tracking.use_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tag(PRETRAINED_TAG, METHOD)
        network, epochs = run_pretraining(cfg, dataset, temperature)
        frame = pd.DataFrame(epochs)
        frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
        tracking.log_frame(frame, "history.csv")
        tracking.log_split_and_config(dataset, cfg)
        model_uri = tracking.log_model([(network, cfg)], dataset, pretrained=METHOD).model_uri
        version = None
        if register_as:
            version = tracking.register(model_uri, register_as, alias, tags={
                "run_id": run.info.run_id, PRETRAINED_TAG: METHOD}).version
    return {"run_id": run.info.run_id, "model_uri": model_uri, "version": version, "epochs": epochs, "cfg": cfg,
            "network": network}


@click.command("pretrain", cls=Command)
@click.argument("folder", type=click.Path(path_type=str))
@config_options(PRETRAIN_DEFAULTS, only=PRETRAIN_FIELDS)
@click.option("--epochs", type=int, default=0, show_default=True,
              help="0: half of what train would choose for this many crops (two views a crop: the compute of one "
                   "supervised training).")
@click.option("--temperature", type=FiniteFloat(), default=0.2, show_default=True, help="NT-Xent softmax temperature.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--register-as", default=None, help="Register the pretrained network under this name.")
@click.option("--alias", default=None, help="Alias to point at the registered version.")
@stops_cleanly("the run is marked FAILED")
def main(folder, temperature, experiment, run_name, register_as, alias, **options):
    """Pretrain a network without labels (SimCLR) on every image under FOLDER; start a classifier from it with
    `train --init-from runs:/RUN/model` (or models:/NAME@ALIAS with --register-as)."""
    cfg = config_from_options(options, PRETRAIN_DEFAULTS).replace(data=str(Path(folder)))
    result = pretrain(folder, cfg, temperature, experiment, run_name, register_as or None, alias or None)
    click.echo(f"run {result['run_id']}: pretrained {cfg.model} for {len(result['epochs'])} epochs, last pretrain_loss "
               f"{result['epochs'][-1]['pretrain_loss']:.4f}; start training from it with "
               f"--init-from runs:/{result['run_id']}/model")
    if result["version"]:
        click.echo(f"registered models:/{register_as}/{result['version']}" + (f" (@{alias})" if alias else ""))


if __name__ == "__main__":
    main()
