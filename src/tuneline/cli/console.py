"""Where the CLI writes: results on stdout, messages and logging on stderr, JSON alone on stdout.

Both consoles come from :func:`tuneline.runtime.progress.make_console`: wide when the stream is a
file or a pipe, so tables stay one row per line in a log.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from tuneline.runtime.progress import make_console

console = make_console()
err_console = make_console(stderr=True)

NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "httpx", "transformers", "peft")

__all__ = ["console", "err_console", "escape", "human_output", "print_json", "setup_logging"]


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr (debug with ``verbose``), without the chatter of the libraries below:
    Rich's layout on a terminal; in a log file one plain line per message (Rich would pad every line
    to the console's width and wrap long ones)."""
    # deprecation chatter from transformers/peft internals says nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def human_output(as_json: bool) -> Iterator[Console]:
    """The console for what a command tells a person: stdout, or with ``--json`` stderr. With
    ``--json`` anything else written to stdout meanwhile (a library's print) goes to stderr too,
    so that stdout holds the JSON alone (:func:`print_json`, after this block)."""
    if not as_json:
        yield console
        return
    with redirect_stdout(sys.stderr):
        yield err_console


def print_json(data: object) -> None:
    """``data`` as indented JSON on stdout (paths and other objects as strings)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
