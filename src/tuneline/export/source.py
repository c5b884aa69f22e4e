"""What an export starts from: a registered version's adapter folder, downloaded and verified, its
method read from its own files, and the base model it was trained on (checked by fingerprint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, verify_tree
from tuneline.errors import ModelError, Problem, TunelineError
from tuneline.models import load_model, load_tokenizer, resolve_model_source
from tuneline.models.loading import model_dir_for
from tuneline.registry.card import BASE_MODEL_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneline.models.sources import ModelSource
    from tuneline.registry import VersionInfo
    from tuneline.workspace import Workspace

ADAPTER_CONFIG = "adapter_config.json"
# what makes a registered version an MLflow model (written by .version_model at registration)
MLMODEL = "MLmodel"
ENV_FILE = "python_env.yaml"
REQUIREMENTS_FILE = "requirements.txt"
MERGEABLE = ("lora", "dora", "rslora", "ia3", "full")  # prefix/prompt tuning add virtual tokens: nothing to merge


class ExportError(TunelineError):
    """A version cannot be exported in the format asked for (or its files are not the registered ones)."""


@dataclass(frozen=True)
class Fetched:
    """A registered version's adapter folder, verified against the hash recorded at registration."""

    info: VersionInfo
    folder: Path
    method: str  # lora, dora, rslora, ia3, prefix, prompt or full, read from the folder's own files

    @property
    def ref(self) -> str:
        return f"{self.info.name}@{self.info.version}"

    @property
    def adapter_config(self) -> dict[str, object]:
        path = self.folder / ADAPTER_CONFIG
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def base_record(self) -> dict[str, str]:
        """base_model.json: the base's portable name, its kind and the weights' fingerprint."""
        path = self.folder / BASE_MODEL_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def fetch(ws: Workspace, ref: str, dest: Path) -> Fetched:
    """Resolve ``ref`` (NAME, NAME@ALIAS, NAME@VERSION) in the workspace's registry, download its
    ``adapter`` artifact into ``dest`` and verify it with the tree hash recorded at registration."""
    import mlflow

    info = registry.resolve(ws.tracking_uri, ref)
    mlflow.set_tracking_uri(ws.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(dest)))
    verify_tree(folder, info.tags.get(ADAPTER_SHA_TAG), what=f"adapter of {info.name}@{info.version}")
    return Fetched(info, folder, method_of(folder))


def method_of(folder: Path) -> str:
    """The training method of an adapter folder, from peft's config (or a whole model: ``full``)."""
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        if (folder / "config.json").is_file():
            return "full"
        raise ExportError(Problem(f"{folder} holds neither {ADAPTER_CONFIG} nor a model's config.json",
                                  hint="register the version again with `tuneline run`"))
    saved = json.loads(config.read_text())
    kind = str(saved.get("peft_type", "")).upper()
    if kind == "LORA":
        return "dora" if saved.get("use_dora") else "rslora" if saved.get("use_rslora") else "lora"
    known = {"IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
    if kind not in known:
        raise ExportError(Problem(f"{config}: peft_type {kind!r} is not a method tuneline exports",
                                  field="peft_type", hint="tuneline trains lora, dora, rslora, ia3, prefix, prompt, full"))
    return known[kind]


def is_classifier(folder: Path) -> bool:
    """A ``task.head: classifier`` version: a sequence-classification adapter (peft's SEQ_CLS) that
    answers with a label from one forward pass, not with generated text."""
    config = folder / ADAPTER_CONFIG
    return config.is_file() and json.loads(config.read_text()).get("task_type") == "SEQ_CLS"


def require_mergeable(fetched: Fetched, fmt: str) -> None:
    """Prefix and prompt tuning add learned virtual tokens to every input; no weights to merge them into.
    A classifier head's merge is a classifier, not a model that generates: the formats that hand
    text generation to another tool do not apply to it."""
    if is_classifier(fetched.folder):
        raise ExportError(Problem(
            f"{fetched.ref} is a classifier head (task.head: classifier): it answers with a label from one forward "
            f"pass, and --format {fmt} writes a model that generates text",
            hint="export it with --format peft (AutoPeftModelForSequenceClassification loads it), or serve it with "
                 "`tuneline serve`"))
    if fetched.method not in MERGEABLE:
        raise ExportError(Problem(
            f"{fetched.ref} was trained with {fetched.method} tuning: its virtual tokens cannot be merged into the "
            f"base weights, so --format {fmt} does not apply",
            hint="export it with --format peft (PeftModel.from_pretrained(base, folder) loads it)"))


def base_source(fetched: Fetched, base: str | None = None) -> ModelSource:
    """The base the version was trained on (``--base`` or the registered spec's ``model``), refused
    when its fingerprint is not the one recorded in the adapter's base_model.json."""
    ref = base or fetched.info.tags.get("tuneline.base_model")
    if not ref:
        raise ExportError(Problem(f"{fetched.ref} does not record its base model", field="--base",
                                  hint="pass --base with the model it was trained on"))
    recorded = fetched.base_record.get("fingerprint") or fetched.info.tags.get("tuneline.base_model_fingerprint")
    return checked_base(ref, recorded, fetched.ref, fetched.base_record, "--base")


def checked_base(ref: str, recorded: str | None, what: str, record: dict[str, str], field: str) -> ModelSource:
    """The model ``ref`` names (relative to the working folder), refused unless its fingerprint is
    ``recorded`` (None: nothing recorded, nothing to check). ``field`` names what overrides ``ref``."""
    source = resolve_model_source(ref, Path.cwd())
    if recorded and source.fingerprint() != recorded:
        raise ModelError(Problem(
            f"the base model {ref!r} here has fingerprint {source.fingerprint()[:24]}…, but {what} was trained "
            f"on {recorded[:24]}…", field=field,
            hint=f"give {field} the weights named in {BASE_MODEL_FILE} "
                 f"({record.get('base_model_name_or_path', '?')})"))
    return source


def base_model_dir(source: ModelSource, ws: Workspace) -> str | Path:
    """What ``from_pretrained`` reads for the base (a GGUF base is converted once into the workspace's cache)."""
    return model_dir_for(source, ws.models_dir)


def load_base(source: ModelSource, ws: Workspace) -> PreTrainedModel:
    """The base in fp32 on the CPU: merging and export arithmetic happen in full precision."""
    return load_model(source, ws.models_dir, device="cpu", dtype="fp32")


def tokenizer_of(folder: Path, source: ModelSource, ws: Workspace) -> PreTrainedTokenizerBase:
    """The tokenizer shipped in the adapter folder (with its chat template), else the base's."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return load_tokenizer(source, ws.models_dir)
