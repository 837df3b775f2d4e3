"""The one place that names every training parameter.

`TrainConfig` is read by the `train` CLI (its options are generated from the fields), by the
tuning search spaces (which override fields by name) and by the MLproject (whose `train`
parameters are these field names; a test checks they agree).

Data only: it imports nothing of the package but `SmidsError`, so it loads neither torch nor MLflow; the checks
that need them or a model (the device, an --init-from source) are `transfer.checked_config`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import click
from click.core import ParameterSource

from smids_ml import SmidsError


class FiniteFloat(click.FloatRange):
    """A number flag that refuses nan and inf while click parses, before torch or MLflow load: they pass every
    comparison of a range, and downstream `int(nan)` is a traceback and `inf` an overflow or a run that never ends."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            raise SmidsError(f"{param.opts[0] if param else 'the value'} must be a finite number, got {value!r}")
        return number


TRAIN_EXPERIMENT, CV_EXPERIMENT = "smids-ml", "smids-ml-cv"  # the commands' default MLflow experiments

# tune's defaults and choices live here, not in the modules that use them (budget, ranking, rungs, studies, spaces,
# tune), so that its flags are checked before Optuna, torch and MLflow load
# Trials are ranked, pruned and early-stopped on validation, so tune carves one even where train's default does not.
TUNE_DEFAULTS = {"valid_frac": 0.15}
SPACE_NAMES = ("initial-grid", "improved-grid", "broad")  # spaces.SPACES, in this order (a test holds them equal)
DEFAULT_TPE_TRIALS = 20
DEFAULT_FINALISTS, DEFAULT_FOLDS = 3, 5
DEFAULT_BUDGET_MINUTES = 240  # an afternoon
DEFAULT_RUNGS, DEFAULT_ETA = 3, 3
RANKINGS = ("auto", "split", "folds")
MIN_VALID_CROPS = 150  # from here a validation part ranks trials to within ~3 points of accuracy (one SE at 85%)
DEFAULT_RANKING_FOLDS = 3
JOURNAL = "optuna.journal"  # a journal file: safe for several workers on one machine
HEARTBEAT_SECONDS = 30

MODELS = ("smids_resnet", "simple_cnn", "improved_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0")
OPTIMIZERS = ("Adam", "AdamW", "SGD")
MONITORS = ("valid_f1", "valid_acc", "valid_loss")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_IMAGE_SIZE = 1024  # far beyond any crop; the image cache grows with the square


# Named partial configs. The default recipe is TrainConfig's own defaults, chosen by 5-fold
# cross-validation on real SMIDS crops (docs/benchmarks.md, "Accuracy on real crops"): 96 px input through a pooled
# stem for 155 epochs, a fifth of the compute of `long`, the previous defaults (the plain stem for 200
# epochs), kept for whoever has the time. `fast` trains the plain stem at 64 px for 150 epochs and
# averages the 8 orientations at test time (a third of `long`'s compute; docs/accuracy.md). `original` is the
# earlier study's recipe: grayscale, stretched to 112 px, its CNN, Adam 1e-4 with cosine
# annealing over 50 epochs, early stopping on validation accuracy, ±30° rotation, flips and
# brightness/contrast jitter, and its 70/9/21 split.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "long": {"stem": "conv", "epochs": 200},
    "fast": {"stem": "conv", "image_size": 64, "epochs": 150, "tta": "d4"},
    "original": {"channels": 1, "resize": "stretch", "image_size": 112, "model": "improved_cnn", "dropout_rate": 0.35,
                 "epochs": 50, "patience": 10, "lr": 1e-4, "optimizer": "Adam", "weight_decay": 0.0,
                 "scheduler": "cosine", "label_smoothing": 0.0, "monitor": "valid_acc", "rotation": 30.0,
                 "scale_shift": 0.0, "valid_frac": 0.09, "test_frac": 0.21, "class_weights": "none"},
}


# Fields added after models were first logged, with the value that means "as before" for a stored config
# without them (a default may change; what an old model was trained and evaluated with may not).
ADDED_LATER: dict[str, Any] = {"tta": "none", "progressive_start": 0.0, "orientations": "random", "stem": "conv",
                               "class_weights": "none"}


