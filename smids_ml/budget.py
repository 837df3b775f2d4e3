"""A tuning budget in minutes: how many trials, rungs, finalists and folds fit, on this machine.

The cost of one full-length model is measured, not guessed: one real training epoch on the study's data
(augmentation included), and its validation, give seconds per image, times the images and epochs of a trial. The
epoch is that of the costliest point the search space can draw (`costliest`: its largest input, widest network,
most epochs, and the architecture and stem with the most counted FLOPs), not of the base recipe: a resnet18 at
112 px takes several times the defaults' minutes, and a plan timed on the defaults left no time for the
finalists. A trial is one model, or K models on (K-1)/K of the training part when trials are ranked by K folds
(`ranking`); under successive halving it costs `rungs * trial / eta**(rungs - 1)` on average (each rung's 1/eta of
the trials trains eta times longer), the finalists `(finalists + 1) * folds` models on (folds-1)/folds of the
training part, the refit one model on all of it. The plan keeps at most half the budget for the finalists and
the refit; when the search ends, they are planned again from what its full-length trials really took.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import click
import mlflow
import optuna
import torch

from smids_ml import SmidsError
from smids_ml.adapt import adapt
from smids_ml.compute import training_flops
from smids_ml.config import DEFAULT_BUDGET_MINUTES, TrainConfig
from smids_ml.data import Dataset, load_tensors, make_batches
from smids_ml.engine import make_optimizer, predict_proba, resolve_device, resolve_precision, train_one_epoch
from smids_ml.models import build_for
from smids_ml.ranking import SPLIT, Ranking
from smids_ml.spaces import SCALES, base_value, configure
from smids_ml.studies import RUN_ID_ATTR

MAX_PLANNED_TRIALS = 200  # on a tiny data set a budget would allow thousands


def seconds_per_image(cfg: TrainConfig, dataset: Dataset) -> tuple[float, float]:
    """Seconds per image of training `cfg` here and of its validation (the same network in eval mode: with
    --tta d4 that is eight views an image), timed over one whole epoch of the study's own batches after a warm-up
    step: three steps timed alone once said 21 minutes for a model that took 3.5 (a machine just set up), and
    an epoch is under 2% of a trial."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    images = load_tensors(dataset, cfg.image_size, cfg.channels, cfg.resize)
    precision = resolve_precision(cfg.precision, device, cfg.model)
    with torch.random.fork_rng():  # calibrating does not change what a seeded trial draws
        network = build_for(cfg, len(dataset.classes), False).to(device, memory_format=torch.channels_last)
        batches = make_batches(dataset, images, cfg.batch, cfg.augment, cfg.augment_strength, cfg.seed, device,
                               cfg.rotation, cfg.scale_shift)
        optimizer, criterion = make_optimizer(network, cfg), torch.nn.CrossEntropyLoss()
        first = list(itertools.islice(iter(batches["train"]), 1))
        train_one_epoch(network, first, optimizer, criterion, device, precision)
        predict_proba(network, first, device, precision)  # eval mode warms up on its own
        start = time.perf_counter()
        train_one_epoch(network, batches["train"], optimizer, criterion, device, precision)
        trained = time.perf_counter()
        predict_proba(network, batches["valid"], device, precision)
        validated = time.perf_counter()
    train, valid = len(dataset.part("train")), len(dataset.part("valid"))
    return (trained - start) / max(train, 1), (validated - trained) / valid if valid else 0.0


def model_seconds(per_image: tuple[float, float], epochs: int, train: int, valid: int) -> float:
    """One training of `epochs` on `train` images, validating `valid` images every epoch."""
    return epochs * (per_image[0] * train + per_image[1] * valid)


def trial_cost(model: float, rungs: int, eta: int) -> float:
    """A trial's expected cost under successive halving: every rung costs the same in all."""
    return rungs * model / eta ** (rungs - 1)


def finalists_cost(model_on_part: float, finalists: int, folds: int) -> float:
    """Cross-validating the finalists (and the defaults trial) and refitting the winner."""
    return (finalists + 1) * folds * model_on_part * (folds - 1) / folds + model_on_part


def finalist_options(finalists: int, folds: int) -> list[tuple[int, int]]:
    """(finalists, folds) from the most to the least thorough: fewer folds first, then fewer finalists."""
    return sorted({(f, k) for f in range(finalists, 0, -1) for k in {folds, min(folds, 3)}}, key=lambda o: (-o[0], -o[1]))


@dataclass
class Plan:
    minutes: float
    model_minutes: float  # one full-length trial here (its K fold models, ranked by folds)
    rungs: int
    trials: int
    finalists: int
    folds: int
    search_seconds: float
    deadline: float  # time.monotonic() at which the budget is spent
    basis: str = "the base recipe"  # what the timed model was
    ranking: Ranking = SPLIT

    def line(self) -> str:
        trial = f"trial ({self.ranking.folds} fold models)" if self.ranking.folds else "model"
        return (f"budget {self.minutes:g} min: one full-length {trial} ~{self.model_minutes:.1f} min here ({self.basis}); "
                f"up to {self.trials} trials over {self.rungs} rung(s) in {self.search_seconds / 60:.0f} min, then "
                f"{self.finalists} finalist(s) (and the defaults) over {self.folds} folds and the refit; "
                + self.ranking.line())

    def minutes_left(self) -> float:
        return max(0.0, (self.deadline - time.monotonic()) / 60)


