"""tuneline: reproducible, gated fine-tuning of language models from one spec.

Python API (the CLI calls exactly these)::

    import tuneline
    result = tuneline.run("examples/banking77/tuneline.yaml")
    loaded = tuneline.load_spec("tuneline.yaml")
    data = tuneline.prepare_data(loaded)
    suite = tuneline.evaluate("examples/banking77/tuneline.yaml")  # re-evaluate the last run's adapter
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tuneline.errors import (
    DataError,
    EvaluationError,
    ModelError,
    Problem,
    SpecError,
    TrainingError,
    TunelineError,
)
from tuneline.spec import LoadedSpec, Spec, json_schema, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "EvaluationError",
    "LoadedSpec",
    "ModelError",
    "Problem",
    "Spec",
    "SpecError",
    "TrainingError",
    "TunelineError",
    "Workspace",
    "__version__",
    "evaluate",
    "json_schema",
    "load_spec",
    "parse_spec",
    "prepare_data",
    "run",
    "train",
    "validate",
]

if TYPE_CHECKING:
    from tuneline.workspace import Workspace


# Heavy stage functions load lazily so `import tuneline` (and `tuneline --help`) stays fast.
_LAZY = {
    "run": "tuneline.pipeline",
    "validate": "tuneline.pipeline",
    "prepare_data": ("tuneline.curation", "prepare"),
    "train": "tuneline.train",
    "evaluate": "tuneline.pipeline",
    "Workspace": "tuneline.workspace",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'tuneline' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)
