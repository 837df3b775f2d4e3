"""Training and evaluation loops in plain torch: nothing here knows MLflow or Optuna.

Callbacks see each epoch's metrics; a callback may raise (Optuna's pruning does) to stop training.
"""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

from smids_ml import SmidsError
from smids_ml.config import TrainConfig
from smids_ml.models import FIXED_INPUT_MODELS, classifier_of

Callback = Callable[[int, dict], None]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SmidsError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the classifier's: what --freeze-epochs holds and --backbone-lr slows."""
    head = {id(p) for p in classifier_of(model).parameters()}
    return [p for p in model.parameters() if id(p) not in head]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The fused (one kernel for all parameters) implementations where torch has them, on CPU and CUDA: the
    same update as the per-parameter loop, which on a CPU costs a tenth of a small network's step. With
    --backbone-lr the classifier (group 0) and the backbone (group 1) get their own learning rates."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.backbone_lr != 1:
        backbone = backbone_parameters(model)
        params = [{"params": list(classifier_of(model).parameters()), "lr": cfg.lr},
                  {"params": backbone, "lr": cfg.lr * cfg.backbone_lr}]
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, fused=fused)
    optimizer = torch.optim.AdamW if cfg.optimizer == "AdamW" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions natively."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Networks measured faster under CPU bf16 autocast: resnet18 at 96 px about 2x on an AMX CPU, smids_resnet
# 1.6x per 5-fold run on an AVX512-BF16 one at the same cross-validated accuracy; the small study CNNs gained
# nothing, and the depthwise mobilenet_v3_small and efficientnet_b0 ran 2x and 1.7x slower (AVX512-BF16 EPYC).
BF16_CPU_GAINS = ("smids_resnet", "resnet18")


def resolve_precision(precision: str, device: torch.device, model: str) -> str:
    """'bf16' or 'fp32': auto means bf16 on CUDA, and on native-bf16 CPUs for networks where it pays."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and model in BF16_CPU_GAINS and cpu_has_native_bf16() else "fp32"


def _autocast(device: torch.device, precision: str):
    """bf16 mixed precision (no loss scaling needed) where chosen; full precision otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Channels-last images: oneDNN (CPU) and cuDNN convolutions both run faster on that layout."""
    return x.to(device, memory_format=torch.channels_last)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """(scheduler, steps it per batch?): onecycle and linear warm up then anneal every step, along a cosine
    or a straight line to zero; cosine anneals every epoch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler in ("onecycle", "linear") and total >= 3:  # OneCycleLR needs a step in each of its two phases
        warmup = min(max(round(cfg.warmup_epochs * steps_per_epoch), 2), total - 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total, pct_start=warmup / total,
            anneal_strategy="cos" if cfg.scheduler == "onecycle" else "linear"), True
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), False
    return None, False


def epoch_sizes(cfg: TrainConfig) -> list[int]:
    """The input side of each epoch: --image-size throughout, or with --progressive-start a linear ramp (in
    steps of 8 px) from that fraction of the side at the first epoch to the full side at three quarters of the
    schedule. Networks with a fixed-size classifier (the study's CNNs) always train at full size."""
    if not cfg.progressive_start or cfg.model in FIXED_INPUT_MODELS:
        return [cfg.image_size] * cfg.epochs
    start = max(16, min(cfg.image_size, round(cfg.image_size * cfg.progressive_start)))
    ramp = max(round(cfg.epochs * 0.75) - 1, 1)
    return [min(cfg.image_size, start + 8 * round((cfg.image_size - start) * min(e / ramp, 1.0) / 8))
            for e in range(cfg.epochs)]


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, precision: str = "fp32",
                    step_scheduler=None, mix: v2.Transform | None = None,
                    ema: AveragedModel | None = None) -> dict:
    """One pass over the training batches; `mix` (MixUp) blends each batch and its labels before the step,
    and train_acc then counts the dominant label of each blend; `ema` follows the weights after each step."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for images, targets in batches:
        images, targets = _to_device(images, device), targets.to(device)
        labels = targets
        if mix is not None:
            images, labels = mix(images, targets)
            targets = labels.argmax(1)
        with _autocast(device, precision):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler:
            step_scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen, "train_acc": correct / seen, "images_per_second": seen / seconds}


@torch.no_grad()
def predict_proba(model: nn.Module, batches: Iterable, device: torch.device,
                  precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets for every batch, in eval mode."""
    model.eval()
    probs, targets = [], []
    for images, y in batches:
        with _autocast(device, precision):
            logits = model(_to_device(images, device))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        targets.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def classification_metrics(targets: np.ndarray, probs: np.ndarray, prefix: str) -> dict:
    """Loss, accuracy, macro precision/recall/F1 and Matthews' correlation from probabilities."""
    predicted = probs.argmax(1)
    labels = list(range(probs.shape[1]))
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, labels=labels,
                                                               average="macro", zero_division=0)
    picked = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    return {f"{prefix}_loss": float(-np.log(picked).mean()), f"{prefix}_acc": float(accuracy_score(targets, predicted)),
            f"{prefix}_f1": float(f1), f"{prefix}_precision": float(precision), f"{prefix}_recall": float(recall),
            f"{prefix}_mcc": float(matthews_corrcoef(targets, predicted))}


