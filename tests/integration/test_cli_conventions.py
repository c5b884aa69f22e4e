"""CLI conventions: --version, `python -m tuneline`, exit codes (0 ok, 1 error, 2 usage, 3 gates
failed, 130 interrupted), --json leaves stdout to the JSON alone, --help loads no heavy library.

The pipeline commands run over tests/fake_pipeline.py: the real CLI, a stand-in pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

import tuneline
from tuneline.cli.exits import EXIT_ERROR, EXIT_GATES_FAILED, EXIT_INTERRUPTED, EXIT_USAGE

FAKE = [sys.executable, str(REPO / "tests" / "fake_pipeline.py")]
SRC = str(Path(tuneline.__file__).resolve().parents[1])  # the code under test, also in the subprocesses
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
HEAVY = ("torch", "transformers", "peft", "mlflow", "optuna", "pandas", "pyarrow", "sklearn", "sentence_transformers",
         "fastapi", "uvicorn", "ray", "sacrebleu", "matplotlib")


def _fake(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FAKE, *args], capture_output=True, text=True, timeout=120, env={**ENV, **env})


def test_exit_codes_are_distinct() -> None:
    assert len({0, EXIT_ERROR, EXIT_USAGE, EXIT_GATES_FAILED, EXIT_INTERRUPTED}) == 5
    assert (EXIT_ERROR, EXIT_USAGE, EXIT_GATES_FAILED, EXIT_INTERRUPTED) == (1, 2, 3, 130)


def test_help_loads_no_heavy_library() -> None:
    code = ("import sys\nfrom tuneline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    loaded = set(out.stderr.split())
    assert "run" in out.stdout and "tuneline" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_version_and_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "tuneline", "--version"], capture_output=True, text=True, timeout=60,
                         env=ENV)
    assert out.returncode == 0 and out.stdout.strip() == f"tuneline {tuneline.__version__}"
    out = subprocess.run([sys.executable, "-m", "tuneline", "schema"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0 and json.loads(out.stdout)["title"] == "tuneline.yaml"


def test_usage_error_is_2_and_not_a_gate_failure() -> None:
    out = _fake("run")  # no SPEC
    assert out.returncode == EXIT_USAGE and "Missing argument" in out.stderr


def test_failed_gates_exit_3_and_passing_ones_0() -> None:
    assert _fake("run", "x.yaml", FAKE_GATES="fail").returncode == EXIT_GATES_FAILED
    passed = _fake("run", "x.yaml", FAKE_GATES="pass")
    assert passed.returncode == 0 and "a table a person reads" in passed.stdout  # without --json: on stdout


def test_run_json_is_alone_on_stdout() -> None:
    out = _fake("run", "x.yaml", "--json", FAKE_GATES="fail")
    assert out.returncode == EXIT_GATES_FAILED
    result = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert set(result) == {"run_id", "run_dir", "train", "report", "seconds", "model_version", "passed"}
    assert result["passed"] is False and result["model_version"] == 2 and result["train"]["steps"] == 4
    assert result["report"]["gates"][0]["expr"] == "accuracy >= 0.5"
    for said in ("a table a person reads", "a library's print()", "Rich's global console", "a log line"):
        assert said in out.stderr


def test_tune_and_baseline_json() -> None:
    out = _fake("tune", "x.yaml", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["best"]["params"] == {"lr": 0.001}
    assert "next: `tuneline run" not in out.stdout
    out = _fake("tune", "x.yaml", "--json", FAKE_BEST="0")
    assert out.returncode == EXIT_ERROR and json.loads(out.stdout)["best"] is None
    assert "no trial completed" in out.stderr
    out = _fake("baseline", "x.yaml", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["recommended"] == "prompt"
    assert "scores" not in report["options"][0]  # per-row data left out, as in `eval --json`


@pytest.mark.parametrize(("command", "hint"), [
    ("run", "the last checkpoint is kept; continue with `tuneline run SPEC --resume`"),
    # the same handler as run's, with another hint: slow only to keep the default suite in CI's time
    pytest.param("tune", "finished trials are kept; continue with `tuneline tune SPEC --resume`",
                 marks=pytest.mark.slow),
])
def test_ctrl_c_prints_the_resume_hint_and_exits_130(command: str, hint: str) -> None:
    """Click turned Ctrl-C into "Aborted!" (exit 1) before main() could print the hint."""
    # a shell starts background jobs with SIGINT ignored and children inherit that; a terminal's
    # Ctrl-C reaches a process that has the default disposition, so the child gets it back
    proc = subprocess.Popen([*FAKE, command, "x.yaml"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FAKE_SLEEP": "60"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while proc.stdout.readline().strip() != "ready":  # the long command is under way
            assert time.monotonic() < deadline and proc.poll() is None, "the fake run never started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert hint in " ".join(err.split()) and "Aborted" not in err
