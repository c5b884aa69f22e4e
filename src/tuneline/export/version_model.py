"""Every generative version tuneline registers is an MLflow model too, so that
``mlflow.pyfunc.load_model("models:/NAME@production")`` and ``mlflow models serve -m
models:/NAME@production`` answer chat requests with the version ``production`` names: a promotion or
a rollback moves what MLflow loads with it.

At registration :func:`write_mlmodel` puts an ``MLmodel`` file (MLflow's ``python_function`` flavour,
its loader module this one), ``requirements.txt`` and ``python_env.yaml`` into the adapter folder,
before the folder is logged and hashed: they are part of the registered files. MLflow then calls
:func:`_load_pyfunc` with the downloaded folder; it merges the adapter into the base model it was
trained on, in memory (the base named by the folder's ``tuneline.yaml``, relative to the working
folder, or by ``$TUNELINE_BASE_MODEL``; refused unless its fingerprint is the one recorded in
``base_model.json``; a GGUF base is converted once into the models cache of ``$TUNELINE_HOME`` or
``./.tuneline``), and answers OpenAI-style chat requests greedily with the decoding settings the
version was evaluated with, as ``tuneline serve`` does.

Loading needs tuneline installed, because the base comes from tuneline's model sources (the built-in
model is a GGUF file). ``tuneline export --format mlflow`` writes the self-contained alternative: the
merged weights in the model, loadable with MLflow, torch and transformers alone.

Which versions: those whose method merges into the base and generates (lora, dora, rslora, ia3, a
DPO-tuned LoRA, full). Prefix and prompt tuning, classifier heads and hybrids (which answer with
examples retrieved from the index shipped beside the adapter) get no ``MLmodel``: ``tuneline
serve`` serves them.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from tuneline.artifacts import MLFLOW_META_FILE
from tuneline.errors import Problem
from tuneline.export.chat_model import complete
from tuneline.export.merged import decoding_defaults, merge_folder
from tuneline.export.peft_folder import RETRIEVAL_DIR
from tuneline.export.source import (
    ENV_FILE,
    MERGEABLE,
    MLMODEL,
    REQUIREMENTS_FILE,
    ExportError,
    checked_base,
    is_classifier,
    method_of,
)
from tuneline.registry.card import BASE_MODEL_FILE
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SPEC_FILE = "tuneline.yaml"
BASE_ENV = "TUNELINE_BASE_MODEL"  # the base model to merge into, when the spec's `model` does not resolve here

REQUIREMENTS = ("tuneline", "mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "gguf", "pyyaml")
ROLES = ("system", "user", "assistant")


def write_mlmodel(folder: Path) -> bool:
    """Make the adapter folder an MLflow pyfunc model, when its method merges and generates; return
    whether it did. The files are deterministic (no creation time, no random id): the same training
    gives the same folder hash."""
    if is_classifier(folder) or (folder / RETRIEVAL_DIR).is_dir():  # a hybrid answers with retrieved examples
        return False
    try:
        method = method_of(folder)
    except ExportError:
        return False
    if method not in MERGEABLE:
        return False
    pins = requirements()
    python = ".".join(str(p) for p in sys.version_info[:3])
    (folder / REQUIREMENTS_FILE).write_text("".join(f"{pin}\n" for pin in pins))
    (folder / ENV_FILE).write_text(yaml.safe_dump(
        {"python": python, "build_dependencies": ["pip"], "dependencies": [f"-r {REQUIREMENTS_FILE}"]}, sort_keys=False))
    mlmodel = {"flavors": {"python_function": {"loader_module": __name__, "env": {"virtualenv": ENV_FILE},
                                               "python_version": python}},
               "metadata": {"tuneline.method": method}}
    mlflow_version = _installed("mlflow")
    if mlflow_version:
        mlmodel["mlflow_version"] = mlflow_version
    (folder / MLMODEL).write_text(yaml.safe_dump(mlmodel, sort_keys=False))
    return True


def requirements() -> list[str]:
    """What the loader runs with, at the installed versions."""
    return installed_pins(REQUIREMENTS)


def installed_pins(packages: tuple[str, ...]) -> list[str]:
    """``package==version`` for each installed package (a local label such as +cpu dropped)."""
    return [f"{package}=={found}" for package in packages if (found := _installed(package))]


def _installed(package: str) -> str | None:
    try:
        return version(package).split("+")[0]
    except PackageNotFoundError:
        return None


def _load_pyfunc(path: str) -> VersionChatModel:
    """MLflow's loader-module entry point: the folder MLflow downloaded (or a local copy of it)."""
    return VersionChatModel.load(Path(path))


