"""tuneline: reproducible, gated fine-tuning of language models from one spec.

Python API (the CLI calls exactly these)::

    import tuneline
    result = tuneline.run("examples/banking77/tuneline.yaml")
    loaded = tuneline.load_spec("tuneline.yaml")
    data = tuneline.prepare_data(loaded)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneline.errors import DataError, ModelError, Problem, SpecError, TrainingError, TunelineError
from tuneline.spec import LoadedSpec, Spec, json_schema, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "LoadedSpec",
    "ModelError",
    "Problem",
    "Spec",
    "SpecError",
    "TrainingError",
    "TunelineError",
    "Workspace",
    "__version__",
    "evaluate_model",
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


def __getattr__(name: str) -> Any:
    # Heavy stage functions load lazily so `import tuneline` stays fast.
    if name == "run":
        from tuneline.pipeline import run

        return run
    if name == "validate":
        from tuneline.pipeline import validate

        return validate
    if name == "prepare_data":
        from tuneline.data import prepare

        return prepare
    if name == "train":
        from tuneline.train import train

        return train
    if name == "evaluate_model":
        from tuneline.eval import evaluate_model

        return evaluate_model
    if name == "Workspace":
        from tuneline.workspace import Workspace

        return Workspace
    raise AttributeError(f"module 'tuneline' has no attribute {name!r}")
