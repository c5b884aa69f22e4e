"""The CLI: help, schema, validate errors; bad input exits 1 with a clear message and trains nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, write_csv

TUNELINE = [sys.executable, "-c", "from tuneline.cli import main; main()"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELINE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for cmd in ("run", "validate", "schema", "runs", "pull"):
        assert cmd in out.stdout


def test_schema_is_json():
    out = _cli("schema")
    assert out.returncode == 0
    assert json.loads(out.stdout)["title"] == "tuneline.yaml"


def test_validate_example_spec():
    out = _cli("validate", str(REPO / "examples" / "banking77" / "tuneline.yaml"))
    assert out.returncode == 0, out.stderr
    assert "77 labels" in out.stdout


def test_validate_reports_typo_and_trains_nothing(tmp_path: Path):
    spec = tmp_path / "tuneline.yaml"
    spec.write_text("name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
                    "data: {train: {path: d.csv}}\ntrian: {lr: 0.1}\n")
    out = _cli("run", str(spec), "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 1
    assert f"{spec}:6: trian: unknown field" in " ".join(out.stderr.split())
    assert "did you mean 'train'" in out.stderr
    assert not (tmp_path / "ws" / "runs").exists() or not any((tmp_path / "ws" / "runs").iterdir())


def test_validate_reports_empty_label_cells(tmp_path: Path):
    write_csv(tmp_path / "d.csv", [{"text": "a", "category": "x"}, {"text": "b", "category": ""}])
    spec = tmp_path / "tuneline.yaml"
    spec.write_text("name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
                    "data: {train: {path: d.csv, columns: {label: category}}}\n")
    out = _cli("validate", str(spec))
    assert out.returncode == 1
    assert "d.csv:3: category: empty 'category'" in " ".join(out.stderr.split())


def test_runs_on_empty_workspace(tmp_path: Path):
    out = _cli("runs", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 0, out.stderr
    assert "no runs yet" in out.stdout


def test_pull_finds_the_builtin_model_already_converted_in_the_workspace(tmp_path: Path, builtin_dir: Path):
    import shutil

    ws = tmp_path / "ws"
    # the session's converted copy (conversion itself is tested in test_builtin_model)
    shutil.copytree(builtin_dir, ws / "models" / builtin_dir.name)
    out = _cli("pull", "--workspace", str(ws))
    assert out.returncode == 0, out.stderr
    assert "ready" in out.stdout and "SmolLM2-135M" in out.stdout
    assert "converting" not in out.stderr  # already there: not converted again
    out = _cli("pull", "no/such-model-anywhere", "--workspace", str(ws))
    assert out.returncode == 0 and "nothing to convert" in out.stdout
