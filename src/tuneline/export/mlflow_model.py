"""``--format mlflow``: the merged model as an MLflow pyfunc chat model (:mod:`.chat_model`),
logged in the workspace's tracking store and registered as a version of its own registered model,
``NAME-mlflow`` by default, holding the aliases the exported version holds. So, with the workspace's
tracking URI, ``mlflow.pyfunc.load_model("models:/NAME-mlflow@production")`` answers chat requests,
and ``mlflow models serve -m models:/NAME-mlflow@production --env-manager local`` serves them.

NAME's own versions are MLflow models already (:mod:`.version_model`: ``models:/NAME@production``),
loaded through tuneline, which merges the adapter into its base at load time. This export is the
self-contained copy, for where tuneline is not installed: the merged weights are in the model, and
loading needs MLflow, torch and transformers only. A separate registered model, because NAME's
versions are the adapters that tuneline's registry promotes, rolls back and serves.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.artifacts import ADAPTER_SHA_TAG
from tuneline.export.merged import merged_model, save_merged
from tuneline.export.source import MLMODEL, Fetched
from tuneline.export.version_model import installed_pins
from tuneline.registry import EXPORT_SOURCE_TAG
from tuneline.tracking import artifact_location

if TYPE_CHECKING:
    from tuneline.workspace import Workspace

CODE = Path(__file__).with_name("chat_model.py")
EXPERIMENT = "tuneline-export"
SUFFIX = "-mlflow"
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "jinja2")


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    aliases: list[str]

    @property
    def uri(self) -> str:
        """``models:/NAME@production`` when it holds production, else its first alias, else its number."""
        if not self.aliases:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}@{'production' if 'production' in self.aliases else self.aliases[0]}"


def export_mlflow(fetched: Fetched, ws: Workspace, out: Path | None, *, base: str | None = None,
                  registered_name: str | None = None) -> tuple[Registered, list[str]]:
    """Log and register the chat model; with ``out``, also save it there as a local MLflow model folder."""
    import mlflow

    model, tokenizer = merged_model(fetched, ws, "mlflow", base)
    name = registered_name or f"{fetched.info.name}{SUFFIX}"
    with tempfile.TemporaryDirectory(prefix="tuneline-export-") as tmp:
        merged = Path(tmp) / "model"
        save_merged(model, tokenizer, merged, fetched, "fp32")
        del model
        with mlflow.start_run(experiment_id=_experiment(ws), run_name=f"export {fetched.ref}"):
            mlflow.set_tags(_tags(fetched))
            logged = mlflow.pyfunc.log_model(name="model", python_model=str(CODE), artifacts={"model": str(merged)},
                                             pip_requirements=requirements(), registered_model_name=name)
        if out is not None:
            mlflow.pyfunc.save_model(path=str(out), python_model=str(CODE), artifacts={"model": str(merged)},
                                     pip_requirements=requirements())
    registered = _tag_version(ws.tracking_uri, name, int(logged.registered_model_version or 0), fetched)
    notes = [f"load it: mlflow.set_tracking_uri({ws.tracking_uri!r}); mlflow.pyfunc.load_model({registered.uri!r})",
             f"serve it: MLFLOW_TRACKING_URI={ws.tracking_uri} mlflow models serve -m {registered.uri} "
             "--env-manager local"]
    if (fetched.folder / MLMODEL).is_file():
        itself = Registered(fetched.info.name, fetched.info.version, list(fetched.info.aliases))
        notes.append(f"the version itself is an MLflow model too (loading it needs tuneline): {itself.uri}")
    return registered, notes


def _experiment(ws: Workspace) -> str:
    """The export runs' experiment, its artifacts in the workspace (as every tuneline run's)."""
    import mlflow

    mlflow.set_tracking_uri(ws.tracking_uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    return str(mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location(ws, ws.tracking_uri, EXPERIMENT)))


def requirements() -> list[str]:
    """The installed versions the model runs with (a local version label such as +cpu dropped)."""
    return installed_pins(REQUIREMENTS)


def _tags(fetched: Fetched) -> dict[str, str]:
    info = fetched.info
    return {EXPORT_SOURCE_TAG: f"{info.name}/{info.version}", "tuneline.export.method": fetched.method,
            ADAPTER_SHA_TAG: info.tags.get(ADAPTER_SHA_TAG, ""),
            "tuneline.export.base_model": fetched.base_record.get("base_model_name_or_path", "")}


def _tag_version(uri: str, name: str, version: int, fetched: Fetched) -> Registered:
    """The new version carries where it came from, and the aliases the exported version holds."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in _tags(fetched).items():
        client.set_model_version_tag(name, str(version), key, value)
    for alias in fetched.info.aliases:
        client.set_registered_model_alias(name, alias, str(version))
    return Registered(name, version, list(fetched.info.aliases))
