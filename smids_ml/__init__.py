"""smids-ml: sperm morphology image classification, tracked with MLflow and tuned with Optuna."""

import os
import sys

import click

__version__ = "0.1.0"


class SmidsError(click.ClickException):
    """An error the user can fix (bad input, bad flag, changed data).

    A ClickException, so every command shows it as one `Error: ...` line and exits 1, never a traceback.
    """


if not sys.stderr.isatty():  # progress bars only on a terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
