"""Terminal helpers shared by the commands."""

from __future__ import annotations

import io
import sys
from typing import Iterable, TypeVar

import click

T = TypeVar("T")


def progress(items: Iterable[T] | None, label: str, length: int | None = None):
    """A click progress bar on stderr that stays silent when stderr is not a terminal (CI, logs, pipes)."""
    stream = sys.stderr if sys.stderr.isatty() else io.StringIO()
    return click.progressbar(items, label=label, length=length, file=stream)
