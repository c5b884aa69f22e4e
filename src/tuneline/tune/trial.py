"""One search trial: train with the trial's values, validate as it goes, report, track.

A :class:`TrialContext` holds everything a trial needs that does not change between trials: the
curated examples, their tokenization, the validation rows, the model source. It is built once per
search and shared: pickled once for local worker processes, put once in Ray's object store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.data.examples import Example
from tuneline.data.tokenize import Encoded
from tuneline.eval.validate import RowSample, make_scorer
from tuneline.models import ModelSource, load_model
from tuneline.runtime import Compute
from tuneline.spec.models import Spec
from tuneline.tracking import flatten
from tuneline.train import EarlyStoppingCheck, TrainOptions, train
from tuneline.train.loop import optimizer_steps, steps_per_epoch
from tuneline.train.stem import StemMemo, StemStore
from tuneline.tune.space import ParamValue, apply_params

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Report = Callable[[int, float, bool], None]  # (validation index, value, is the last one)


class TrialPruned(Exception):  # noqa: N818 - the name says what happened, like optuna.TrialPruned
    """Raised by a report callback to end a trial that the pruner stopped."""


@dataclass
class TrialContext:
    spec: Spec
    source: ModelSource
    models_dir: Path
    tokenizer: PreTrainedTokenizerBase
    train: list[Example]
    encoded: tuple[list[Encoded], list[str]]  # train tokenized at spec.train.seq_len: (kept, dropped)
    validation: list[Example]
    labels: list[str] | None
    metric: str
    maximize: bool
    device: str  # each trial's precision and base dtype follow its own configuration (Compute.resolve)
    study_name: str
    study_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trained_on_all: bool  # trials see every training row (so the best trial's adapter can be reused)
    extra_tags: dict[str, str] = field(default_factory=dict)
    # the frozen layers' states (lora.layers), computed by the first trial that needs them, reused by the rest
    stem_memo: StemMemo = field(default_factory=StemMemo)
    stems_dir: Path | None = None  # the workspace's stored frozen-layer states (StemStore)


@dataclass
class TrialOutcome:
    value: float
    validations: list[tuple[int, float]]
    steps: int
    seconds: float
    adapter_dir: str
    mlflow_run_id: str


def trial_dir(ctx: TrialContext, key: str) -> Path:
    return ctx.study_dir / f"trial-{key}"


def run_trial(ctx: TrialContext, key: str, params: dict[str, ParamValue], report: Report) -> TrialOutcome:
    """Train one configuration; ``report`` after each validation (it raises :class:`TrialPruned` to
    stop). Tracked as an MLflow child run of the search run; the adapter is kept in the trial folder."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    cfg = apply_params(ctx.spec.train, params)
    compute = Compute.resolve(cfg.precision, cfg.method, ctx.device)  # a trial may pick `method: full`
    out = trial_dir(ctx, key)
    client = MlflowClient(ctx.tracking_uri)
    run = client.create_run(ctx.experiment_id, run_name=f"trial {key}", tags={
        "mlflow.parentRunId": ctx.parent_run_id, "tuneline.study": ctx.study_name, "tuneline.trial": key,
        "tuneline.kind": "search-trial", "tuneline.worker": f"{socket.gethostname()}:{os.getpid()}",
        **ctx.extra_tags})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(f"train.{k}", str(v)[:500]) for k, v in flatten(cfg.model_dump()).items()]
                     + [Param(f"search.{k}", str(v)) for k, v in params.items()])
    t0 = time.perf_counter()
    try:
        encoded = ctx.encoded if cfg.seq_len == ctx.spec.train.seq_len else None
        n_examples = len(encoded[0]) if encoded else len(ctx.train)
        per_epoch = steps_per_epoch(n_examples, cfg)
        every = max(1, round(ctx.spec.search.eval_every * per_epoch) if ctx.spec.search else 1)
        total = optimizer_steps(n_examples, cfg)
        n_validations = math.ceil(total / every)

        def on_validation(index: int, value: float) -> None:
            client.log_batch(run_id, metrics=[Metric(ctx.metric, value, int(time.time() * 1000), index)])
            report(index, value, index >= n_validations)

        score = make_scorer(ctx.spec, ctx.tokenizer, ctx.validation, ctx.labels, ctx.metric,
                            precision=compute.precision, device=compute.device,
                            sample=RowSample(len(ctx.validation)))
        check = EarlyStoppingCheck(every=every, score=score, maximize=ctx.maximize, report=on_validation)
        model = load_model(ctx.source, ctx.models_dir, device=compute.device, dtype=compute.base_dtype)
        _, result = train(cfg, model, ctx.tokenizer, ctx.train, out, TrainOptions(
            device=compute.device, show_progress=False, early_stopping=check, encoded_train=encoded,
            stem_memo=ctx.stem_memo, stem_store=StemStore(ctx.stems_dir) if ctx.stems_dir else None))
    except TrialPruned:
        client.set_tag(run_id, "tuneline.trial_state", "pruned")
        client.set_terminated(run_id, "KILLED")
        shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException as e:
        client.set_tag(run_id, "tuneline.trial_state", "failed")
        client.set_tag(run_id, "tuneline.error", f"{type(e).__name__}: {e}"[:4000])
        client.set_terminated(run_id, "FAILED")
        raise
    seconds = time.perf_counter() - t0
    value = result.validations[-1][1]
    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), result.steps) for k, v in
                                      {"final_loss": result.final_loss, "tokens_per_second": result.tokens_per_second,
                                       "train_seconds": result.seconds}.items()])
    client.set_tag(run_id, "tuneline.trial_state", "complete")
    client.set_terminated(run_id, "FINISHED")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is what a reuse needs
    (out / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "params.json").write_text(json.dumps(params, indent=2))
    return TrialOutcome(value, result.validations, result.steps, seconds, result.adapter_dir, run_id)
