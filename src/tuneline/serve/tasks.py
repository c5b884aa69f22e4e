"""What task a served adapter was trained for, read from the spec its folder carries
(``tuneline.yaml``, written by the pipeline's ship stage), so the request log can record a
classification adapter's answer as the label it predicts (``predicted_label``), which the
monitor's output-drift detector compares with the training labels."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneline.errors import SpecError
from tuneline.eval.metrics import normalize_label
from tuneline.spec import load_spec

log = logging.getLogger(__name__)

SPEC_FILE = "tuneline.yaml"  # beside the adapter's weights (pipeline.stages.ship_adapter)


@dataclass(frozen=True)
class AdapterTask:
    """An adapter's task type and, for classification, the spec's label set (empty when the spec
    leaves it to the training data)."""

    type: str
    labels: tuple[str, ...] = ()

    def predicted_label(self, answer: str | None) -> str | None:
        """The label a classification answer predicts: the answer stripped, spelled as the spec's
        label when it matches one as evaluation matches labels (case, spaces, punctuation);
        None for other tasks and empty answers."""
        if self.type != "classification" or answer is None or not answer.strip():
            return None
        text = answer.strip()
        key = normalize_label(text)
        return next((label for label in self.labels if normalize_label(label) == key), text)


def read_task(adapter_dir: str | os.PathLike[str]) -> AdapterTask | None:
    """The task of the adapter saved in ``adapter_dir``; None when it carries no spec (an adapter
    saved outside the pipeline) or one that cannot be read."""
    path = Path(adapter_dir) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        task = load_spec(path).spec.task
        return AdapterTask(str(task.type), tuple(task.labels or ()))
    except SpecError:  # a spec of another tuneline version: its task type is still readable
        return _raw_task(path)
    except OSError as exc:
        log.warning("cannot read %s: %s; its answers are logged without a predicted label", path, exc)
        return None


def _raw_task(path: Path) -> AdapterTask | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s; its answers are logged without a predicted label", path, exc)
        return None
    task = data.get("task") if isinstance(data, dict) else None
    kind = task.get("type") if isinstance(task, dict) else None
    if not isinstance(kind, str):
        log.warning("%s names no task type; its answers are logged without a predicted label", path)
        return None
    labels = task.get("labels") if isinstance(task, dict) else None
    return AdapterTask(kind, tuple(str(x) for x in labels) if isinstance(labels, list) else ())
