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
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

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


def load_classifier(uri: str) -> "SmidsClassifier":
    """The SmidsClassifier behind any MLflow model URI; a one-line SmidsError when it cannot be loaded."""
    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError, ImportError) as exc:
        raise SmidsError(f"cannot load model {uri}: {one_line(exc)}") from None
    if not isinstance(model, SmidsClassifier):
        raise SmidsError(f"{uri} is not a smids-ml model (its python model is a {type(model).__name__})")
    return model


class SmidsClassifier(mlflow.pyfunc.PythonModel):
    """One or more networks that share their input preprocessing and classes; the answer is the mean
    of their probabilities. A single trained model is an ensemble of one; k-fold and top-k ensembles
    are the same class. Weights are state_dicts, loaded with weights_only=True."""

    def load_context(self, context) -> None:
        with open(context.artifacts["config"]) as handle:
            meta = json.load(handle)
        self.load(meta, context.artifacts["weights"])

    def load(self, meta: dict, weights_path: str) -> "SmidsClassifier":
        """`meta`: {"classes", "members": [config, ...]}, or the single-model {"classes", "config"} of
        models logged before ensembles; the weights file holds {"members": [state_dict, ...]} or one state_dict."""
        self.classes: list[str] = meta["classes"]
        self.members = [TrainConfig.from_dict(c) for c in meta.get("members") or [meta["config"]]]
        self.config = self.members[0]  # the input preprocessing every member shares
        saved = torch.load(weights_path, map_location="cpu", weights_only=True)
        states = saved["members"] if set(saved) == {"members"} else [saved]
        self.networks = []
        for cfg, state in zip(self.members, states, strict=True):
            network = build_for(cfg, len(self.classes))
            network.load_state_dict(state)
            self.networks.append(network.eval().to(memory_format=torch.channels_last))
        return self

    def preprocess(self, image) -> torch.Tensor:
        cfg = self.config
        return prepare_image(image, cfg.image_size, cfg.channels, cfg.resize)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities (the members' mean) for a uint8 N×C×H×W batch of preprocessed images."""
        out = []
        for i in range(0, len(images), INFERENCE_BATCH):
            batch = normalize(images[i:i + INFERENCE_BATCH]).contiguous(memory_format=torch.channels_last)
            out.append(torch.stack([torch.softmax(network(batch), 1) for network in self.networks]).mean(0))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_frame(self, probs: np.ndarray) -> pd.DataFrame:
        """label, confidence and one probability column per class."""
        frame = pd.DataFrame({"label": pd.Series([self.classes[i] for i in probs.argmax(1)], dtype=object),
                              "confidence": pd.Series(probs.max(1) if len(probs) else [], dtype="float64")})
        for i, name in enumerate(self.classes):
            frame[name] = probs[:, i].astype(float)
        return frame

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise MlflowException(f"the input needs a column 'image' of base64-encoded images; got columns "
                                  f"{list(frame.columns)}", error_code=INVALID_PARAMETER_VALUE)
        if len(frame) > MAX_REQUEST_IMAGES:
            raise MlflowException(f"{len(frame)} images in one request; the limit is {MAX_REQUEST_IMAGES}",
                                  error_code=INVALID_PARAMETER_VALUE)
        tensors = []
        for row, text in enumerate(frame["image"]):
            try:
                tensors.append(self.preprocess(decode_base64_image(text)))
            except ImageError as exc:
                raise MlflowException(f"image {row}: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
        batch = torch.stack(tensors) if tensors else torch.zeros((0,), dtype=torch.uint8)
        return self.to_frame(self.probabilities(batch))
