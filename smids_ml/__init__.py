"""smids-ml: sperm morphology image classification, tracked with MLflow and tuned with Optuna."""

import os
import signal
import sys

import click

__version__ = "0.1.0"


class SmidsError(click.ClickException):
    """An error the user can fix (bad input, bad flag, changed data).

    A ClickException, so every command shows it as one `Error: ...` line and exits 1, never a traceback.
    """


def _one_line_interrupt(kind, value, traceback, _default=sys.excepthook):
    """Ctrl-C before a command has started (while torch and MLflow import, which takes seconds) ends in one
    line instead of a traceback through importlib; once running, `console.stops_cleanly` handles it."""
    if issubclass(kind, KeyboardInterrupt):
        print("Aborted: interrupted before the command started; nothing was recorded", file=sys.stderr)
    else:
        _default(kind, value, traceback)


def _interrupt_at_startup(signum, frame):
    raise KeyboardInterrupt


sys.excepthook = _one_line_interrupt
# SIGTERM while the libraries load says so too, instead of a silent exit 143; only in a command's own process
# (`python -m smids_ml.X` or `smids-ml`), never in one that imports the package (a model server, the tests)
if os.path.basename(sys.argv[0]) in ("-m", "smids-ml") and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _interrupt_at_startup)

if not sys.stderr.isatty():  # progress bars only on a terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
