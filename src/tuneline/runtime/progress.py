"""What a terminal, a log file or CI gets: consoles and progress bars that stay readable either way.

On a terminal a progress bar is drawn live, as Rich draws it. On anything else (``> log``, a pipe,
CI) nothing is printed per update, and a task that ran at least :data:`LONG_TASK_SECONDS` gets one
line when it finishes; Rich alone would print each bar's last state once per bar, so a bar made per
request or per batch becomes a line per request in a log.

A console whose stream is not a terminal is :data:`WIDE_COLUMNS` wide (unless ``COLUMNS`` says
otherwise): Rich's default of 80 columns squeezes tables until every cell wraps.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

WIDE_COLUMNS = 200
LONG_TASK_SECONDS = 10.0

__all__ = ["LONG_TASK_SECONDS", "WIDE_COLUMNS", "QuietWhenPiped", "make_console", "progress_bar"]


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console on stdout (or stderr, or ``file``), :data:`WIDE_COLUMNS` wide when that stream is not
    a terminal and ``COLUMNS`` is not set, so a table in a log keeps one row per line."""
    console = Console(stderr=stderr, file=file)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = WIDE_COLUMNS
    return console


class QuietWhenPiped(Progress):
    """A Rich progress display that is live only on a terminal. Elsewhere it prints nothing while it
    runs and, when it stops, one line per task that finished after :data:`LONG_TASK_SECONDS` or more
    (``description: completed/total in Ns``)."""

    def __init__(self, *columns: str | ProgressColumn, console: Console, enabled: bool = True) -> None:
        self.live_display = enabled and console.is_terminal and not console.is_dumb_terminal
        self.summarize = enabled and not self.live_display
        # writes to stdout go above the bar only when stdout is the same terminal: a redirected
        # stdout keeps its own lines, also while a bar is drawn on stderr
        super().__init__(*columns, console=console, disable=not self.live_display,
                         redirect_stdout=console.file is sys.stdout or sys.stdout.isatty())

    def stop(self) -> None:
        super().stop()
        if not self.summarize:
            return
        self.summarize = False  # once, also when stop() is called again
        for task in self.tasks:
            if task.finished and (task.finished_time or 0.0) >= LONG_TASK_SECONDS:
                total = f"/{task.total:,.0f}" if task.total is not None else ""
                self.console.print(f"{task.description}: {task.completed:,.0f}{total} in {task.finished_time:.0f}s",
                                   highlight=False, markup=False)


def progress_bar(*columns: str | ProgressColumn, enabled: bool = True, console: Console | None = None) -> QuietWhenPiped:
    """The one way tuneline shows progress: ``columns`` (default: description, bar, done/total,
    elapsed) on ``console`` (default: stderr, so stdout keeps results), live on a terminal, quiet
    elsewhere (see :class:`QuietWhenPiped`). ``enabled=False`` shows nothing at all."""
    if not columns:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return QuietWhenPiped(*columns, console=console or make_console(stderr=True), enabled=enabled)
