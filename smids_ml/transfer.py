"""Start from another smids-ml model's network: `--init-from models:/NAME@ALIAS` (or `runs:/RUN/model`).

Offline lab machines have no ImageNet weights, and those are far from stained sperm anyway; the nearest
weights a lab has are its own earlier models in the registry. The source's network keeps its weights
except the classifier, which is built anew for this data's classes. Its architecture and channels must
match (they shape the weights); the input size may differ (every network here pools or is re-headed).

`checked_config` is where `train`, `cv` and `tune` turn their flags into a config: the source loaded, the fields
it fixes followed, and the device checked, all before any run; `config` itself stays data.
"""

from __future__ import annotations

import functools

import mlflow
import torch

from smids_ml import SmidsError
from smids_ml.config import TrainConfig, config_from_options
from smids_ml.engine import resolve_device
from smids_ml.models import classifier_name, unwrap
from smids_ml.serving import load_classifier
from smids_ml.tracking import resolve_model

FOLLOWED = ("model", "width", "stem", "channels", "image_size", "resize")  # taken from the source unless given
MUST_MATCH = ("model", "width", "stem", "channels")  # the shapes of the backbone's weights


@functools.cache
def source(uri: str):
    """The source's config, its network and the run that trained it; one line when it is no single smids-ml model."""
    model = load_classifier(uri, pretrained_ok=True)
    if len(model.networks) != 1:
        raise SmidsError(f"--init-from {uri} is an ensemble of {len(model.networks)} networks; start from one model")
    return model.members[0], model.networks[0], resolve_model(uri)


def checked_config(options: dict, defaults: dict | None = None) -> TrainConfig:
    """A training command's config from its flags (`config.config_from_options`), with what needs torch or a model
    settled before any run exists: the fields the --init-from source fixes (under the flags given), whether its
    weights fit that network, and whether the device is there."""
    cfg = config_from_options(options, defaults, follow=followed_fields)
    resolve_device(cfg.device)
    if cfg.init_from:
        check_source(cfg)
    return cfg


def followed_fields(uri: str) -> dict:
    cfg = source(uri)[0]
    return {name: getattr(cfg, name) for name in FOLLOWED}


def check_source(cfg: TrainConfig) -> None:
    """Refuse in one line, before any run, a source whose weights cannot fit the network `cfg` describes."""
    own = source(cfg.init_from)[0]
    for name in MUST_MATCH:
        if getattr(cfg, name) != getattr(own, name):
            flag = "--" + name.replace("_", "-")
            raise SmidsError(f"--init-from {cfg.init_from}: its network was trained with {flag} {getattr(own, name)}, "
                             f"so {flag} {getattr(cfg, name)} cannot take its weights (leave {flag} out to follow it)")


def initialise(network: torch.nn.Module, cfg: TrainConfig) -> None:
    """Load the source's weights into `network` but for its classifier; tag the active run with the source."""
    check_source(cfg)
    _, trained, resolved = source(cfg.init_from)
    head = classifier_name(network) + "."
    weights = {k: v for k, v in unwrap(trained).state_dict().items() if not k.startswith(head)}
    missing, unexpected = unwrap(network).load_state_dict(weights, strict=False)
    unfit = [*unexpected, *(k for k in missing if not k.startswith(head))]
    if unfit:
        raise SmidsError(f"--init-from {cfg.init_from}: its weights do not fit this network ({', '.join(unfit[:3])})")
    mlflow.set_tags({"smids_ml.init_from": resolved.canonical, "smids_ml.init_from_run": resolved.run_id or ""})
