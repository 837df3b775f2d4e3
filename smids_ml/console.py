"""Terminal helpers shared by the commands."""

from __future__ import annotations

import functools
import io
import logging
import signal
import sys
import time
from contextlib import contextmanager
from typing import Iterable, TypeVar

import click

from smids_ml import SmidsError

T = TypeVar("T")


def progress(items: Iterable[T] | None, label: str, length: int | None = None):
    """A click progress bar on stderr that stays silent when stderr is not a terminal (CI, logs, pipes).

    Long work that must never be silent in a log (training epochs) uses `steps` instead.
    """
    stream = sys.stderr if sys.stderr.isatty() else io.StringIO()
    return click.progressbar(items, label=label, length=length, file=stream)


class _Lines:
    """`steps`' stand-in for a bar off a terminal: one plain line per update."""

    def __init__(self, label: str):
        self.label = label

    def update(self, n: int = 1) -> None:
        click.echo(self.label, err=True)


@contextmanager
def steps(label: str, length: int):
    """Progress over `length` steps: a bar on a terminal; elsewhere one plain line per step, so a
    long run redirected to a file, CI or nohup still shows each epoch. Set `.label`, then `.update(1)`."""
    if sys.stderr.isatty():
        with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
            yield bar
    else:
        yield _Lines(label)


def usage_error(exc: click.UsageError, ctx: click.Context) -> click.ClickException:
    """A usage error (unknown choice, bad type, out-of-range number, missing argument, unknown command) as every
    other refusal is: one `Error: ...` line and exit 1, not click's usage block and exit 2."""
    return SmidsError(f"{' '.join(exc.format_message().split()).rstrip('.')} (see '{ctx.command_path} --help')")


class OneLineUsage:
    """Mixed into a click command or group: its usage errors are one line (`usage_error`)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise usage_error(exc, ctx) from None


class Command(OneLineUsage, click.Command):
    """The commands' class (`@click.command(cls=Command)`)."""


_signalled = False
_interrupted_runs: list[str] = []  # the innermost active MLflow run when the signal came, and its parent
STORE_LOGGER = "mlflow.store"
FINAL_WRITE_SECONDS = 30  # how long an interrupted command retries marking its runs FAILED (a scheduler's grace)


def _interrupt(signum, frame):
    """Note the open runs from MLflow's memory (no store access: it may be locked), then interrupt. From here on a
    failed store write is `fail_interrupted_runs`' to retry and the final line's to report: MLflow's store would log
    each one with its traceback (`database is locked` while another process writes the SQLite file)."""
    global _signalled, _interrupted_runs
    _signalled = True
    logging.getLogger(STORE_LOGGER).setLevel(logging.CRITICAL)
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow else None
    if run is not None:
        _interrupted_runs = [run.info.run_id, *filter(None, [run.data.tags.get("mlflow.parentRunId")])]
    raise KeyboardInterrupt


def _retrying(action, deadline: float):
    """`action()`, again every half second while the store refuses it (SQLite's `database is locked` when another
    process writes the same file), until `deadline` (time.monotonic()); its last error then."""
    while True:
        try:
            return action()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def fail_interrupted_runs() -> list[str]:
    """Mark FAILED the runs that were open when the signal came (and their ancestors) that are still RUNNING: MLflow's
    own end of a run writes once, and an interrupt while another process writes the same SQLite store lost that
    write and left the run RUNNING. Returns the runs it could not mark within FINAL_WRITE_SECONDS."""
    if not _interrupted_runs:
        return []
    from mlflow import MlflowClient

    client, deadline = MlflowClient(), time.monotonic() + FINAL_WRITE_SECONDS
    pending, seen, left = list(_interrupted_runs), set(), []
    while pending:
        run_id = pending.pop(0)
        if run_id in seen:
            continue
        seen.add(run_id)
        try:
            run = _retrying(lambda: client.get_run(run_id), deadline)
            if run.info.status == "RUNNING":
                _retrying(lambda: client.set_terminated(run_id, "FAILED"), deadline)
        except Exception:
            left.append(run_id)
            continue
        pending.extend(filter(None, [run.data.tags.get("mlflow.parentRunId")]))
    return left


def stop_if_signalled() -> None:
    """Raise KeyboardInterrupt again if Ctrl-C or SIGTERM came earlier: Python only prints an interrupt that
    lands in a finaliser or callback and carries on, so long loops (epochs, figures) call this to stop promptly."""
    if _signalled:
        raise KeyboardInterrupt


def stops_cleanly(what: str):
    """Decorate a command so Ctrl-C and SIGTERM (kill, a scheduler stopping a job) end it the same way:
    the open MLflow runs end FAILED (their context managers see the exception, and `fail_interrupted_runs` retries
    what a locked store refused), then one line and exit 1, whatever error the interrupt became on its way out (a
    `database is locked` from the store included). `what` says what was left behind, after "interrupted: "."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            global _signalled, _interrupted_runs
            _signalled, _interrupted_runs = False, []
            previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
            store_level = logging.getLogger(STORE_LOGGER).level
            try:
                return command(*args, **kwargs)
            except BaseException as exc:
                if not (_signalled or isinstance(exc, KeyboardInterrupt)):
                    raise
                try:
                    left = fail_interrupted_runs()
                except KeyboardInterrupt:  # a second Ctrl-C: stop retrying
                    left = _interrupted_runs
                if left:
                    raise SmidsError(f"interrupted: the tracking store refused to mark run(s) {', '.join(left)} "
                                     "FAILED; `smids-ml runs --fix-stale` marks them") from None
                raise SmidsError(f"interrupted: {what}") from None
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                logging.getLogger(STORE_LOGGER).setLevel(store_level)
        return wrapper
    return decorate
