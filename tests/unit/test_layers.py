"""The package layers: imports only go down, packages have no import cycles, and imports inside
functions are either of a heavy third-party library or say why they are lazy.

Every ``import`` in ``src/tuneline`` is parsed with :mod:`ast` (module top, ``if TYPE_CHECKING:``
blocks and function bodies alike: an annotation-only import is still a dependency). Each file
belongs to a *unit*: its package (``tuneline/eval/suite.py`` -> ``eval``) or, for a top-level
module, the module itself (``tuneline/errors.py`` -> ``errors``). ``LAYERS`` gives each unit its
layer. A unit may import units of a lower layer, and units of its own layer as long as no cycle
forms. ``tuneline/__init__.py`` (the public facade) imports only layer 0 statically; it reaches
the stages lazily by name.

A failure names the importing file and line and the forbidden edge. Adding a package means adding
it to ``LAYERS`` (and to docs/architecture.md's layer table).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "tuneline"

LAYERS: dict[str, int] = {
    "errors": 0,
    "artifacts": 0,
    "spec": 0,
    "workspace": 0,
    "data": 1,
    "models": 1,
    "runtime": 1,
    "tracking": 1,
    "audit": 1,
    "curation": 2,
    "retrieval": 2,
    "train": 2,
    "eval": 2,
    "context": 2,
    "tune": 3,
    "baseline": 3,
    "compare": 3,
    "report": 4,
    "monitor": 4,
    "registry": 4,
    "pipeline": 5,
    "export": 5,
    "serve": 5,
    "cli": 6,
    "__main__": 6,  # `python -m tuneline`: calls the CLI
}
ROOT = "tuneline"  # tuneline/__init__.py: the facade; imports layer 0 only

# Third-party libraries that may be imported inside a function without a `# lazy:` comment:
# importing them costs enough that `tuneline --help` (and `import tuneline.<module>`) would notice.
HEAVY = frozenset(
    {
        "accelerate", "datasets", "fastapi", "huggingface_hub", "matplotlib", "mlflow", "numpy",
        "optuna", "pandas", "peft", "prometheus_client", "pyarrow", "ray", "rensa", "rich",
        "rouge_score", "sacrebleu", "safetensors", "scipy", "sentence_transformers", "sklearn",
        "torch", "transformers", "trl", "uvicorn",
    }
)  # fmt: skip
LAZY_MARK = "# lazy:"

# Not loaded by importing any tuneline module: each is imported inside the functions that use it.
# Decision: no tuneline module is "inherently torch" at import time, not even train.* or
# eval.generate: their torch/transformers/peft types are annotations under TYPE_CHECKING, so the
# CLI, the spec checker and the data stage start without paying for torch (seconds) or mlflow.
# (fastapi is not listed: serve.app is the HTTP server and imports it at its top.)
NOT_AT_IMPORT = (
    "torch", "transformers", "peft", "mlflow", "optuna", "ray", "pyarrow", "pandas", "sklearn",
    "scipy", "matplotlib", "sentence_transformers", "trl", "datasets",
)  # fmt: skip


@dataclass(frozen=True)
class Edge:
    path: Path  # importing file
    line: int
    statement: str
    source: str  # importing unit
    target: str  # imported unit
    in_function: bool
    type_only: bool
    lazy_reason: bool


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of_file(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1:
        return ROOT if parts[0] == "__init__.py" else parts[0].removesuffix(".py")
    return parts[0]


def unit_of_module(dotted: str) -> str | None:
    """``tuneline.eval.suite`` -> ``eval``; ``tuneline`` -> the root; not tuneline -> None."""
    parts = dotted.split(".")
    if parts[0] != "tuneline":
        return None
    return parts[1] if len(parts) > 1 else ROOT


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (inside a function, under TYPE_CHECKING)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, in_function, type_only))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, True, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_only)
            else:
                visit(child, in_function, type_only)

    visit(tree, False, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The absolute module names an import statement loads (``from tuneline import x`` -> tuneline.x
    when x is a module of the package, else tuneline)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        base = package[: len(package) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        if module.startswith("tuneline") and _module_exists(sub):
            out.append(sub)
        else:
            out.append(module)
    return out


def _module_exists(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


@cache
def all_files() -> tuple[Path, ...]:
    return tuple(sorted(PACKAGE.rglob("*.py")))


@cache
def all_imports() -> tuple[tuple[Path, int, str, str, bool, bool, bool], ...]:
    """(file, line, statement, imported module, in function, type only, has `# lazy:`) per target."""
    rows = []
    for path in all_files():
        text = path.read_text()
        lines = text.splitlines()
        for node, in_function, type_only in _imports(ast.parse(text, str(path))):
            span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            lazy = any(LAZY_MARK in line for line in span)
            statement = ast.unparse(node)
            for target in dict.fromkeys(_targets(node, path)):
                rows.append((path, node.lineno, statement, target, in_function, type_only, lazy))
    return tuple(rows)


@cache
def edges() -> tuple[Edge, ...]:
    out = []
    for path, line, statement, target, in_function, type_only, lazy in all_imports():
        unit = unit_of_module(target)
        source = unit_of_file(path)
        if unit is None or unit == source:
            continue
        out.append(Edge(path, line, statement, source, unit, in_function, type_only, lazy))
    return tuple(out)


def _units_present() -> list[str]:
    return sorted({unit_of_file(p) for p in all_files()})


def _layer(unit: str) -> int:
    return 0 if unit == ROOT else LAYERS[unit]


def test_every_unit_has_a_layer() -> None:
    missing = [u for u in _units_present() if u != ROOT and u not in LAYERS]
    assert not missing, f"add these packages/modules to LAYERS in {__file__}: {missing}"


@pytest.mark.parametrize("unit", _units_present())
def test_imports_only_go_down(unit: str) -> None:
    bad = []
    for e in edges():
        if e.source != unit or e.target not in LAYERS and e.target != ROOT:
            continue
        if unit == ROOT:
            allowed = _layer(e.target) == 0 and e.target != ROOT
        else:
            allowed = _layer(e.target) <= _layer(unit)
        if not allowed:
            bad.append(
                f"{_rel(e.path)}:{e.line}: {e.source} (layer {_layer(e.source)}) -> {e.target} "
                f"(layer {_layer(e.target)}): `{e.statement}`"
            )
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for e in edges():
        graph.setdefault(e.source, set()).add(e.target)
    problems = []
    for component in _cycles(graph):
        members = set(component)
        lines = [
            f"  {_rel(e.path)}:{e.line}: {e.source} -> {e.target}: `{e.statement}`"
            + ("  <- goes up a layer" if _layer(e.target) > _layer(e.source) else "")
            for e in edges()
            if e.source in members and e.target in members
        ]
        problems.append(f"cycle between {' <-> '.join(component)}:\n" + "\n".join(lines))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("unit", _units_present())
def test_imports_inside_functions_are_heavy_or_say_why(unit: str) -> None:
    bad = []
    for path, line, statement, target, in_function, _type_only, lazy in all_imports():
        if unit_of_file(path) != unit or not in_function or lazy:
            continue
        if target.split(".")[0] in HEAVY:
            continue
        bad.append(f"{_rel(path)}:{line}: `{statement}`")
    assert not bad, (
        "imports inside functions that are not a heavy library (move them to the module top, or "
        f"add `{LAZY_MARK} <reason>` on the line):\n" + "\n".join(sorted(set(bad)))
    )


def _modules() -> list[str]:
    return [module_name(p) for p in all_files() if p.name != "__main__.py"]


_PROBE = """
import importlib, json, sys
heavy = sys.argv[1].split(",")
loaded = {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    loaded[name] = [h for h in heavy if h in sys.modules]
print(json.dumps(loaded))
"""


def _heavy_loaded(modules: list[str]) -> dict[str, list[str]]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(NOT_AT_IMPORT), *modules],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_importing_tuneline_modules_loads_no_heavy_library() -> None:
    """One fresh interpreter imports every tuneline module; if a heavy library shows up, each module
    is then imported alone to name the one that pulls it."""
    modules = _modules()
    loaded = _heavy_loaded(modules)
    if not any(loaded.values()):
        return
    culprits = {}
    for name in modules:
        alone = _heavy_loaded([name])[name]
        if alone:
            culprits[name] = alone
    assert not culprits, "modules that load a heavy library when imported (import it inside the function " + (
        "that needs it, and its types under TYPE_CHECKING):\n"
        + "\n".join(f"  {m}: {', '.join(h)}" for m, h in sorted(culprits.items()))
    )
