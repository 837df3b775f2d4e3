"""The three notebooks run top to bottom, in order, on the tiny synthetic set against the session's `mlflow server`.

They are executed with nbclient in a `python3` kernel that runs this interpreter: a kernelspec for
`sys.executable` is installed into a temporary folder put first on JUPYTER_PATH, so a `python3` kernel
installed elsewhere (user or system) can never be picked up instead.
"""

from __future__ import annotations

import sys
import time

import mlflow
import nbformat
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
ORDER = ("01_data_exploration", "02_model_training", "03_model_evaluation")
MODEL = "notebook-model"


def images(nb) -> int:
    """How many figures (PNG outputs) the executed notebook shows."""
    return sum("image/png" in output.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for output in cell.outputs)


def text(nb) -> str:
    """Everything the executed notebook printed or displayed as text or HTML."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts += [output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/html")]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(synth_data, mlflow_server, session_tmp):
    """Execute 01, 02 and 03 in order (working directory notebooks/) and return them with their experiment.

    Executed copies are written beside the kernelspec, under the session's temporary folder.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    experiment = f"notebooks-{time.time_ns()}"
    home = session_tmp / f"notebooks-{time.time_ns()}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(home / "share" / "jupyter"))
        install(kernel_name="python3", prefix=str(home))
        assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
        env.setenv("SMIDS_DATA", str(synth_data))
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("SMIDS_EXPERIMENT", experiment)
        env.setenv("SMIDS_EPOCHS", "2")
        env.setenv("SMIDS_IMAGE_SIZE", "32")
        env.setenv("SMIDS_OPTUNA_STORAGE", str(home / "optuna.journal"))
        env.delenv("SMIDS_MODEL_URI", raising=False)
        env.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        env.delenv("MLFLOW_RUN_ID", raising=False)
        notebooks = {}
        for name in ORDER:
            nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            NotebookClient(nb, kernel_name="python3", timeout=300,
                           resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            nbformat.write(nb, home / f"{name}.ipynb")  # the executed copy, to look at when a test fails
            notebooks[name] = nb
    mlflow.set_tracking_uri(mlflow_server)
    return {"experiment": experiment, **notebooks}


def runs(experiment: str, run_name: str):
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"attributes.run_name = '{run_name}'")


def test_committed_notebooks_carry_no_outputs():
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"


def test_exploration_shows_the_report_and_logs_it(executed):
    nb = executed["01_data_exploration"]
    assert images(nb) == 4  # class bar chart, top resolutions, resolution scatter, sample grid
    assert "36 image files, 36 usable" in text(nb)
    assert "unique resolutions" in text(nb)
    explore = runs(executed["experiment"], "explore")
    assert len(explore) == 1 and explore.iloc[0]["metrics.images"] == 36


def test_training_registers_the_champion_and_runs_a_study(executed):
    nb = executed["02_model_training"]
    assert images(nb) >= 3  # training curves and two Optuna figures
    training = runs(executed["experiment"], "notebook-training")
    assert len(training) == 1
    run = training.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.epochs"] == "2" and run["params.image_size"] == "32"
    version = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == run["run_id"]
    parents = mlflow.search_runs(experiment_names=[executed["experiment"]],
                                 filter_string="attributes.run_name LIKE 'study-notebook-grid-%'")
    assert len(parents) == 1
    trials = mlflow.search_runs(experiment_names=[executed["experiment"]],
                                filter_string=f"tags.mlflow.parentRunId = '{parents.iloc[0]['run_id']}'")
    assert len(trials) == 4 and set(trials["tags.optuna.state"]) == {"COMPLETE"}
    assert "mlflow ui" in text(nb) or "open http" in text(nb)


def test_evaluation_logs_a_run_for_the_champion_and_predicts(executed):
    nb = executed["03_model_evaluation"]
    assert images(nb) >= 6  # two confusion matrices, ROC, reliability, gallery, predictions grid
    version = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    evaluations = mlflow.search_runs(experiment_names=[executed["experiment"]],
                                     filter_string=f"tags.evaluated_model = 'models:/{MODEL}/{version.version}'")
    assert len(evaluations) == 1
    evaluation = evaluations.iloc[0]
    assert evaluation["tags.evaluated_split"] == "test" and 0 <= evaluation["metrics.test_accuracy"] <= 1
    assert version.tags["test_evaluation_run_id"] == evaluation["run_id"]
    assert "test_f1_macro" in text(nb)
    assert text(nb).count("Normal_Sperm/Normal_Sperm (") >= 2  # the predicted files are listed
