"""A tracking server in one command: `smids-ml server` runs `mlflow server` with a team's defaults.

SQLite (or a `postgresql://` URL) for runs and the registry, artifacts proxied by the server into
`--artifacts-destination` (so workers on other machines need no shared disk), bound to 127.0.0.1
unless `--host` says otherwise, one worker and no job runner (about 0.5 GB instead of about 3 GB).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from smids_ml import SmidsError
from smids_ml.console import Command


def check_backend(uri: str) -> None:
    """Fail with one line naming the URL when a PostgreSQL backend does not answer."""
    if not uri.startswith("postgresql"):
        return
    import psycopg

    conninfo = uri.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
    try:
        psycopg.connect(conninfo, connect_timeout=5).close()
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise SmidsError(f"cannot reach the backend store {uri}: {reason}") from None


@click.command("server", cls=Command)
@click.option("--backend-store-uri", default="sqlite:///mlflow-server.db", show_default=True,
              help="Runs and registry: a SQLite file or a postgresql://user@host/db URL.")
@click.option("--artifacts-destination", default="mlflow-artifacts", show_default=True,
              help="Where the server stores the artifacts it proxies (a folder, or s3://..., gs://...).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network (put it behind a proxy).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Gunicorn/uvicorn workers.")
def main(backend_store_uri, artifacts_destination, host, port, workers):
    """Start an MLflow tracking server (runs, registry, proxied artifacts) for a team of workers."""
    check_backend(backend_store_uri)
    if "://" not in artifacts_destination:
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
        artifacts_destination = str(Path(artifacts_destination).resolve())
    mlflow = str(Path(sys.executable).parent / "mlflow")
    argv = [mlflow, "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
            "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port),
            "--workers", str(workers)]
    click.echo(f"tracking server at http://{host}:{port} (backend {backend_store_uri}, artifacts "
               f"{artifacts_destination}); workers use MLFLOW_TRACKING_URI=http://{host}:{port}", err=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    os.execve(mlflow, argv, env)  # the server replaces this process: signals reach it directly


if __name__ == "__main__":
    main()
