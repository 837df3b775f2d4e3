"""Shared fixtures: a tiny synthetic SMIDS set, one real `mlflow server` per session, one trained model.

Everything is small (a dozen images a class, 32 px) so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Every process of the suite caches tensors and keeps MLflow state in temporary places, never in ~ or the repo.
_SESSION_TMP = Path(os.environ.setdefault("SMIDS_TEST_TMP", f"/tmp/smids-tests-{os.getpid()}"))
os.environ.setdefault("SMIDS_ML_CACHE", str(_SESSION_TMP / "cache"))
# a test that forgets the `tracking` fixture must not write mlflow.db into the repository
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_TMP}/default-mlflow.db"
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # mlflow run/serve exec python and uvicorn from PATH
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# with a validation split (train's default has none): most tests look at what validation records
TINY = dict(image_size=32, epochs=2, patience=0, batch=16, lr=1e-3, model="improved_cnn", num_threads=1, valid_frac=0.15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    _SESSION_TMP.mkdir(parents=True, exist_ok=True)
    return _SESSION_TMP


@pytest.fixture(scope="session")
def synth_data(session_tmp) -> Path:
    """12 synthetic images per class in the SMIDS layout (read-only for tests: copy before changing)."""
    from smids_ml.synth import generate

    root = session_tmp / "synth"
    if not root.exists():
        generate(root, per_class=12, seed=1)
    return root


@pytest.fixture(scope="session")
def synth_table(synth_data, session_tmp) -> Path:
    """The synthetic crops as a data set labelled by a table (read-only): `images/crop_NN.bmp` and `labels.csv`
    with two label columns, `shape` (normal, abnormal; empty for the non-sperm crops) and `debris` (yes, no),
    and the data set's own `split` (train, valid: as MHSMA's)."""
    import shutil

    root = session_tmp / "synth-table"
    if not root.exists():
        (root / "images").mkdir(parents=True)
        rows = []
        for i, file in enumerate(sorted(synth_data.rglob("*.bmp"))):
            path = f"images/crop_{i:02d}.bmp"
            shutil.copy(file, root / path)
            kind = file.parent.name
            rows.append(f"{path},{'valid' if i % 4 == 0 else 'train'},"
                        f"{'' if kind == 'Non-Sperm' else kind.split('_')[0].lower()},{'yes' if kind == 'Non-Sperm' else 'no'}")
        (root / "labels.csv").write_text("path,split,shape,debris\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def mlflow_server(session_tmp):
    """A real `mlflow server` on loopback with a SQLite backend and proxied artifacts."""
    port = free_port()
    home = session_tmp / "server"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
        cwd=home, env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process)
        yield url
    finally:
        stop(process)


@pytest.fixture
def tracking(mlflow_server, monkeypatch, request):
    """Point MLflow (in this process and in subprocesses) at the session server, in a fresh experiment."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it; subprocesses must not inherit it
    mlflow.set_tracking_uri(mlflow_server)
    experiment = f"{request.node.name}-{time.time_ns()}"
    yield experiment
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def trained_model(mlflow_server, synth_data, session_tmp):
    """One model trained 2 epochs on the tiny set and registered as `tiny@champion`, for predict/serve/evaluate."""
    import mlflow

    from smids_ml.config import TrainConfig
    from smids_ml.train import train

    mlflow.set_tracking_uri(mlflow_server)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    cfg = TrainConfig(data=str(synth_data), **TINY).validate()
    result = train(cfg, experiment="fixture-trained-model", register_as="tiny", alias="champion")
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return {"result": result, "config": result.cfg, "name": "tiny", "version": result.version,
            "uri": f"models:/tiny/{result.version}", "tracking_uri": mlflow_server}


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    import psycopg

    name = f"smids_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
