"""Terminal helpers shared by the commands."""

from __future__ import annotations

import functools
import io
import signal
import sys
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


def _interrupt(signum, frame):
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def stop_if_signalled() -> None:
    """Raise KeyboardInterrupt again if Ctrl-C or SIGTERM came earlier: Python only prints an interrupt that
    lands in a finaliser or callback and carries on, so long loops (epochs, figures) call this to stop promptly."""
    if _signalled:
        raise KeyboardInterrupt


def stops_cleanly(what: str):
    """Decorate a command so Ctrl-C and SIGTERM (kill, a scheduler stopping a job) end it the same way:
    the open MLflow runs end FAILED (their context managers see the exception), then one line and exit 1.
    `what` says what was left behind, after "interrupted: "."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                raise SmidsError(f"interrupted: {what}") from None
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return wrapper
    return decorate