class VersionChatModel:
    """A registered version merged into its base in memory, answering chat completions."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, served: str) -> None:
        self.model, self.tokenizer, self.served = model, tokenizer, served

    @classmethod
    def load(cls, folder: Path, workspace: str | Path | None = None) -> VersionChatModel:
        spec = _spec_of(folder)
        method = method_of(folder)
        source = None
        if method != "full":
            record = _base_record(folder)
            ref = os.environ.get(BASE_ENV) or str(spec.get("model") or "")
            if not ref:
                raise ExportError(Problem(f"{folder / SPEC_FILE} names no base model", field="model",
                                          hint=f"set {BASE_ENV} to the model the version was trained on"))
            source = checked_base(ref, record.get("fingerprint"), _served(folder, spec), record, BASE_ENV)
        model, tokenizer = merge_folder(folder, method, source, Workspace.at(workspace))
        decoding_defaults(model, folder, tokenizer)
        return cls(model.eval(), tokenizer, _served(folder, spec))

    def predict(self, model_input: object, params: dict[str, object] | None = None) -> object:
        """A chat request (``{"messages": [...], "max_tokens": N, "stop": [...]}``) -> one completion;
        a list of requests, or a DataFrame with a ``messages`` column -> a list of completions."""
        single = isinstance(model_input, dict)
        answers = [complete(self.model, self.tokenizer, chat, limit, stop, self.served)
                   for chat, limit, stop in _requests(model_input, params or {})]
        return answers[0] if single else answers


def _requests(model_input: object, params: dict[str, object]) -> list[tuple[list[dict[str, str]], int | None,
                                                                            list[str] | None]]:
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    rows = [model_input] if isinstance(model_input, dict) else model_input
    if not isinstance(rows, list) or not rows:
        _refuse(f"expected a chat request (a JSON object with 'messages'), got {type(model_input).__name__}")
    return [_request(row, params, i) for i, row in enumerate(rows)]


def _request(row: object, params: dict[str, object], i: int) -> tuple[list[dict[str, str]], int | None,
                                                                      list[str] | None]:
    where = f"request {i}: " if i else ""
    if not isinstance(row, dict):
        _refuse(f"{where}expected a JSON object with 'messages', got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        _refuse(f"{where}'messages' must be a non-empty list of {{'role', 'content'}} objects")
    chat = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            _refuse(f"{where}messages[{j}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
        chat.append({"role": m["role"], "content": m["content"]})
    limit = row.get("max_tokens", params.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        _refuse(f"{where}'max_tokens' must be a positive integer, got {limit!r}")
    stop = row.get("stop", params.get("stop"))
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        _refuse(f"{where}'stop' must be a string or a list of strings")
    return chat, limit, stop


def _refuse(message: str) -> NoReturn:
    from mlflow.exceptions import MlflowException

    raise MlflowException.invalid_parameter_value(message)  # the scoring server answers 400 with it


def _spec_of(folder: Path) -> dict[str, object]:
    path = folder / SPEC_FILE
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def _base_record(folder: Path) -> dict[str, str]:
    path = folder / BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _served(folder: Path, spec: dict[str, object]) -> str:
    """``NAME@VERSION`` when MLflow downloaded the folder from the registry, else the spec's name."""
    meta = folder / MLFLOW_META_FILE
    found = yaml.safe_load(meta.read_text()) if meta.is_file() else None
    if isinstance(found, dict) and found.get("model_name"):
        return f"{found['model_name']}@{found.get('model_version', '?')}"
    return str(spec.get("name") or folder.name)
