"""The stages of ``tuneline run``, in order. Each takes the :class:`~tuneline.context.RunContext` and
the typed results of the stages it needs, and returns its own result, so a stage cannot run before
what it depends on:

    open_context -> eval_sets_of -> track -> plan_training -> load_base -> score_untouched
      -> train_or_reuse -> ship_adapter -> evaluate_candidate -> register -> write_card -> summarize

Order rules that are code, not comments: the base model is loaded after the training plan (its
dtype depends on the method the plan trains with); the model reaches training only through
:class:`Untouched`, the result of scoring the base model and the baselines on it; the candidate is
evaluated from :class:`Shipped`, the adapter exactly as logged and as the server will load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import tuneline
from tuneline import registry, tracking
from tuneline.artifacts import (
    ADAPTER_SHA_TAG,
    CARD_FILE,
    atomic_write_text,
    copy_dir,
    tree_sha256,
)
from tuneline.audit import record
from tuneline.baseline import BaselineReport, baseline_table
from tuneline.context import RunContext, curation_summary
from tuneline.curation import PreparedData
from tuneline.errors import Problem, SpecError, TrainingError
from tuneline.eval import EvalSet, EvalSuite, Evaluation
from tuneline.eval.classify import is_classifier
from tuneline.eval.generate import DECODING_FILE
from tuneline.eval.validate import RowSample, make_scorer, maximize, sample_rows
from tuneline.export.version_model import write_mlmodel
from tuneline.models import ModelSource, load_model, resolve_model_source
from tuneline.pipeline.evaluation import (
    described,
    eval_sets,
    evaluated_decoding,
    evaluation_items,
    finish_evaluation,
    load_adapter_model,
    new_evaluation,
)
from tuneline.pipeline.systems import (
    hybrid_retriever,
    measure_baselines,
    with_fine_tuned,
    with_retrieval,
)
from tuneline.registry import card
from tuneline.retrieval import Retriever, adapter_retriever
from tuneline.runtime import Compute
from tuneline.spec import LoadedSpec
from tuneline.spec.methods import PROMPT_LEARNING
from tuneline.spec.models import EarlyStoppingSpec, TrainSpec
from tuneline.train import EarlyStoppingCheck, TrainOptions, TrainResult, train
from tuneline.train.checkpoint import latest_checkpoint
from tuneline.train.classifier import train_classifier
from tuneline.train.distributed import current_world
from tuneline.train.dpo import train_dpo
from tuneline.train.loop import save_adapter, steps_per_epoch
from tuneline.train.peft_builders import is_prompt_learning
from tuneline.train.ranks import TrainJob, send_job
from tuneline.train.ray_train import RayJob, ray_run_name, train_on_ray
from tuneline.train.stem import StemStore
from tuneline.tune import SearchOptions, SearchResult, best_train, search
from tuneline.tune.report import search_table
from tuneline.workspace import RunState

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from tuneline.data.examples import Example
    from tuneline.spec.models import Spec

log = logging.getLogger(__name__)

EVAL_LOSS_ROWS = 500  # validation rows for the end-of-training loss (a seeded sample: it is one number)


@dataclass
class StageClock:
    """Wall seconds per stage of one run: logged as each stage ends, tracked and printed at the end
    (where a run's time goes, so a slow one can be told apart from a slow stage)."""

    seconds: dict[str, float] = dataclass_field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            log.info("stage %s took %.1fs", name, took)

    def log(self) -> None:
        """Record the seconds in the active MLflow run, one ``stage_seconds.NAME`` metric each."""
        import mlflow

        mlflow.log_metrics({f"stage_seconds.{name}": round(v, 2) for name, v in self.seconds.items()})

    def line(self) -> str:
        return ", ".join(f"{name} {v:.0f}s" for name, v in self.seconds.items())


@dataclass(frozen=True)
class Tracked:
    """The MLflow run this run tracks into (new, or the interrupted one when resuming)."""

    run_id: str
    resumed: bool
    state: RunState


@dataclass(frozen=True)
class TrainingPlan:
    """What will be trained: the one training configuration in scope from here on (the spec's, or
    the best search trial's), the search that chose it, the data it trains on (the hybrid's rows
    carry retrieved examples), the compute it needs, and the fingerprint a checkpoint must match."""

    train: TrainSpec
    search: SearchResult | None
    data: PreparedData
    retriever: Retriever | None
    compute: Compute
    fingerprint: str


class _HandsOver:
    """Holds the model for exactly one next stage: :meth:`take` returns it and drops the reference,
    so a model is never used by two stages and its memory goes when the last stage is done."""

    _model: nn.Module | None

    def take(self) -> nn.Module:
        model, self._model = self._model, None
        if model is None:
            raise RuntimeError(f"the model of {type(self).__name__} was already handed over")
        return model


@dataclass
class Untouched(_HandsOver):
    """The base model after it was scored untouched (base answers, baselines), ready to be trained."""

    _model: nn.Module | None
    evaluation: Evaluation | None
    scored_base: bool
    baselines: BaselineReport | None


@dataclass
class Trained(_HandsOver):
    """The trained model (adapter attached) and what training measured."""

    _model: nn.Module | None
    result: TrainResult


@dataclass(frozen=True)
class Shipped:
    """The adapter folder as logged to MLflow (with the spec, decoding settings and the hybrid's
    index), its tree hash, and the retriever loaded back from it as the server will."""

    adapter_dir: Path
    sha256: str
    served: Retriever | None


def announce(ctx: RunContext) -> None:
    spec, data = ctx.spec, ctx.data
    ctx.console.print(f"[bold]{spec.name}[/]: {spec.task.type}, model {spec.model}; "
                      + ", ".join(f"{s.split} {s.rows_used} rows" for s in data.sources))
    ctx.console.print(curation_summary(ctx.version), soft_wrap=True)


def eval_sets_of(ctx: RunContext) -> list[EvalSet]:
    """The test items and golden sets; a changed golden set stops the run here, before any training."""
    return eval_sets(ctx.loaded, ctx.workspace, evaluation_items(ctx.spec, ctx.data))


@contextmanager
def track(ctx: RunContext, resume: bool) -> Iterator[Tracked]:
    """Start the run's MLflow run (logging spec, data, model and code), or resume the interrupted one."""
    import mlflow

    state = ctx.workspace.run_state(ctx.spec.name)
    run_id = None
    if resume:
        if not state.exists():
            raise TrainingError(Problem(f"nothing to resume for {ctx.spec.name!r}: {state.path} not found",
                                        hint="run without --resume to start a new run"))
        run_id = state.mlflow_run_id
    with tracking.start_or_resume(ctx.loaded, ctx.workspace, run_id) as mlrun:
        tracked = Tracked(mlrun.info.run_id, resume, state)
        state.write(mlflow_run_id=tracked.run_id)
        if not resume:
            tracking.log_run_inputs(ctx.loaded, ctx.data.sources, ctx.spec.model, ctx.source.fingerprint())
            if ctx.version is not None:
                tracking.log_dataset_version(ctx.version)
            mlflow.log_params({"data.labels_count": len(ctx.data.labels or []), "device": ctx.compute.device,
                               "precision": ctx.compute.precision})
        yield tracked


def run_fingerprint(loaded: LoadedSpec, data: PreparedData, model_fingerprint: str,
                    dataset_version: str | None = None, train_cfg: TrainSpec | None = None) -> str:
    """What a checkpoint must match to be resumed: training config (after a search: the best
    trial's), data and base model."""
    spec = loaded.spec.model_dump(mode="json", include={"task", "model", "data", "curation", "train"})
    if loaded.spec.retrieval is not None:  # the hybrid trains on other prompts
        spec["retrieval"] = loaded.spec.retrieval.model_dump(mode="json")
    if loaded.spec.eval.canaries is not None:  # planted rows are trained on (curation off: no version id covers them)
        spec["canaries"] = loaded.spec.eval.canaries.model_dump(mode="json")
    if train_cfg is not None:
        spec["train"] = train_cfg.model_dump(mode="json")
    spec["train"].pop("checkpoint_every", None)
    spec["train"].pop("log_every", None)
    for where in ("distributed", "backend", "ray"):  # where and how it is spread trains the same: a
        spec["train"].pop(where, None)              # checkpoint resumes under any of them
    _drop_unused_method_sections(spec["train"])
    if spec["data"].get("preferences") is None:
        spec["data"].pop("preferences", None)
    for source in spec["data"].values():  # a declared license changes nothing trained
        if isinstance(source, dict):
            source.pop("license", None)
    sources = [s.sha256 for s in data.sources]
    if data.curated is not None and data.curated.preferences.sha256:  # dpo's pairs (curation off: no version id)
        sources.append(data.curated.preferences.sha256)
    payload = json.dumps({"spec": spec, "data": sources, "model": model_fingerprint,
                          "dataset_version": dataset_version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _drop_unused_method_sections(train: dict[str, object]) -> None:
    """The settings of methods other than ``train.method`` change nothing trained: a LoRA run's
    checkpoint stays valid when ``train.ia3`` is edited (and runs from before these sections
    existed keep their fingerprint)."""
    method = train.get("method")
    if method != "ia3":
        train.pop("ia3", None)
    if method not in PROMPT_LEARNING:
        train.pop("prompt", None)
    if method != "dpo":
        train.pop("dpo", None)
    lora = train.get("lora")
    if isinstance(lora, dict) and lora.get("layers") is None:  # every layer, as before the setting existed
        lora.pop("layers", None)


def check_distributable(ctx: RunContext) -> None:
    """In a distributed run (``--nproc``, torchrun), refuse before any work what trains in one
    process only (the classifier head's trainer and DPO's preference phase) and a training that
    starts its own workers (``train.backend: ray``)."""
    world = current_world()
    if world is None:
        return
    for field, value, alone in (("task.head", ctx.spec.task.head, "classifier"),
                                ("train.method", ctx.spec.train.method, "dpo")):
        if value == alone:
            raise SpecError(Problem(f"{field}: {value} trains in one process; it cannot run on {world.size} processes",
                                    field=field, hint="run it without --nproc (or outside torchrun)"))
    if ctx.spec.train.backend == "ray":
        raise SpecError(Problem(f"train.backend: ray starts its own {ctx.spec.train.ray.workers} workers on the Ray "
                                f"cluster; it does not run on {world.size} launched processes", field="train.backend",
                                hint="run it without --nproc (or outside torchrun), or set backend: local"))


def plan_training(ctx: RunContext, tracked: Tracked) -> TrainingPlan:
    """The hybrid's retriever, the search (when the spec has one) and the configuration it picks,
    the compute that configuration needs, and the fingerprint; recorded in the run state."""
    # the hybrid trains (and validates) on prompts with retrieved examples; evaluation and the
    # baselines start from the plain rows and augment per system, as the server does
    retriever = hybrid_retriever(ctx)
    # the memorization probe's canaries (eval.canaries) are trained on, never evaluated on as data
    trained_on = with_retrieval(ctx.data, retriever).with_canary_rows(retriever.augment if retriever else None)
    train_cfg, found = ctx.spec.train, None
    if ctx.spec.search is not None:
        found = search(ctx, data=trained_on, options=SearchOptions(resume=tracked.resumed,
                                                                   parent_run_id=tracked.run_id))
        if found.best is None:
            raise TrainingError(Problem(f"no search trial completed ({found.counts()})",
                                        hint="see the trials above; widen the space or raise search.trials"))
        train_cfg = best_train(ctx.spec, found)
        _log_search(ctx, found)
    fingerprint = run_fingerprint(ctx.loaded, ctx.data, ctx.source.fingerprint(), ctx.version_id, train_cfg)
    tracked.state.write(mlflow_run_id=tracked.run_id, fingerprint=fingerprint)
    compute = Compute.resolve(train_cfg.precision, train_cfg.method, ctx.compute.device)
    return TrainingPlan(train_cfg, found, trained_on, retriever, compute, fingerprint)


def _log_search(ctx: RunContext, found: SearchResult) -> None:
    """The trials table on the console; the best values as this run's params."""
    import mlflow

    assert found.best is not None
    ctx.console.print(search_table(found))
    mlflow.log_params({f"search.best.{k}": v for k, v in found.best_params.items()})
    mlflow.set_tags({"tuneline.study": found.study_name, "tuneline.search_best_trial": str(found.best.number)})
    mlflow.log_dict(found.to_dict(), "search/summary.json")


def load_base(ctx: RunContext, plan: TrainingPlan) -> nn.Module:
    """The base model, in the dtype the planned method trains it in (bf16 frozen weights for an
    adapter computed in bf16; fp32 master weights for full fine-tuning), unquantized: QLoRA's base
    is scored as it is served, and loaded quantized for its training (:func:`train_or_reuse`)."""
    return load_model(ctx.source, ctx.workspace.models_dir, device=plan.compute.device,
                      dtype=plan.compute.served_dtype)


def score_untouched(ctx: RunContext, tracked: Tracked, sets: list[EvalSet], model: nn.Module) -> Untouched:
    """Score the base model and measure the baselines, both on the untouched model, before training
    changes it. A resumed run skips both (its base is the trained model minus the adapter)."""
    evaluation = new_evaluation(ctx, sets) if sets else None
    scored_base = False
    if evaluation is not None and ctx.spec.eval.compare_base and not tracked.resumed:
        evaluation.score_system("base", model, ctx.spec.model)
        scored_base = True
    baselines = None
    if ctx.spec.baseline.enabled and evaluation_items(ctx.spec, ctx.data) and not tracked.resumed:
        answered = None
        if evaluation is not None and ("test", "base") in evaluation.answers:
            answered = (evaluation.sets[0].examples, evaluation.answers[("test", "base")])
        baselines = measure_baselines(ctx, model, answered)
    return Untouched(model, evaluation, scored_base, baselines)


def train_or_reuse(ctx: RunContext, plan: TrainingPlan, tracked: Tracked, untouched: Untouched) -> Trained:
    """Train the plan's configuration (resuming from the last checkpoint when asked), or take the
    best search trial's adapter when it already trained on every training row with these values."""
    import mlflow

    found, model = plan.search, untouched.take()
    if found is not None and found.reusable_adapter and not tracked.resumed:
        return _reuse_trial(ctx, found, model)
    # a resumed search run may have stopped before training began: then train from the start
    resume = tracked.resumed and (found is None or latest_checkpoint(ctx.run_dir / "checkpoints") is not None)
    cfg = plan.train
    mlflow.set_tag("tuneline.base_dtype", plan.compute.base_dtype)  # the base weights as trained on
    if cfg.backend == "ray":
        return _train_on_ray(ctx, plan, tracked, model, resume)
    quantized = plan.compute.base_dtype != plan.compute.served_dtype
    if quantized:  # qlora: the scored base goes; training loads it quantized
        del model
        model = load_model(ctx.source, ctx.workspace.models_dir, device=plan.compute.device,
                           dtype=plan.compute.base_dtype)
    # task.head: classifier trains a sequence-classification head with LoRA (tuneline.train.classifier)
    trainer = partial(train_classifier, labels=ctx.data.labels or []) if ctx.spec.task.head == "classifier" else train
    world = current_world()
    if world is not None:  # the other ranks train their share of every step alongside this one
        send_job(world, TrainJob(cfg, ctx.source, ctx.workspace.models_dir, plan.compute.base_dtype, ctx.tokenizer,
                                 plan.data.train, ctx.run_dir, resume, plan.fingerprint))
    with tracking.MetricBatcher(tracked.run_id, cfg.log_every) as on_step:
        model, result = trainer(cfg, model, ctx.tokenizer, plan.data.train, ctx.run_dir, TrainOptions(
            resume=resume, eval_examples=_eval_loss_rows(plan), fingerprint=plan.fingerprint,
            device=plan.compute.device, on_step=on_step, show_progress=ctx.show_progress,
            early_stopping=_early_stopping(ctx, plan), world=world, stem_store=StemStore(ctx.workspace.stems_dir)))
    if cfg.method == "dpo":
        _preference_phase(ctx, plan, model, resume)
    _log_result(result)
    if quantized:  # evaluated as it is served: the adapter merged into the unquantized base
        del model
        model = load_adapter_model(ctx.source, ctx.workspace, result.adapter_dir, plan.compute.device,
                                   plan.compute.served_dtype)
    return Trained(model, result)


def _eval_loss_rows(plan: TrainingPlan) -> list[Example] | None:
    return sample_rows(plan.data.eval, EVAL_LOSS_ROWS, plan.train.seed) or None


def _log_result(result: TrainResult) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in result.to_dict().items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None},
                       step=result.steps)


def _ray_storage(ctx: RunContext, given: str | None) -> str:
    """Ray Train's storage: a URI (s3://...) as given, a path relative to the spec's folder (as the
    spec's data paths are), or the workspace's ray folder."""
    if given is None:
        return str(ctx.workspace.ray_dir.resolve())
    return given if "://" in given else str(ctx.loaded.resolve(given).resolve())


def _train_on_ray(ctx: RunContext, plan: TrainingPlan, tracked: Tracked, model: nn.Module, resume: bool) -> Trained:
    """``train.backend: ray``: the training as a Ray Train job; its adapter (or whole model), copied
    into the run folder, is then put on this process's base model for the evaluation."""
    cfg = plan.train
    job = TrainJob(cfg, ctx.source, ctx.workspace.models_dir, plan.compute.base_dtype, ctx.tokenizer,
                   plan.data.train, ctx.run_dir, resume, plan.fingerprint)
    validation = _Validation.of(ctx, plan) if cfg.early_stopping is not None else None
    ray_job = RayJob(job, _eval_loss_rows(plan), validation,
                     (tracking.tracking_uri(ctx.loaded, ctx.workspace), tracked.run_id),
                     threads=max(1, int(cfg.ray.cpus_per_worker)))
    result = train_on_ray(cfg.ray, ray_job, _ray_storage(ctx, cfg.ray.storage), ray_run_name(ctx.run_dir, tracked.run_id),
                          ctx.show_progress)
    _log_result(result)
    folder = Path(result.adapter_dir)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return Trained(PeftModel.from_pretrained(model, str(folder)), result)
    del model  # full fine-tuning: the trained model is whole in the folder
    return Trained(load_model(resolve_model_source(str(folder), folder), ctx.workspace.models_dir,
                              device=plan.compute.device, dtype=plan.compute.base_dtype), result)


def _preference_phase(ctx: RunContext, plan: TrainingPlan, model: nn.Module, resume: bool) -> None:
    """DPO on the version's preference pairs, continuing the adapter just trained on the rows; the
    adapter folder is saved again and the phase's measures are logged (``dpo_*`` metrics)."""
    import mlflow

    peft_model = cast("PeftModel", model)
    result = train_dpo(plan.train, peft_model, ctx.tokenizer, plan.data.preferences, ctx.run_dir, resume=resume,
                       device=plan.compute.device, show_progress=ctx.show_progress)
    save_adapter(peft_model, ctx.tokenizer, ctx.run_dir / "adapter")
    atomic_write_text(ctx.run_dir / "dpo_result.json", json.dumps(result.to_dict(), indent=2) + "\n")
    mlflow.log_metrics({"dpo_pairs": result.pairs, "dpo_steps": result.steps, "dpo_seconds": result.seconds,
                        "dpo_loss": result.final_loss, "dpo_reward_margin": result.reward_margin,
                        "dpo_reward_accuracy": result.reward_accuracy})
    ctx.console.print(f"preference tuning (DPO): {result.pairs} pairs, {result.steps} steps in {result.seconds:.0f}s, "
                      f"loss {result.final_loss:.4f}, reward margin {result.reward_margin:+.3f}, "
                      f"chosen preferred on {result.reward_accuracy:.0%} of the last batch")


def _early_stopping(ctx: RunContext, plan: TrainingPlan) -> EarlyStoppingCheck | None:
    """The validation that stops a run on a plateau and keeps its best weights (None when off)."""
    if plan.train.early_stopping is None:
        return None
    return _Validation.of(ctx, plan)(plan.compute.device, plan.compute.precision)


@dataclass(frozen=True)
class _Validation:
    """How to make the early-stopping check, wherever the training runs (sent to a Ray worker,
    which makes it for its own device)."""

    spec: Spec
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    labels: list[str] | None
    es: EarlyStoppingSpec
    seed: int
    every: int

    @classmethod
    def of(cls, ctx: RunContext, plan: TrainingPlan) -> _Validation:
        cfg = plan.train
        assert cfg.early_stopping is not None
        every = max(1, round(cfg.early_stopping.every * steps_per_epoch(len(plan.data.train), cfg)))
        return cls(ctx.spec, ctx.tokenizer, plan.data.eval, ctx.data.labels, cfg.early_stopping, cfg.seed, every)

    def __call__(self, device: str, precision: str) -> EarlyStoppingCheck:
        metric = self.es.metric or self.spec.objective.primary
        score = make_scorer(self.spec, self.tokenizer, self.examples, self.labels, metric, precision=precision,
                            device=device, sample=RowSample(self.es.rows, self.seed))
        return EarlyStoppingCheck(every=self.every, score=score, maximize=maximize(metric), patience=self.es.patience,
                                  min_delta=self.es.min_delta, keep_best=True)


def _reuse_trial(ctx: RunContext, found: SearchResult, model: nn.Module) -> Trained:
    """The best trial trained on every training row with these values: use its adapter, do not retrain."""
    from peft import PeftModel

    assert found.reusable_adapter is not None and found.best is not None
    src = Path(found.reusable_adapter)
    dest = ctx.run_dir / "adapter"
    copy_dir(src, dest)  # the previous adapter stays whole until the copy is
    result = TrainResult.from_saved(json.loads((src.parent / "train_result.json").read_text()), dest)
    ctx.console.print(f"reusing trial {found.best.number}'s adapter: it trained on every training row with the best values")
    return Trained(PeftModel.from_pretrained(model, str(dest)), result)


def ship_adapter(ctx: RunContext, plan: TrainingPlan, trained: Trained) -> Shipped:
    """Complete the adapter folder as the server loads it (the spec, the decoding settings the
    candidate is evaluated with, the hybrid's index) and as MLflow loads it (MLmodel), log it to
    MLflow and hash it as logged."""
    import mlflow

    result, spec = trained.result, ctx.spec
    folder = Path(result.adapter_dir)
    name_base_portably(folder, ctx.source)
    atomic_write_text(folder / "tuneline.yaml", ctx.loaded.text)
    # how the candidate was evaluated: the server answers with these settings (tuneline.serve)
    atomic_write_text(folder / DECODING_FILE, json.dumps(evaluated_decoding(spec).to_dict(), indent=2) + "\n")
    served = None  # the hybrid: the retriever shipped with the adapter, loaded back as the server will
    if plan.retriever is not None and spec.retrieval is not None:
        plan.retriever.index.copy_to(folder, spec.retrieval.k)
        served = adapter_retriever(folder, encoders={plan.retriever.encoder.fingerprint: plan.retriever.encoder})
    write_mlmodel(folder)  # MLflow loads the version too: models:/NAME@production (tuneline.export.version_model)
    mlflow.log_artifacts(str(folder), "adapter")
    shipped = Shipped(folder, tree_sha256(folder), served)  # the folder exactly as logged
    _print_training(ctx, plan, result)
    run = mlflow.active_run()
    record(ctx.workspace, "train", subject=f"spec:{spec.name}",
           inputs={"spec": ctx.loaded.sha256, "base_model": ctx.source.fingerprint(),
                   **({"dataset": ctx.version_id} if ctx.version_id else {})},
           outputs={"adapter": shipped.sha256, **({"run": run.info.run_id} if run is not None else {})},
           details={"method": plan.train.method, "steps": result.steps, "seconds": round(result.seconds, 1)})
    return shipped


def name_base_portably(folder: Path, source: ModelSource) -> None:
    """The adapter names its base as another machine can read it: ``base_model_name_or_path`` is the
    hub id (or the spec's name for a local model; PEFT wrote this machine's path), and
    :data:`~tuneline.registry.card.BASE_MODEL_FILE` beside it holds that name with the weights'
    fingerprint. PEFT's README.md (a template naming the base by that path) goes: the model card
    takes its place once the version is registered."""
    config = folder / "adapter_config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        saved["base_model_name_or_path"] = source.portable_name
        if saved.get("tokenizer_name_or_path"):  # prompt tuning from init_text read the base's tokenizer there
            saved["tokenizer_name_or_path"] = source.portable_name
        atomic_write_text(config, json.dumps(saved, indent=2, sort_keys=True))  # peft's own layout
    base = {"base_model_name_or_path": source.portable_name, "kind": source.kind, "fingerprint": source.fingerprint()}
    atomic_write_text(folder / card.BASE_MODEL_FILE, json.dumps(base, indent=2) + "\n")
    (folder / CARD_FILE).unlink(missing_ok=True)


def _print_training(ctx: RunContext, plan: TrainingPlan, result: TrainResult) -> None:
    console, cfg = ctx.console, plan.train
    console.print(f"trained {result.steps} steps in {result.seconds:.0f}s "
                  f"({result.tokens_per_second:.0f} tok/s, final loss {result.final_loss:.4f}); "
                  f"adapter: {result.adapter_dir}")
    if result.best_step is not None and cfg.early_stopping is not None:
        console.print(f"early stopping: {'stopped at step ' + str(result.steps) if result.stopped_early else 'ran all steps'}"
                      f"; kept the best weights, step {result.best_step} (validation "
                      f"{cfg.early_stopping.metric or ctx.spec.objective.primary} {result.best_value:.4f})")
    if result.dropped_too_long:  # the configuration trained, not the spec's (a search may change seq_len)
        console.print(f"[yellow]dropped {result.dropped_too_long} training examples longer than "
                      f"train.seq_len={cfg.seq_len}[/]")


def evaluate_candidate(ctx: RunContext, plan: TrainingPlan, untouched: Untouched, trained: Trained,
                       shipped: Shipped) -> EvalSuite | None:
    """Score the candidate as served (adapter merged, the hybrid's retriever from the shipped folder)
    beside the base and production models, add the baselines, record and print; None without sets."""
    from peft import PeftModel

    evaluation = untouched.evaluation
    if evaluation is None:
        return None
    model = trained.take()
    # (not a classifier head: without its adapter the head is untrained; its base is the generative one)
    if (not untouched.scored_base and ctx.spec.eval.compare_base and isinstance(model, PeftModel)
            and not is_classifier(model)):
        with model.disable_adapter():  # resumed LoRA run: the base is the model minus the adapter
            evaluation.score_system("base", model, ctx.spec.model)
    if isinstance(model, PeftModel) and not is_prompt_learning(model):
        # the adapter is saved; generate with it merged into the base weights, as it would be
        # served, instead of computing the adapter products for every generated token (virtual
        # tokens are no weights to merge: prefix and prompt tuning answer as the peft model)
        model.merge_adapter()
    served = shipped.served
    evaluation.score_system("candidate", model, described(shipped.adapter_dir, served),
                            served.augment if served else None)
    del model
    baselines = untouched.baselines

    def add_baselines(suite: EvalSuite) -> None:
        if baselines is not None:
            with_fine_tuned(ctx, baselines, suite, trained.result.seconds, served)
            suite.baselines = baselines.to_dict()
            ctx.console.print(baseline_table(baselines))

    return finish_evaluation(ctx, evaluation, plan.compute.served_dtype, before_record=add_baselines)


def register(ctx: RunContext, tracked: Tracked, shipped: Shipped, report: EvalSuite | None) -> int:
    """Register the logged adapter as the next version of the spec's model (alias ``candidate``),
    tagged with the spec, data, code and base model it came from and its gate results."""
    import mlflow

    loaded = ctx.loaded
    tags = registry.version_tags(
        spec_sha256=loaded.sha256, dataset_version=ctx.version_id,
        code_version=tracking.git_sha(loaded.base_dir) or f"tuneline {tuneline.__version__}",
        base_model=loaded.spec.model, base_fingerprint=ctx.source.fingerprint(), suite=report)
    tags[ADAPTER_SHA_TAG] = shipped.sha256
    version = registry.register_version(tracking.tracking_uri(loaded, ctx.workspace), loaded.spec.name,
                                       tracked.run_id, mlflow.get_artifact_uri("adapter"), tags)
    gates = registry.gate_state_of(report) if report else registry.GATE_NOT_EVALUATED
    name = loaded.spec.name
    record(ctx.workspace, "register", subject=f"model:{name}/{version}",
           inputs={"run": tracked.run_id, "adapter": shipped.sha256, "spec": loaded.sha256,
                   **({"dataset": ctx.version_id} if ctx.version_id else {})},
           outputs={"model": f"{name}/{version}"}, details={"alias": "candidate", "gates": gates})
    ctx.console.print(f"registered as {name} version {version} (alias candidate); "
                      + (f"promote it with `tuneline promote {name} {version}`" if gates == registry.GATE_PASSED
                         else f"gates {gates}, so `tuneline promote` will refuse it without --force --reason"))
    return version


def write_card(ctx: RunContext, shipped: Shipped, report: EvalSuite | None, version: int) -> Path:
    """The registered version's model card (:mod:`tuneline.registry.card`): README.md in the adapter
    folder, logged beside the adapter (``adapter/README.md``) and its hash tagged on the version.
    The adapter's hash leaves the card out, so the version's recorded hash still holds."""
    import mlflow

    uri, name = tracking.tracking_uri(ctx.loaded, ctx.workspace), ctx.spec.name
    text = card.render(card.gather(uri, ctx.workspace, name, version, suite=report, spec=ctx.spec))
    path = shipped.adapter_dir / CARD_FILE
    atomic_write_text(path, text)
    mlflow.log_artifact(str(path), "adapter")
    mlflow.MlflowClient(tracking_uri=uri).set_model_version_tag(name, str(version), card.CARD_SHA_TAG,
                                                                card.card_sha256(text))
    ctx.console.print(f"model card: {path} (`tuneline card {name} {version}`)", soft_wrap=True)
    return path


def summarize(ctx: RunContext, tracked: Tracked, started: float, clock: StageClock | None = None) -> float:
    """Print where to see the run (and where its time went); return its wall time in seconds."""
    seconds = time.perf_counter() - started
    if clock is not None and clock.seconds:
        ctx.console.print(f"time by stage: {clock.line()}", soft_wrap=True)
    ctx.console.print(f"run {tracked.run_id} finished in {seconds:.0f}s; see it with `tuneline runs` or `mlflow ui "
                      f"--backend-store-uri {tracking.tracking_uri(ctx.loaded, ctx.workspace)}`")
    return seconds
