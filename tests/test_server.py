"""`smids-ml server`: a real tracking server with proxied artifacts; an unreachable backend is one line."""

from __future__ import annotations

import os
import subprocess

import mlflow

from tests.conftest import BIN, free_port, stop, wait_for_http
from tests.helpers import assert_one_line_error, invoke


def test_server_tracks_runs_and_proxies_artifacts(tmp_path, monkeypatch):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen([str(BIN / "smids-ml"), "server", "--port", str(port), "--backend-store-uri",
                                f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", "artifacts"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    previous = mlflow.get_tracking_uri()
    try:
        wait_for_http(f"{url}/health", process)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("served")
        (tmp_path / "note.txt").write_text("hello")
        with mlflow.start_run() as run:
            mlflow.log_metric("x", 1.0)
            mlflow.log_artifact(str(tmp_path / "note.txt"))
        assert mlflow.get_run(run.info.run_id).data.metrics["x"] == 1.0
        assert list((tmp_path / "artifacts").rglob("note.txt"))  # stored by the server, sent over HTTP
        assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    finally:
        monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mlflow.set_tracking_uri(previous)
        stop(process)


def test_an_unreachable_postgres_backend_is_one_line():
    url = "postgresql://postgres@127.0.0.1:1/nothing"
    assert_one_line_error(invoke(["server", "--backend-store-uri", url]), f"cannot reach the backend store {url}")