def _opt(default, help, choices=None, tunable=True, cli=True):
    return field(default=default, metadata={"help": help, "choices": choices, "tunable": tunable, "cli": cli})


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Defaults suit real stained SMIDS crops."""

    preset: str = _opt("default", "Start from a named recipe (see PRESETS): default; long (the previous defaults: the "
                                  "plain stem for 200 epochs, five times the compute, for whoever has the time); fast "
                                  "(64 px with the plain stem, 150 epochs, test-time averaging); or original (the "
                                  "earlier study's recipe, for side-by-side comparison). Explicit flags override it.",
                       ("default", "long", "fast", "original"),
                       tunable=False)
    # data
    data: str = _opt("data", "Data root: one folder per class (found up to two levels down), or with --labels the folder "
                             "the table's paths are relative to.", tunable=False)
    labels: str | None = _opt(None, "A CSV table of labels in place of class folders: a `path` column (relative to --data) "
                                    "and label columns, one of them chosen by --label-column.", tunable=False)
    label_column: str | None = _opt(None, "The --labels column whose values are the classes (e.g. acrosome). `train` takes "
                                          "several, comma-separated (acrosome,head,vacuole): one model per column, each "
                                          "in a nested run under one parent run and registered as --register-as "
                                          "NAME-<column>.", tunable=False)
    split_column: str | None = _opt(None, "A --labels column holding the data set's own split (train, valid, test), used "
                                          "instead of drawing one: its test rows are the test part, or without any (MHSMA's "
                                          "train/valid) its valid rows are. A validation part (--valid-frac above 0) is its "
                                          "valid rows beside test rows, else carved from its train rows; with --valid-frac 0 "
                                          "they train.", tunable=False)
    split_manifest: str | None = _opt(None, "Reuse this manifest CSV (its split) instead of splitting anew.", tunable=False)
    classes: str | None = _opt(None, "Comma-separated class folders to use (default: every class folder found).", tunable=False)
    valid_frac: float = _opt(0.0, "Fraction of images for validation (early stopping, choosing the kept epoch). 0: no "
                                   "validation split: those images train too and the last epoch of the full schedule is kept.",
                             tunable=False)
    test_frac: float = _opt(0.15, "Fraction of images held out for the test split.", tunable=False)
    strict: bool = _opt(False, "Fail on any unreadable image instead of skipping it.", tunable=False)
    # input
    image_size: int = _opt(0, "Side of the square network input, in pixels. 0: from the data, the crops' median side "
                              "rounded to 8 px, between 32 and 96 (96 on SMIDS).")
    channels: int = _opt(0, "3 keeps the stain colour; 1 is grey (as the original study). 0: from the data, 1 when "
                            "every sampled crop is grey, else 3.", (0, 1, 3))
    resize: str = _opt("pad", "pad keeps the aspect ratio (head shape is the signal); stretch distorts it as the original study did.", ("pad", "stretch"))
    augment: bool = _opt(True, "Random rotation, flips, small scale and shift, brightness/contrast and colour balance "
                               "on training batches.")
    progressive_start: float = _opt(0.0, "Progressive resizing: the first epoch trains at this fraction of --image-size (0.5: "
                                         "half the side), growing linearly in steps of 8 px to full size at three quarters "
                                         "of the schedule; the last quarter trains at full size (0: off). An epoch costs about "
                                         "the square of its side. The study's CNNs, whose classifier has a fixed input size, "
                                         "always train at full size.")
    augment_strength: float = _opt(1.0, "Scales the scale/shift and photometric augmentation (0 turns them off; rotation and flips stay).")
    rotation: float = _opt(180.0, "Largest random rotation in degrees (180: any angle, as cells lie in every orientation).")
    orientations: str = _opt("random", "How training crops are turned (with --rotation 180): random draws an angle and a "
                                       "mirror flip each time; cycle turns each crop through the 8 rotations by 90° and "
                                       "mirror images of the square, one per epoch from a random start, plus a random "
                                       "angle within ±45° (the same spread of angles, every orientation within 8 epochs).",
                             ("random", "cycle"))
    scale_shift: float = _opt(0.1, "Largest random rescale and shift, as a fraction of the image (times --augment-strength).")
    # model
    model: str = _opt("smids_resnet", "Architecture.", MODELS)
    pretrained: bool = _opt(False, "Start from torchvision ImageNet weights (from the torch cache, or downloaded into it).")
    init_from: str | None = _opt(None, "Start from another smids-ml model's network (models:/NAME@ALIAS, models:/NAME/VERSION "
                                       "or runs:/RUN/model): its weights, with a new classifier for this data's classes. "
                                       "--model, --width, --stem, --channels, --image-size and --resize follow it unless "
                                       "given; the input size may differ, the rest must match.", tunable=False)
    freeze_epochs: int = _opt(0, "With --init-from: train only the new classifier for this many first epochs (the rest of "
                                 "the network's weights frozen; its batch-norm statistics still adapt to the new images).")
    backbone_lr: float = _opt(1.0, "With --init-from: the learning rate of everything but the classifier, as a fraction "
                                   "of --lr (0.1: ten times lower).")
    width: int = _opt(32, "Channels of smids_resnet's first stage, doubled at each of its four stages "
                          "(32: 1.2 M parameters; compute grows with the square).")
    stem: str = _opt("pool", "smids_resnet's stem: conv, a stride-2 3×3 convolution; pool adds a stride-2 max-pool after it, so "
                             "every stage runs at a quarter of the positions (about a quarter of the compute at the same "
                             "--image-size) while the stem still sees every input pixel; patch, a 4×4 stride-4 convolution "
                             "over non-overlapping patches, reaches that quarter-size map without the half-size one (the "
                             "same compute, less time on a CPU); overlap, the same with overlapping 7×7 patches.",
                 ("conv", "pool", "patch", "overlap"))
    dropout_rate: float = _opt(0.2, "Dropout before the classifier.")
    # optimisation
    epochs: int = _opt(0, "Number of epochs (the schedule spans them all). 0: from the data: at least 155 epochs "
                          "and 6,975 optimizer steps (155 epochs of a SMIDS fold), so a small set trains longer.")
    patience: int = _opt(0, "Stop after this many epochs without improvement of --monitor (0: never stop early, "
                            "so a decaying schedule always finishes).")
    batch: int = _opt(32, "Batch size.")
    lr: float = _opt(2e-3, "Peak learning rate.")
    optimizer: str = _opt("AdamW", "Optimizer (SGD uses momentum 0.9).", OPTIMIZERS)
    weight_decay: float = _opt(0.05, "Weight decay (decoupled for AdamW).")
    scheduler: str = _opt("onecycle", "Learning-rate schedule over --epochs: onecycle warms up for --warmup-epochs, then "
                                      "anneals to zero each step along a cosine; linear does the same along a straight line "
                                      "(budget-aware); cosine anneals per epoch from the start.",
                          ("onecycle", "linear", "cosine", "none"))
    warmup_epochs: float = _opt(2.0, "Warm-up length of the onecycle schedule, in epochs (kept shorter than the run).")
    label_smoothing: float = _opt(0.1, "Label smoothing of the cross-entropy loss.")
    class_weights: str = _opt("auto", "Weights of the classes in the loss: balanced weighs each class by the inverse of "
                                      "its share of the training images (every class counts as much in total), sqrt by "
                                      "the square root of that (half-way), none weighs every image alike; auto: sqrt "
                                      "when the largest class is 1.5 times the smallest or more, else none.",
                              ("auto", "none", "sqrt", "balanced"))
    mixup: float = _opt(0.0, "MixUp alpha: each training batch is blended with a shifted copy of itself, labels too, "
                             "by a Beta(alpha, alpha) weight (0: off).")
    mixup_pairs: str = _opt("any", "Whom --mixup blends each image with: any image of the batch (labels blended too), or "
                                   "class, another image of its own class with its label kept (intra-class mixup, as "
                                   "SHMC-Net's on small sets of sperm heads: new crops of a class, no blurred labels).",
                            ("any", "class"))
    ema: float = _opt(0.0, "Decay per step of an exponential moving average of the weights (and batch-norm statistics), "
                           "which is what is evaluated and kept (0: off; 0.999 averages over about 1,000 steps).")
    tta: str = _opt("none", "Test-time averaging: d4 averages the logits over the 8 rotations by 90° and mirror images of "
                            "each crop (exact symmetries of cells that lie in any orientation) wherever the model predicts: "
                            "validation, evaluate, predict and serving; 8× the inference compute, no training cost.",
                    ("none", "d4"))
    monitor: str = _opt("valid_f1", "Validation metric for early stopping and model selection (valid_f1 is macro F1).", MONITORS)
    # runtime
    seed: int = _opt(42, "Seed for the split, initialisation, shuffling and augmentation.", tunable=False)
    device: str = _opt("auto", "Where to train.", DEVICES, tunable=False)
    precision: str = _opt("auto", "bf16 autocast or fp32. auto: bf16 on CUDA, and on CPUs with native bf16 for the "
                                  "networks where it measures faster (smids_resnet, resnet18); fp32 elsewhere.",
                          PRECISIONS, tunable=False)
    num_threads: int = _opt(0, "Torch CPU threads (0: torch's default).", tunable=False)
    # filled by smids_ml.adapt, not a flag: what was read off the data, with the reasons
    adapted: str = _opt("", "The values decided from the data, with their reasons.", tunable=False, cli=False)

    def validate(self) -> "TrainConfig":
        """Raise SmidsError on the first bad value, before anything is created. Numbers given as text
        (YAML reads `1e-9` as a string) are converted."""
        for f in fields(self):
            kind = {"int": int, "float": float}.get(str(f.type))
            value = getattr(self, f.name)
            if kind and (isinstance(value, bool) or not isinstance(value, (int, float))):
                try:
                    setattr(self, f.name, kind(value))
                except (TypeError, ValueError):
                    raise SmidsError(f"--{f.name.replace('_', '-')} must be a number, got {value!r}") from None
            if kind is float and not math.isfinite(getattr(self, f.name)):  # inf passes every `>` check
                raise SmidsError(f"--{f.name.replace('_', '-')} must be a finite number, got {value!r}")
        checks = [
            (self.epochs >= 0, f"--epochs must be at least 1 (0: from the data), got {self.epochs}"),
            (self.patience >= 0, f"--patience must be 0 or more, got {self.patience}"),
            (self.batch >= 1, f"--batch must be at least 1, got {self.batch}"),
            (self.lr > 0, f"--lr must be greater than 0, got {self.lr}"),
            (0 <= self.dropout_rate < 1, f"--dropout-rate must be in [0, 1), got {self.dropout_rate}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.mixup >= 0, f"--mixup must be 0 or more, got {self.mixup}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1) (a decay per step; 0 is off), got {self.ema}"),
            (0 <= self.augment_strength < 5, f"--augment-strength must be in [0, 5) (at 5 the brightness jitter "
                                             f"reaches black), got {self.augment_strength}"),
            (0 <= self.rotation <= 180, f"--rotation must be in [0, 180] degrees, got {self.rotation}"),
            (self.orientations == "random" or self.rotation == 180,
             f"--orientations cycle turns crops through every orientation: it needs --rotation 180, got {self.rotation}"),
            (0 <= self.scale_shift < 0.5, f"--scale-shift must be in [0, 0.5), got {self.scale_shift}"),
            (self.scale_shift * self.augment_strength < 0.5, f"--scale-shift times --augment-strength must stay below "
                                                             f"0.5, got {self.scale_shift} × {self.augment_strength}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}"),
            (self.width >= 4, f"--width must be at least 4, got {self.width}"),
            (self.image_size == 0 or 16 <= self.image_size <= MAX_IMAGE_SIZE,
             f"--image-size must be between 16 and {MAX_IMAGE_SIZE} pixels, got {self.image_size} (0: from the data)"),
            (0 <= self.progressive_start <= 1, f"--progressive-start must be in [0, 1] (a fraction of --image-size; 0 "
                                               f"is off), got {self.progressive_start}"),
            (0 <= self.valid_frac < 1 and 0 < self.test_frac < 1 and self.valid_frac + self.test_frac < 1,
             f"--valid-frac must be in [0, 1), --test-frac in (0, 1), and they must sum below 1, got {self.valid_frac} "
             f"and {self.test_frac}"),
            (self.valid_frac > 0 or self.patience == 0,
             f"--patience {self.patience} needs a validation split to watch; with --valid-frac 0 use --patience 0"),
            (self.num_threads >= 0, f"--num-threads must be 0 or more, got {self.num_threads}"),
            (0 <= self.freeze_epochs <= self.epochs, f"--freeze-epochs must be in [0, --epochs], got {self.freeze_epochs}"),
            (self.backbone_lr > 0, f"--backbone-lr must be above 0 (a fraction of --lr), got {self.backbone_lr}"),
            (self.init_from or (self.freeze_epochs == 0 and self.backbone_lr == 1),
             "--freeze-epochs and --backbone-lr act on the network --init-from gives; give --init-from"),
            (bool(self.labels) == bool(self.label_column), "--labels and --label-column go together: the table, and "
                                                           "which of its columns holds the classes"),
            (self.labels or not self.split_column, "--split-column names a column of the --labels table; give --labels"),
            (len(set(self.label_columns)) == len(self.label_columns),
             f"--label-column {self.label_column}: names a column twice; one model each needs distinct columns"),
            (not self.split_column or self.split_column not in self.label_columns,
             f"--split-column {self.split_column} is also a --label-column: the test part would be one class, which "
             "the model never trained on"),
        ]
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            checks.append((not choices or value in choices,
                           f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices or ()))}, got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise SmidsError(message)
        return self

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise SmidsError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A stored config (a logged model's): fields it predates take the value that reproduces how it was trained."""
        known = {f.name for f in fields(cls)}
        return cls(**{**ADDED_LATER, **{k: v for k, v in values.items() if k in known}})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The preset's values over the defaults, then `overrides` over both."""
        if name not in PRESETS:
            raise SmidsError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> "TrainConfig":
        """A validated config from `preset+field=value+...` (`fast+epochs=100`): the preset, the recipe's own
        overrides, then `overrides` over both (the benchmarks' and `train --member-recipes`' notation)."""
        name, *pairs = recipe.strip().split("+")
        if name not in PRESETS:
            raise SmidsError(f"recipe {recipe!r}: {name!r} is not a preset ({', '.join(PRESETS)})")
        known = {f.name: f for f in fields(cls)}
        own = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in known:
                raise SmidsError(f"recipe {recipe!r}: {pair!r} is not field=value of a TrainConfig field")
            if isinstance(known[key].default, bool):  # text as the CLI reads a boolean
                try:
                    value = click.BOOL.convert(value, None, None)
                except click.BadParameter:
                    raise SmidsError(f"recipe {recipe!r}: {key} must be true or false, got {value!r}") from None
            own[key] = value
        return cls.from_preset(name, **{**own, **overrides}).validate()  # validate() turns numbers to their type

    @property
    def label_columns(self) -> list[str]:
        return [c.strip() for c in (self.label_column or "").split(",") if c.strip()]

    @property
    def class_list(self) -> list[str] | None:
        return [c.strip() for c in self.classes.split(",") if c.strip()] if self.classes else None


