"""Runs left RUNNING by a process that died (kill -9, power loss): list them, mark them FAILED.

    smids-ml runs                # RUNNING runs of every experiment, and whether their process lives
    smids-ml runs --fix-stale    # end those whose process is gone as FAILED

Every run records the host and process id that own it (`smids_ml.host`, `smids_ml.pid`). A run
owned by another machine cannot be checked from here and is left alone (run this there).
"""

from __future__ import annotations

import click
import mlflow
import pandas as pd
from mlflow import MlflowClient

from smids_ml.console import Command
from smids_ml.tracking import HOST_TAG, PID_TAG, process_is_gone


def running_runs() -> pd.DataFrame:
    """run id, experiment, name, host, pid and whether its process is gone, for every RUNNING run."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                              output_format="list")
    return pd.DataFrame([{"run_id": r.info.run_id, "experiment_id": r.info.experiment_id,
                          "run_name": r.info.run_name, "host": r.data.tags.get(HOST_TAG, ""),
                          "pid": r.data.tags.get(PID_TAG, ""),
                          "stale": process_is_gone(r.data.tags.get(HOST_TAG), r.data.tags.get(PID_TAG))}
                         for r in runs], columns=["run_id", "experiment_id", "run_name", "host", "pid", "stale"])


def fail_run(run_id: str) -> None:
    client = MlflowClient()
    client.set_tag(run_id, "smids_ml.ended_by", "fix-stale: its process was gone")
    client.set_terminated(run_id, "FAILED")


@click.command("runs", cls=Command)
@click.option("--fix-stale", is_flag=True, help="Mark RUNNING runs whose process (on this machine) is gone as FAILED.")
def main(fix_stale: bool) -> None:
    """List RUNNING runs and whether their process is alive; --fix-stale ends the dead ones as FAILED."""
    table = running_runs()
    if table.empty:
        click.echo("no RUNNING runs")
        return
    click.echo(table.to_string(index=False))
    stale = table[table["stale"]]
    if fix_stale:
        for run_id in stale["run_id"]:
            fail_run(run_id)
        click.echo(f"marked {len(stale)} stale run(s) FAILED")
    elif not stale.empty:
        click.echo(f"{len(stale)} run(s) have no living process: `smids-ml runs --fix-stale` marks them FAILED")


if __name__ == "__main__":
    main()
