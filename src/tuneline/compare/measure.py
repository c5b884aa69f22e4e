"""One combination, measured: train it, score it on the test items as it would be served, and
record what it costs (training time and tokens/s, peak memory, adapter size, single-request latency,
parameters).

Runs in the command's process (one worker), in a worker process of its own, or in a Ray worker: what
every combination shares (:class:`Shared`: the training rows, the test items) is prepared once by
the command and handed over whole, so every combination trains on the same rows and answers the
same items. The result (``result.json``), the evaluation (``eval_report.json``) and the adapter stay
in the combination's folder: a re-run of the comparison reuses a finished one, and continues an
interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml

from tuneline.artifacts import atomic_write_text
from tuneline.compare.plan import Planned
from tuneline.compare.results import GENERATIVE, Measured
from tuneline.data.examples import Example
from tuneline.eval import EvalSet, EvalSuite, Evaluation
from tuneline.eval.validate import RowSample, make_scorer, maximize
from tuneline.models import load_model, load_tokenizer
from tuneline.models.sources import ModelSource, declared_license
from tuneline.runtime import Compute
from tuneline.spec.models import Spec
from tuneline.train import EarlyStoppingCheck, TrainOptions, TrainResult, train
from tuneline.train.checkpoint import latest_checkpoint
from tuneline.train.classifier import train_classifier
from tuneline.train.loop import steps_per_epoch
from tuneline.train.peft_builders import is_prompt_learning

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
EVAL_FILE = "eval_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class Shared:
    """What every combination of one comparison uses alike."""

    train: list[Example]  # the training rows (with the planted canaries' rows, as a run trains)
    validation: list[Example]  # for train.early_stopping
    test: list[Example]  # the evaluation items every combination answers
    labels: list[str] | None
    models_dir: Path
    device: str
    show_progress: bool = False


@dataclass
class Job:
    """One combination to measure, where its files go, and what its result depends on (``key``)."""

    planned: Planned
    key: str
    folder: Path
    license: str | None


class PeakMemory:
    """Peak memory inside the block, in MB: on a GPU the most memory torch allocated; on a CPU the
    peak resident memory of this process above what it held at the start (the kernel's high-water
    mark, reset at the start; where it cannot be reset, the process's lifetime peak)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda" if device.startswith("cuda") else "rss"
        self.mb: float | None = None
        self._start_kb = 0

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif _reset_high_water_mark():
            self._start_kb = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.kind == "cuda":
            import torch

            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        peak = _status_kb("VmHWM")
        if peak is None:  # no /proc: the lifetime peak (ru_maxrss is KB on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        self.mb = max(0, peak - self._start_kb) / 1024


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_high_water_mark() -> bool:
    """Reset this process's peak resident memory (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def model_license(source: ModelSource) -> str | None:
    """The base model's license: tuneline's own record for a built-in model, else the ``license:``
    of the model card (README.md front matter) in a local model folder; None when not declared."""
    if (known := declared_license(source.ref)) is not None:
        return known
    card = source.path / "README.md" if source.kind == "local" and source.path is not None else None
    if card is None or not card.is_file():
        return None
    head = card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+)", head, re.MULTILINE) if head.startswith("---") else None
    return found.group(1).strip() if found else None


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files in an adapter folder (a full fine-tune's: the whole model)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def measure(shared: Shared, job: Job) -> Measured:
    """Train, evaluate and measure one combination; a failure is a ``failed`` result saying why."""
    combo, spec = job.planned.combination, job.planned.spec
    base = Measured(combo.model, combo.method, combo.head, job.key, "failed", spec.train.lr, job.planned.lr_source,
                    license=job.license, folder=str(job.folder))
    how = MEASURES.get(combo.head)
    if how is None:
        base.error = f"no measurement for the {combo.head} head in this version"
        return base
    try:
        return how(shared, job, base)
    except Exception as e:  # one combination failing does not stop the others
        log.exception("compare %s failed", combo.label)
        base.error = f"{type(e).__name__}: {e}"[:2000]
        return base


def _measure_generative(shared: Shared, job: Job, out: Measured) -> Measured:
    """A causal LM with the combination's adapter, answering by generation."""
    return _measure_trained(shared, job, out, train)


def _measure_classifier(shared: Shared, job: Job, out: Measured) -> Measured:
    """``task.head: classifier``: a sequence-classification head trained with LoRA, answering in one
    forward pass (the label set: the dataset's, in the head's index order)."""
    return _measure_trained(shared, job, out, partial(train_classifier, labels=shared.labels or []))


def _measure_trained(shared: Shared, job: Job, out: Measured, trainer: Trainer) -> Measured:
    """Train the combination with ``trainer`` (:func:`tuneline.train.train`'s signature), score it
    as served and record its costs."""
    spec = job.planned.spec
    compute = Compute.resolve(spec.train.precision, spec.train.method, shared.device)
    tokenizer = load_tokenizer(job.planned.source, shared.models_dir)
    job.folder.mkdir(parents=True, exist_ok=True)
    with PeakMemory(compute.device) as peak:
        model = load_model(job.planned.source, shared.models_dir, device=compute.device, dtype=compute.base_dtype)
        resume = latest_checkpoint(job.folder / "checkpoints") is not None  # an interrupted comparison
        trained, result = trainer(spec.train, model, tokenizer, shared.train, job.folder, TrainOptions(
            resume=resume, fingerprint=job.key, device=compute.device, show_progress=shared.show_progress,
            early_stopping=_early_stopping(shared, spec, tokenizer, compute)))
    del model
    suite = _evaluate(shared, spec, tokenizer, _as_served(trained), compute)
    del trained
    shutil.rmtree(job.folder / "checkpoints", ignore_errors=True)  # the adapter is what is kept
    _fill(out, result, suite, weight_bytes(Path(result.adapter_dir)), peak)
    atomic_write_text(job.folder / EVAL_FILE, json.dumps(suite.to_dict(), indent=2))
    atomic_write_text(job.folder / "train_result.json", json.dumps(result.to_dict(), indent=2))
    atomic_write_text(job.folder / "tuneline.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(job.folder / RESULT_FILE, json.dumps(out.to_dict(), indent=2))  # last: marks it finished
    return out


# how each head is trained and measured: (shared, job, the result to fill) -> the result filled in;
# a head that answers without generation (task.head: classifier) adds its own entry
MEASURES: dict[str, Callable[[Shared, Job, Measured], Measured]] = {GENERATIVE: _measure_generative,
                                                                     "classifier": _measure_classifier}
# how a combination trains: model, tokenizer, rows, folder, options -> (trained model, result)
Trainer = Callable[..., tuple["nn.Module", TrainResult]]


def _fill(out: Measured, result: TrainResult, suite: EvalSuite, adapter: int, peak: PeakMemory) -> None:
    test = suite.main_set()
    system = test.system("candidate")
    assert system is not None
    out.state = "complete"
    out.metrics = dict(system.metrics)
    out.scores, out.predictions = list(system.scores), list(system.predictions)
    out.train_seconds, out.tokens_per_second, out.steps = result.seconds, result.tokens_per_second, result.steps
    out.trainable_params, out.total_params = result.trainable_params, result.total_params
    out.peak_memory_mb, out.memory_kind = peak.mb, peak.kind
    out.adapter_bytes = adapter
    if suite.latency is not None:
        out.p50_ms, out.p95_ms = suite.latency.p50_ms, suite.latency.p95_ms


def _early_stopping(shared: Shared, spec: Spec, tokenizer: PreTrainedTokenizerBase,
                    compute: Compute) -> EarlyStoppingCheck | None:
    """The spec's train.early_stopping on the validation rows, as ``tuneline run`` does it."""
    es, cfg = spec.train.early_stopping, spec.train
    if es is None:
        return None
    metric = es.metric or spec.objective.primary
    score = make_scorer(spec, tokenizer, shared.validation, shared.labels, metric, precision=compute.precision,
                        device=compute.device, sample=RowSample(es.rows, cfg.seed))
    every = max(1, round(es.every * steps_per_epoch(len(shared.train), cfg)))
    return EarlyStoppingCheck(every=every, score=score, maximize=maximize(metric), patience=es.patience,
                              min_delta=es.min_delta, keep_best=True)


def _as_served(model: nn.Module) -> nn.Module:
    """The trained model as the server answers with it: a mergeable adapter merged into the base
    weights, virtual tokens (prefix and prompt tuning) kept as a peft model, a full fine-tune as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and not is_prompt_learning(model):
        merged: nn.Module = model.merge_and_unload()
        return merged
    return model


def _evaluate(shared: Shared, spec: Spec, tokenizer: PreTrainedTokenizerBase, model: nn.Module,
              compute: Compute) -> EvalSuite:
    """The test items alone, scored with the evaluation's metrics and intervals, and single requests
    timed (eval.latency.requests of them, batch 1); no golden sets, probes or perturbations."""
    ev = spec.eval
    only_test = ev.model_copy(update={
        "golden": [], "production": None, "forgetting": False, "compare_base": False, "canaries": None,
        "robustness": ev.robustness.model_copy(update={"enabled": False}),
        "latency": ev.latency.model_copy(update={"enabled": True})})
    evaluation = Evaluation(spec.model_copy(update={"eval": only_test}), tokenizer,
                            [EvalSet("test", "test", shared.test)], shared.labels, autocast=compute.autocast(),
                            device=compute.device, show_progress=shared.show_progress)
    evaluation.score_system("candidate", model, f"{spec.train.method} @ {spec.model}")
    return evaluation.finish()