def evaluate(model: nn.Module, batches: Iterable, device: torch.device, prefix: str = "valid",
             precision: str = "fp32") -> dict:
    probs, targets = predict_proba(model, batches, device, precision)
    return classification_metrics(targets, probs, prefix)


class Diverged(SmidsError):
    """The loss or the weights stopped being finite numbers: such a model predicts NaN, so nothing may keep it."""


def check_finite(epoch: int, loss: float, model: nn.Module) -> None:
    """Raise Diverged when the epoch's loss or any weight or buffer (batch-norm statistics) is not finite."""
    broken = not math.isfinite(loss) or any(not torch.isfinite(t).all() for t in model.state_dict().values()
                                             if t.is_floating_point())
    if broken:
        raise Diverged(f"training diverged at epoch {epoch}: train_loss {loss:.4g}, the weights are no longer finite "
                       "numbers (lower --lr); no model was kept")


@dataclass
class History:
    """Per-epoch metrics and the epoch whose weights were kept."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def best(self) -> dict:
        return self.epochs[self.best_epoch - 1]


def class_weights(kind: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class from the training labels: `balanced` (the inverse of each class's share, so every
    class weighs as much in total), `sqrt` (its square root), or None for `none`. Normalised to a mean image
    weight of 1: the loss divides by the batch's weights for class targets but not for MixUp's blended ones."""
    if kind == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_(min=1)
    weights = (counts.sum() / (num_classes * counts)) ** (0.5 if kind == "sqrt" else 1.0)
    return weights * counts.sum() / (weights * counts).sum()


def make_mix(alpha: float, pairs: str, num_classes: int) -> Callable | None:
    """The batch blending of --mixup (None when off): torchvision's MixUp across the batch, or intra-class mixup."""
    if alpha <= 0:
        return None
    return v2.MixUp(alpha=alpha, num_classes=num_classes) if pairs == "any" else ClassMixUp(alpha, num_classes)


class ClassMixUp:
    """Blends each image with a randomly drawn image of its own class (itself when it is its class's only one in
    the batch), each pair by its own Beta(alpha, alpha) weight; labels stay whole, as one-hot rows like MixUp's."""

    def __init__(self, alpha: float, num_classes: int):
        self.beta, self.num_classes = torch.distributions.Beta(alpha, alpha), num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        partner = torch.arange(len(labels), device=labels.device)
        for c in labels.unique():
            members = (labels == c).nonzero().squeeze(1)
            partner[members] = members[torch.randperm(len(members)).to(labels.device)]
        weight = self.beta.sample((len(labels),)).to(images.device, images.dtype).view(-1, 1, 1, 1)
        mixed = images * weight + images[partner] * (1 - weight)
        return mixed, nn.functional.one_hot(labels, self.num_classes).float()


def fit(model: nn.Module, batches: dict, cfg: TrainConfig, device: torch.device, num_classes: int,
        callbacks: Iterable[Callback] = ()) -> History:
    """Train with early stopping on `cfg.monitor`; the model ends with its best epoch's weights.
    Without validation batches (--valid-frac 0) the whole schedule runs and the last epoch is kept.
    With `cfg.ema` the moving average of the weights is what is validated and kept."""
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler, per_step = make_scheduler(optimizer, cfg, len(batches["train"]))
    precision = resolve_precision(cfg.precision, device, cfg.model)
    criterion = nn.CrossEntropyLoss(weight=class_weights(cfg.class_weights, batches["train"].labels, num_classes),
                                    label_smoothing=cfg.label_smoothing)
    mix = make_mix(cfg.mixup, cfg.mixup_pairs, num_classes)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    kept = ema.module if ema is not None else model
    sign = -1.0 if cfg.monitor == "valid_loss" else 1.0
    history, best_score, best_state, waited = History(), -float("inf"), None, 0
    validating = len(batches["valid"]) > 0
    sizes = epoch_sizes(cfg)
    backbone = backbone_parameters(model) if cfg.freeze_epochs else []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        for p in backbone:  # no gradient, so the optimiser leaves them (and their weight decay) alone
            p.requires_grad_(epoch > cfg.freeze_epochs)
        lr = optimizer.param_groups[0]["lr"]
        batches["train"].size = sizes[epoch - 1]
        metrics = train_one_epoch(model, batches["train"], optimizer, criterion, device, precision,
                                  scheduler if per_step else None, mix, ema)
        check_finite(epoch, metrics["train_loss"], kept)
        if validating:
            metrics.update(evaluate(kept, batches["valid"], device, "valid", precision))
        metrics.update(lr=lr, image_size=sizes[epoch - 1], epoch_seconds=time.perf_counter() - start)
        if scheduler and not per_step:
            scheduler.step()
        history.epochs.append(metrics)
        score = sign * metrics[cfg.monitor] if validating else epoch
        if score > best_score:
            best_score, best_state, waited = score, copy.deepcopy(kept.state_dict()) if validating else None, 0
            history.best_epoch = epoch
        else:
            waited += 1
        for callback in callbacks:
            callback(epoch, metrics)
        if cfg.patience and waited >= cfg.patience:
            history.stopped_early = True
            break
    # nothing selected (no validation split): the last epoch's weights, or their moving average
    model.load_state_dict(best_state if best_state is not None else kept.state_dict())
    return history