# the fields that set a training's compute: numbers where more is costlier, and choices to count
COST_NUMBERS, COST_CHOICES = ("image_size", "width", "epochs", "epochs_scale", "channels"), ("model", "stem")


def costliest(cfg: TrainConfig, space: dict) -> tuple[TrainConfig, str]:
    """The point of `space` (around `cfg`) whose training costs most, and a few words naming it: the largest value
    the space can draw of each of COST_NUMBERS, and of COST_CHOICES the combination with the most counted FLOPs
    (`compute.training_flops`); the other searched fields keep cfg's value (they barely move the minutes)."""
    cfg = configure(cfg, space["fixed"])
    params = space["params"]
    largest = {name: max(spec) if isinstance(spec, list) else spec["high"]
               for name, spec in params.items() if name in COST_NUMBERS}
    largest = {name: type(base_value(cfg, name))(value) for name, value in largest.items()}
    choices = [[(name, value) for value in params[name]] for name in COST_CHOICES if isinstance(params.get(name), list)]
    points = [configure(cfg, {**largest, **dict(combo)}) for combo in itertools.product(*choices)]
    point = max(points, key=lambda p: training_flops(p, 3, 1)) if len(points) > 1 else points[0]
    searched = dict.fromkeys(SCALES.get(name, name) for name in (*COST_CHOICES, *COST_NUMBERS) if name in params)
    if not searched:
        return point, "the base recipe; the space does not change its cost"
    return point, "the costliest point of the space: " + ", ".join(f"{n}={getattr(point, n)}" for n in searched)


def plan(minutes: float, cfg: TrainConfig, dataset: Dataset, rungs: int, eta: int, finalists: int, folds: int,
         max_trials: int | None, space: dict | None = None, ranking: Ranking = SPLIT) -> Plan:
    """The plan for `cfg` (with `space`, for its costliest point) on `dataset` here, from a measured training epoch
    (`plan_for`). A trial ranked by K folds is K models, each on (K-1)/K of the training part."""
    started = time.monotonic()
    cfg = adapt(cfg, dataset, ranking.train_images(dataset))  # what tune trains: the values left to the data decided
    cfg, basis = costliest(cfg, space) if space else (cfg, "the base recipe")
    per_image = seconds_per_image(cfg, dataset)
    train, valid = len(dataset.part("train")), len(dataset.part("valid"))
    k, part = ranking.folds, train + valid
    trial = (k * model_seconds(per_image, cfg.epochs, part * (k - 1) / k, part / k) if k
             else model_seconds(per_image, cfg.epochs, train, valid))
    planned = plan_for(minutes, trial, model_seconds(per_image, cfg.epochs, part, 0), rungs, eta, finalists, folds,
                       max_trials, started)
    planned.basis, planned.ranking = basis, ranking
    return planned


def plan_for(minutes: float, model: float, on_part: float, rungs: int, eta: int, finalists: int, folds: int,
             max_trials: int | None, started: float) -> Plan:
    """The trials, rungs, finalists and folds that fit `minutes`, given the seconds of one full-length trial (`model`)
    and of one model on the whole training part (`on_part`); SmidsError naming the least budget if none.
    """
    total = minutes * 60
    options = finalist_options(finalists, folds) if finalists else [(0, folds)]
    reserve = {o: finalists_cost(on_part, *o) if o[0] else 0.0 for o in options}
    chosen = next((o for o in options if reserve[o] <= total / 2), options[-1])
    search = total - reserve[chosen]
    for r in range(rungs, 0, -1):  # the most rungs that still let a trial reach the top by rank
        trials = math.floor(search / trial_cost(model, r, eta))
        if trials >= eta ** (r - 1):
            break
    if trials < 1:
        least = (reserve[chosen] + model) / 60
        raise SmidsError(f"--budget {minutes:g} min cannot hold a search here: one full-length trial takes "
                         f"~{model / 60:.1f} min; give at least {math.ceil(least)} min, or fewer --epochs")
    trials = min(trials, max_trials or MAX_PLANNED_TRIALS, MAX_PLANNED_TRIALS)
    return Plan(minutes, model / 60, r, trials, *chosen, search, started + total)


def replan_finalists(study: optuna.Study, chosen: list, budget: Plan, folds_ratio: float) -> tuple[int, int, bool]:
    """(finalists, folds, refit) that fit the budget left, from what the chosen trials' full-length runs took:
    the most thorough cross-validation that fits; else none, but the best trial refit on the whole training part
    when one model fits (more data than its own weights saw); else nothing more (refit False)."""
    if not chosen:
        return budget.finalists, budget.folds, True  # nothing completed: `finalize` says so
    client = mlflow.MlflowClient()
    seconds = []
    for trial in chosen:
        info = client.get_run(trial.user_attrs[RUN_ID_ATTR]).info
        seconds.append(((info.end_time or info.start_time) - info.start_time) / 1000)
    on_part = max(seconds) * folds_ratio
    left = budget.minutes_left() * 60
    for option in finalist_options(budget.finalists, budget.folds):
        if finalists_cost(on_part, *option) <= left:
            return (*option, True)
    refit = seconds[0] * folds_ratio <= left  # chosen[0] is the best trial
    click.echo(f"budget: {left / 60:.0f} min left, too little to cross-validate finalists (~{on_part / 60:.1f} min a "
               "model); " + ("refitting the best trial on the whole training part" if refit
                             else "registering the best trial's own weights"), err=True)
    return 0, budget.folds, refit
