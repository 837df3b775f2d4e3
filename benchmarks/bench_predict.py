"""Prediction speed on this CPU: `python -m benchmarks.bench_predict`.

The default model (TrainConfig's architecture and input size), untrained (weights do not change
speed), is logged as the real pyfunc to a throwaway SQLite store, alone and as a 5-model ensemble,
and 500 synthetic crops are written. Then, on the same network:
- baseline: the original study's way, PIL open + torchvision transforms per image, batch 1;
- predict: the CLI's own function on the folder (decode, preprocess, batches of 64), model loaded;
- served: `mlflow models serve` over loopback, one image per request and 32 per request, for the
  single model and for the 5-model ensemble.
The target is a served p50 under 30 ms for one image.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from benchmarks.common import free_port, machine, synthetic_set
from smids_ml import tracking
from smids_ml.adapt import MAX_SIDE
from smids_ml.config import TrainConfig
from smids_ml.data import Dataset, scan
from smids_ml.models import build_for
from smids_ml.predict import predict_inputs
from smids_ml.serving import load_classifier

IMAGES = 500
IMAGE_SIZE = MAX_SIDE  # the defaults' input on SMIDS-sized crops
DEFAULT = TrainConfig(image_size=IMAGE_SIZE, channels=3)
ENSEMBLE = 5
SINGLE_REQUESTS = 100
BATCH = 32
BATCH_REQUESTS = 16
TARGET_P50_MS = 30.0


def log_untrained_model(data: Path, store: Path, members: int = 1) -> str:
    """The pyfunc exactly as training (or cv, for an ensemble) logs it, with fresh weights; its model URI."""
    cfg = DEFAULT.replace(data=str(data))
    class_root, frame = scan(data)
    dataset = Dataset(class_root, frame, sorted(set(frame["label"])))
    networks = [build_for(cfg, len(dataset.classes)) for _ in range(members)]
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")  # artifacts too, never ./mlruns
    if not mlflow.get_experiment_by_name("bench-predict"):
        mlflow.create_experiment("bench-predict", str(store / "artifacts"))
    mlflow.set_experiment("bench-predict")
    with mlflow.start_run():
        return tracking.log_model([(network, cfg) for network in networks], dataset).model_uri


def baseline(network: torch.nn.Module, files: list[Path]) -> list[float]:
    """Seconds per image the original study's way: PIL + torchvision transforms, batch 1."""
    prepare = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor(),
                                  transforms.Normalize([0.5] * 3, [0.5] * 3)])
    times = []
    with torch.no_grad():
        for file in files:
            start = time.perf_counter()
            torch.softmax(network(prepare(Image.open(file).convert("RGB")).unsqueeze(0)), 1)
            times.append(time.perf_counter() - start)
    return times


def serve_rows(model_uri: str, store: Path, encoded: list[str], label: str) -> tuple[list[str], list[float]]:
    """Served rows (1 image and BATCH images per request) for one model; also the single-image times."""
    process, port = start_server(model_uri, store)
    try:
        single = served(port, encoded[:1], SINGLE_REQUESTS)
        batched = served(port, encoded, BATCH_REQUESTS)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return [row(f"served{label}: 1 image per request ({SINGLE_REQUESTS} requests)", 1, single),
            row(f"served{label}: {BATCH} images per request ({BATCH_REQUESTS} requests)", BATCH, batched)], single


def start_server(model_uri: str, store: Path) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` on a free loopback port, once /ping answers."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # it execs uvicorn
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(store / "serve.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {process.returncode}; see {store / 'serve.log'}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError("mlflow models serve did not answer /ping within 120 s")


def served(port: int, images: list[str], requests: int) -> list[float]:
    """Seconds per request for `requests` POSTs of `images` on one keep-alive loopback connection."""
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(requests + 3):  # the first few warm up the server
        start = time.perf_counter()
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        times.append(time.perf_counter() - start)
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {answer[:300]!r}")
    connection.close()
    return times[3:]


def row(name: str, images_per_call: int, seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    rate = images_per_call * len(seconds) / sum(seconds)
    return f"{name:<66} {rate:>9.1f} {np.percentile(ms, 50):>9.2f} {np.percentile(ms, 95):>9.2f}"


def main() -> None:
    print(f"bench_predict: {DEFAULT.model} at {IMAGE_SIZE} px (untrained), alone and as a {ENSEMBLE}-model "
          f"ensemble, {IMAGES} synthetic crops; {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        data = synthetic_set(IMAGES)
        files = sorted(data.rglob("*.bmp"))
        model_uri = log_untrained_model(data, tmp)
        model = load_classifier(model_uri)
        lines = [row("baseline: PIL + torchvision transforms, batch 1", 1, baseline(model.networks[0], files))]

        predict_inputs(model, [str(files[0])])  # warm-up
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            predict_inputs(model, [str(data)], batch=64)
            runs.append(time.perf_counter() - start)
        lines.append(row(f"predict: folder of {IMAGES}, batch 64 (ms per whole run)", IMAGES, runs))

        encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files[:BATCH]]
        served_lines, single = serve_rows(model_uri, tmp, encoded, "")
        lines += served_lines
        ensemble_uri = log_untrained_model(data, tmp, ENSEMBLE)
        lines += serve_rows(ensemble_uri, tmp, encoded, f", {ENSEMBLE}-model ensemble")[0]

    print(f"{'':<66} {'images/s':>9} {'p50 ms':>9} {'p95 ms':>9}")
    print("\n".join(lines))
    p50 = float(np.percentile(single, 50)) * 1000
    print(f"target: served p50 for one image under {TARGET_P50_MS:.0f} ms: {p50:.2f} ms, "
          f"{'met' if p50 < TARGET_P50_MS else 'MISSED'}")


if __name__ == "__main__":
    main()
