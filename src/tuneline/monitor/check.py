"""``tuneline monitor check``: every detector over the current window of a served model, stored,
with alerts sent to the spec's sinks.

What is checked (:func:`target_of`): ``NAME`` is the registered model's production version, with
the spec shipped in its adapter; a spec file names the model by its ``name`` and supplies the
``monitor:`` section itself. The reference is the production version's training data (its
dataset version's train split, ``window.reference_rows`` rows sampled with ``window.seed``); the
current window is the last ``window.requests`` requests to the model (only those of the last
``window.hours`` when set), read from the request log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline import registry
from tuneline.curation.steps import input_of
from tuneline.curation.version import DatasetVersion, load_version
from tuneline.data.examples import sample_rows
from tuneline.errors import Problem, TunelineError
from tuneline.monitor.alerts import AlertOutcome, build_sinks, send_alerts
from tuneline.monitor.detectors import (
    Reference,
    input_detectors,
    operations_detectors,
    output_detectors,
    quality_detectors,
    reference_of,
)
from tuneline.monitor.drifted import DriftedGroup, drifted_examples
from tuneline.monitor.harvest import prompt_messages
from tuneline.monitor.results import CheckResult, DetectorResult, Window
from tuneline.monitor.store import FeedbackRow, RequestLog, StoredRequest
from tuneline.registry import VersionInfo
from tuneline.retrieval.encoder import Encoder, load_encoder
from tuneline.spec import LoadedSpec, load_spec, parse_spec

if TYPE_CHECKING:
    import numpy as np

    from tuneline.spec import Spec
    from tuneline.workspace import Workspace

log = logging.getLogger("tuneline.monitor")

ANSWERED = 200


class MonitorError(TunelineError):
    """What ``monitor check`` needs is missing: a production version, its dataset version, a spec."""


@dataclass(frozen=True)
class Target:
    """The served model a check looks at: its production version, spec and training data."""

    name: str
    version: VersionInfo
    spec: Spec
    dataset: DatasetVersion
    spec_path: Path | None = None  # the spec file the check was given (None: the one shipped)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version.version}"


@dataclass(frozen=True)
class CurrentWindow:
    """The requests of the current window, and the feedback on them."""

    rows: list[StoredRequest]
    feedback: list[FeedbackRow]

    @property
    def answered(self) -> list[StoredRequest]:
        return [r for r in self.rows if r["status"] == ANSWERED]

    def window(self, now: float) -> Window:
        if not self.rows:
            return Window(now, now, 0)
        return Window(float(self.rows[0]["created"]), float(self.rows[-1]["created"]), len(self.rows),
                      str(self.rows[0]["id"]), str(self.rows[-1]["id"]))


@dataclass(frozen=True)
class CheckOutcome:
    check: CheckResult
    alerts: AlertOutcome
    check_id: int


def target_of(ref: str, ws: Workspace) -> Target:
    """``ref`` is a spec file (its ``name`` is the model) or a registered model's name."""
    path = Path(ref)
    loaded: LoadedSpec | None = None
    if path.suffix in (".yaml", ".yml") or path.is_file():
        loaded = load_spec(path)
        name = loaded.spec.name
    else:
        name = ref
    try:
        version = registry.resolve(ws.tracking_uri, f"{name}@production")
    except registry.RegistryError as exc:
        raise MonitorError(Problem(f"{name!r} has no production version to monitor",
                                   hint=f"promote one first: `tuneline promote {name} VERSION`")) from exc
    spec = loaded.spec if loaded is not None else shipped_spec(version)
    ds_id = version.tags.get("tuneline.dataset_version")
    if not ds_id:
        raise MonitorError(Problem(f"{name}@{version.version} records no dataset version: its training data "
                                   "cannot serve as the reference",
                                   hint="monitor a version trained by `tuneline run` (it records its dataset version)"))
    return Target(name, version, spec, load_version(ds_id, ws.datasets_dir), loaded.path if loaded else None)


def shipped_spec(version: VersionInfo) -> Spec:
    """The spec shipped in the version's adapter folder (``tuneline.yaml``)."""
    import mlflow

    where = f"{version.name}@{version.version}:tuneline.yaml"
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source.rstrip('/')}/tuneline.yaml")
    except Exception as exc:
        raise MonitorError(Problem(f"cannot read the spec shipped with {version.name}@{version.version} "
                                   f"({str(exc).splitlines()[0][:200]})",
                                   hint="pass the spec file instead of the model name")) from exc
    return parse_spec(Path(local).read_text(), where)


def request_input(prompt: str | None) -> str:
    """The input a logged request's prompt (JSON: the messages, or a completion prompt) carried:
    every turn but the system prompt, as :func:`tuneline.curation.steps.input_of` reads a
    training row."""
    msgs = prompt_messages(prompt) if prompt else None
    return "\n".join(m["content"] for m in msgs if m["role"] != "system") if msgs else ""


