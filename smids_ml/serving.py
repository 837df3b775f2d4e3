"""The logged model: an MLflow pyfunc that takes base64 images and answers a label and probabilities.

It applies exactly the evaluation preprocessing used in training (`data.prepare_image`), so a
served prediction equals the one `evaluate` and `predict` compute.
"""

from __future__ import annotations

import base64
import binascii
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from smids_ml import SmidsError
from smids_ml.config import TrainConfig
from smids_ml.data import MAX_PIXELS, ImageError, normalize, open_image, prepare_image
from smids_ml.models import build_for

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # one decoded image file
MAX_REQUEST_IMAGES = 512  # rows in one request
INFERENCE_BATCH = 64


def decode_base64_image(text, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS):
    """A base64 string → decoded PIL image; ImageError says what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise ImageError("expected a non-empty base64 string")
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageError(f"image is over the size limit of {max_bytes:,} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64") from None
    return open_image(raw, max_pixels=max_pixels)


def one_line(error: Exception) -> str:
    """An exception's message on one line (MLflow's often span several)."""
    return " ".join(str(getattr(error, "message", error)).split()) or type(error).__name__


def load_classifier(uri: str, pretrained_ok: bool = False) -> "SmidsClassifier":
    """The SmidsClassifier behind any MLflow model URI; a one-line SmidsError when it cannot be loaded, or when
    it is a network pretrained without labels (its classifier is a placeholder) unless `pretrained_ok`
    (`--init-from`, which replaces the classifier)."""
    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError, ImportError) as exc:
        raise SmidsError(f"cannot load model {uri}: {one_line(exc)}") from None
    if not isinstance(model, SmidsClassifier):
        raise SmidsError(f"{uri} is not a smids-ml model (its python model is a {type(model).__name__})")
    if model.pretrained and not pretrained_ok:
        raise SmidsError(f"{uri} is a network pretrained without labels ({model.pretrained}), not a classifier: "
                         f"train one from it with `smids-ml train --init-from {uri}`")
    return model


def input_of(cfg: TrainConfig) -> tuple[int, int, str]:
    """What a member's preprocessing depends on: (image size, channels, resize mode)."""
    return cfg.image_size, cfg.channels, cfg.resize


class SmidsClassifier(mlflow.pyfunc.PythonModel):
    """One or more networks with the same classes; the answer is the mean of their probabilities. A single
    trained model is an ensemble of one; k-fold, top-k and multi-recipe ensembles are the same class.
    Weights are state_dicts, loaded with weights_only=True.

    Each member sees the crop exactly as it did in training: members that differ in input size or
    channels (an ensemble of recipes) get one preprocessed copy per input format, packed side by side
    in one flat uint8 row per image, so callers keep stacking one tensor per image."""

    def load_context(self, context) -> None:
        with open(context.artifacts["config"]) as handle:
            meta = json.load(handle)
        self.load(meta, context.artifacts["weights"])

    def load(self, meta: dict, weights_path: str) -> "SmidsClassifier":
        """`meta`: {"classes", "members": [config, ...]}, or the single-model {"classes", "config"} of
        models logged before ensembles; the weights file holds {"members": [state_dict, ...]} or one state_dict."""
        self.classes: list[str] = meta["classes"]
        self.pretrained: str | None = meta.get("pretrained")  # `smids-ml pretrain`: a placeholder classifier
        self.members = [TrainConfig.from_dict(c) for c in meta.get("members") or [meta["config"]]]
        self.config = self.members[0]  # the resize mode every member shares; the first member's input
        self.inputs = list(dict.fromkeys(input_of(cfg) for cfg in self.members))
        saved = torch.load(weights_path, map_location="cpu", weights_only=True)
        states = saved["members"] if set(saved) == {"members"} else [saved]
        self.networks = []
        for cfg, state in zip(self.members, states, strict=True):
            network = build_for(cfg, len(self.classes))
            network.load_state_dict(state)
            self.networks.append(network.eval().to(memory_format=torch.channels_last))
        return self

    def preprocess(self, image) -> torch.Tensor:
        """uint8 C×S×S for one input format; with several, their flattened copies in one row."""
        if len(self.inputs) == 1:
            return prepare_image(image, *self.inputs[0])
        return torch.cat([prepare_image(image, *spec).flatten() for spec in self.inputs])

    def pack(self, per_input: list[torch.Tensor]) -> torch.Tensor:
        """N images preprocessed once per input format (N×C×S×S each, in `inputs` order) → what `preprocess`
        makes for N images, stacked."""
        return per_input[0] if len(self.inputs) == 1 else torch.cat([t.flatten(1) for t in per_input], 1)

    def unpack(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of `pack`: one N×C×S×S batch per input format."""
        if len(self.inputs) == 1:
            return [images]
        sizes = [channels * side * side for side, channels, _ in self.inputs]
        return [part.reshape(len(images), channels, side, side)
                for part, (side, channels, _) in zip(images.split(sizes, 1), self.inputs)]

    def member_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's uint8 batch, in member order."""
        views = self.unpack(images)
        return [views[self.inputs.index(input_of(cfg))] for cfg in self.members]

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities (the members' mean) for a batch that `preprocess` made, stacked."""
        out = []
        for i in range(0, len(images), INFERENCE_BATCH):
            inputs = self.member_inputs(images[i:i + INFERENCE_BATCH])
            out.append(torch.stack([
                torch.softmax(network(normalize(x).contiguous(memory_format=torch.channels_last)), 1)
                for network, x in zip(self.networks, inputs)]).mean(0))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_frame(self, probs: np.ndarray) -> pd.DataFrame:
        """label, confidence and one probability column per class."""
        frame = pd.DataFrame({"label": pd.Series([self.classes[i] for i in probs.argmax(1)], dtype=object),
                              "confidence": pd.Series(probs.max(1) if len(probs) else [], dtype="float64")})
        for i, name in enumerate(self.classes):
            frame[name] = probs[:, i].astype(float)
        return frame

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if self.pretrained:
            raise MlflowException.invalid_parameter_value(
                f"this model is a network pretrained without labels ({self.pretrained}), not a classifier: "
                "train one from it with `smids-ml train --init-from`")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input needs a column 'image' of base64-encoded images; got columns {list(frame.columns)}")
        if len(frame) > MAX_REQUEST_IMAGES:
            raise MlflowException.invalid_parameter_value(
                f"{len(frame)} images in one request; the limit is {MAX_REQUEST_IMAGES}")
        tensors = []
        for row, text in enumerate(frame["image"]):
            try:
                tensors.append(self.preprocess(decode_base64_image(text)))
            except ImageError as exc:
                raise MlflowException.invalid_parameter_value(f"image {row}: {exc}") from None
        batch = torch.stack(tensors) if tensors else torch.zeros((0,), dtype=torch.uint8)
        return self.to_frame(self.probabilities(batch))
