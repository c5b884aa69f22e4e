"""The exit codes of every ``tuneline`` command, named once (docs/cli.md lists them)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # a problem tuneline reports: a spec or data error, a missing run, a failed search
EXIT_USAGE = 2  # Click's own: an unknown option, a missing argument (tuneline never exits 2 itself)
EXIT_GATES_FAILED = 3  # the command worked and the objective's gates failed (run, eval run)
EXIT_ALERT_FIRED = 4  # `monitor check`: the check worked and a detector fired (an alert was raised)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the resume hint is printed

__all__ = ["EXIT_ALERT_FIRED", "EXIT_ERROR", "EXIT_GATES_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]