def current_window(target: Target, store: RequestLog, now: float | None = None) -> CurrentWindow:
    window = target.spec.monitor.window
    now = time.time() if now is None else now
    since = now - window.hours * 3600 if window.hours else None
    rows = store.requests(target.name, limit=window.requests, since=since, until=now)
    feedback = store.feedback([str(r["id"]) for r in rows]) if rows else []
    return CurrentWindow(rows, feedback)


def reference_rows(target: Target) -> list[tuple[str, str, str | None]]:
    """(input, answer, label) of the reference: the training split, sampled."""
    window = target.spec.monitor.window
    train = sample_rows(target.dataset.split("train"), window.reference_rows, window.seed)
    return [(input_of(ex), ex.reference, ex.label) for ex in train]


def open_encoder(target: Target, ws: Workspace) -> Encoder:
    return load_encoder(target.spec.monitor.input.encoder, cache_root=ws.embeddings_dir, field="monitor.input.encoder")


@dataclass
class Embedded:
    """Reference and current inputs with their embeddings (None: the input detectors are off)."""

    reference: Reference
    texts: list[str]
    embeddings: np.ndarray | None


def embedded(target: Target, current: CurrentWindow, encoder: Encoder | None) -> Embedded:
    ref = reference_rows(target)
    texts = [request_input(r["prompt"]) for r in current.answered]
    ref_texts = [t for t, _, _ in ref]
    ref_emb = cur_emb = None
    if encoder is not None:
        ref_emb = encoder.embed(ref_texts)
        cur_emb = encoder.embed(texts) if texts else None
    labels = [lab or "" for _, _, lab in ref] if target.spec.task.type == "classification" else None
    reference = reference_of(ref_texts, [a for _, a, _ in ref], labels, ref_emb, target.spec.monitor.window.seed)
    return Embedded(reference, texts, cur_emb)


def detect(target: Target, current: CurrentWindow, data: Embedded) -> list[DetectorResult]:
    """Every enabled detector's result, in the order input, output, quality, operations."""
    spec = target.spec.monitor
    answered = current.answered
    served = [r for r in answered if r["model_version"] == target.version.version]  # output: this version's
    results: list[DetectorResult] = []
    if spec.input.enabled:
        results += input_detectors(data.reference, data.texts, data.embeddings, spec)
    if spec.output.enabled:
        classification = target.spec.task.type == "classification"
        results += output_detectors(
            data.reference, [str(r["response"] or "") for r in served],
            [r["predicted_label"] for r in served] if classification else None,
            [r["finish_reason"] for r in served], target.spec.task.type, spec)
    if spec.quality.enabled:
        results += quality_detectors([f["rating"] for f in current.feedback], [f["correction"] for f in current.feedback],
                                     spec)
    if spec.operations.enabled:
        results += operations_detectors(
            [int(r["status"] or 0) for r in current.rows], [r["latency_ms"] for r in current.rows],
            [_tokens(r) for r in current.rows], spec)
    return results


def _tokens(row: StoredRequest) -> int | None:
    if row["prompt_tokens"] is None and row["completion_tokens"] is None:
        return None
    return int(row["prompt_tokens"] or 0) + int(row["completion_tokens"] or 0)


def run_check(target: Target, ws: Workspace, store: RequestLog, *, now: float | None = None,
              encoder: Encoder | None = None, send: bool = True) -> CheckOutcome:
    """Run every detector on ``target``'s current window, store the result, send its alerts."""
    sinks = build_sinks(target.spec.monitor.alerts) if send else []  # a missing token fails before any work
    current = current_window(target, store, now)
    if encoder is None and target.spec.monitor.input.enabled:
        encoder = open_encoder(target, ws)
    data = embedded(target, current, encoder)
    at = time.time() if now is None else now
    check = CheckResult(target.name, target.version.version, target.dataset.id, at, current.window(at),
                        detect(target, current, data))
    check_id = store.save_check(check)
    outcome = send_alerts(check, sinks, store) if send else AlertOutcome()
    return CheckOutcome(check, outcome, check_id)


def drifted_now(target: Target, ws: Workspace, store: RequestLog, *, now: float | None = None,
                encoder: Encoder | None = None) -> list[DriftedGroup]:
    """The current inputs farthest from the reference, grouped (the report's examples)."""
    current = current_window(target, store, now)
    data = embedded(target, current, encoder or open_encoder(target, ws))
    if data.embeddings is None or data.reference.embeddings is None:
        return []
    return drifted_examples(data.reference.embeddings, data.embeddings, data.texts)