def config_options(defaults: dict[str, Any] | None = None, only: tuple[str, ...] | None = None):
    """A decorator adding one click option per TrainConfig field (booleans as `--x [BOOL]` and `--no-x`);
    `defaults` are the command's own defaults where they differ from TrainConfig's (pass them to
    `config_from_options` too); `only` names the fields of a command that takes a few (`pretrain`)."""

    def decorate(command):
        for f in reversed([f for f in fields(TrainConfig) if f.metadata["cli"] and (only is None or f.name in only)]):
            default = (defaults or {}).get(f.name, f.default)
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata["help"]
            choices = f.metadata.get("choices")
            if f.type in ("bool", bool):
                command = click.option(f"--no-{f.name.replace('_', '-')}", f"no_{f.name}", is_flag=True,
                                       help=f"Same as {flag} false.")(command)
                command = click.option(flag, f.name, type=click.BOOL, is_flag=False, flag_value=True,
                                       default=f.default, show_default=True, help=help_text)(command)
                continue
            kind = {"int": int, "float": FiniteFloat()}.get(str(f.type), str)
            if choices:
                kind = click.Choice([str(c) for c in choices])
            command = click.option(flag, f.name, type=kind, default=default, show_default=default is not None,
                                   help=help_text)(command)
        return command

    return decorate


