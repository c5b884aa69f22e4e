"""The shipped cron and systemd examples: valid files whose every `tuneline` call names a command
and options the CLI has."""

from __future__ import annotations

import configparser
import importlib.util
import shlex

import typer
from helpers import REPO
from typer._click import Context  # the Click typer vendors

from tuneline.cli import app

CRON = REPO / "deploy" / "cron" / "tuneline-retrain.cron"
SYSTEMD = REPO / "deploy" / "systemd"


def _calls(command_line: str) -> list[list[str]]:
    """The argument lists of every `tuneline` call in a shell command line."""
    words = shlex.split(command_line.replace("&&", " && ").replace(">>", " >> "))
    calls, current = [], None
    for w in words:
        if w in ("&&", "||", ";", ">>", ">", "2>&1"):
            current = None
        elif w == "tuneline" or w.endswith("/bin/tuneline"):  # the program, not a folder named so
            current = []
            calls.append(current)
        elif current is not None:
            current.append(w)
    return calls


def _check_call(args: list[str]) -> None:
    """``args`` name a command of the CLI and only options it has (positional arguments aside)."""
    if args[0] == "monitor" and importlib.util.find_spec("tuneline.cli.monitor") is None:
        return  # `tuneline monitor` arrives with its own branch; checked once it is there
    cmd = typer.main.get_command(app)
    rest = list(args)
    while hasattr(cmd, "list_commands") and rest:  # a group: the next word names its command
        sub = cmd.get_command(Context(cmd), rest[0])
        assert sub is not None, f"`tuneline {' '.join(args)}`: no command {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    assert not hasattr(cmd, "list_commands"), f"`tuneline {' '.join(args)}` names a group, not a command"
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=")[0] in known, f"`tuneline {' '.join(args)}`: no option {word}"


def test_cron_lines_have_five_time_fields_and_call_tuneline_commands() -> None:
    jobs = [line for line in CRON.read_text().splitlines()
            if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(jobs) == 3  # the nightly check, the weekly retrain, the daily prune
    assert any("monitor prune" in job for job in jobs)
    for job in jobs:
        fields = job.split(None, 5)
        for f in fields[:5]:  # minute hour day-of-month month day-of-week
            assert all(c.isdigit() or c in "*/,-" for c in f), f"not a time field: {f!r} in {job!r}"
        calls = _calls(fields[5])
        assert calls, job
        for args in calls:
            _check_call(args)


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and their keys, every value of a key repeated (ExecStart=) kept."""
    path = SYSTEMD / name
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text())  # it parses as INI at all
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
        else:
            assert section is not None and "=" in line, line
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    assert set(out) == set(parser.sections())
    return out


def test_systemd_service_and_timer() -> None:
    service = _unit("tuneline-retrain.service")
    assert set(service) == {"Unit", "Service"}
    assert service["Service"]["Type"] == ["oneshot"]
    for exec_start in service["Service"]["ExecStart"]:
        calls = _calls(exec_start)
        assert len(calls) == 1
        _check_call(calls[0])
    assert [c[0] for c in (_calls(e)[0] for e in service["Service"]["ExecStart"])] == ["feedback", "retrain"]

    timer = _unit("tuneline-retrain.timer")
    assert set(timer) == {"Unit", "Timer", "Install"}
    assert timer["Timer"]["Unit"] == ["tuneline-retrain.service"] and timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