def config_from_options(options: dict[str, Any], defaults: dict[str, Any] | None = None,
                        follow: Callable[[str], dict[str, Any]] | None = None) -> TrainConfig:
    """Build a validated TrainConfig from the keyword arguments click passed; pops what it uses.

    With --preset, a flag overrides the preset when it was given on the command line; under
    `mlflow run`, which passes every parameter, when it also differs from the default.
    `defaults` (the command's own, as given to `config_options`) apply under the preset's values.
    `follow` gives the fields an --init-from source fixes (`transfer.followed_fields`, which loads the model):
    they apply over the preset and the defaults, under the flags given.
    """
    context = click.get_current_context(silent=True)
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    values = {}
    for f in fields(TrainConfig):
        if f.name not in options:
            continue
        value = options.pop(f.name)
        negated = options.pop(f"no_{f.name}", False)
        if negated:
            value = False
        if f.name == "channels":
            value = int(value)
        given = negated or context is None or context.get_parameter_source(f.name) not in (
            ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
        if given and not (under_mlflow_run and value == (defaults or {}).get(f.name, f.default)):
            values[f.name] = value
    preset = values.pop("preset", "default")
    own = {k: v for k, v in (defaults or {}).items() if k not in PRESETS.get(preset, {})}
    followed = follow(values["init_from"]) if follow and values.get("init_from") else {}
    return TrainConfig.from_preset(preset, **{**own, **followed, **values}).validate()
