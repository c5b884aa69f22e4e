"""Run a spec end to end: data -> base-model evaluation -> training -> evaluation -> tracking."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.artifacts import ADAPTER_SHA_TAG, atomic_write_text, replace_dir, tree_sha256
from tuneline.baseline import baseline_table
from tuneline.curation import DatasetVersion, PreparedData, prepare
from tuneline.errors import Problem, TrainingError
from tuneline.eval import (
    EvalSet,
    EvalSuite,
    Evaluation,
    describe_failures,
    flat_metrics,
    load_golden,
    render_tables,
)
from tuneline.eval.generate import DECODING_FILE, Decoding
from tuneline.eval.validate import sample_rows
from tuneline.models import load_model, load_tokenizer, resolve_model_source
from tuneline.runtime import Compute, autocast_for
from tuneline.spec import LoadedSpec, load_spec
from tuneline.train import TrainOptions, TrainResult, train
from tuneline.train.checkpoint import latest_checkpoint
from tuneline.workspace import Workspace

log = logging.getLogger(__name__)

EVAL_LOSS_ROWS = 500  # validation rows for the end-of-training loss (a seeded sample: it is one number)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    train: TrainResult
    report: EvalSuite | None
    seconds: float
    model_version: int | None = None  # the registered version (alias `candidate`)

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed


def decoding_mismatch(spec: Any, adapter_dir: str | Path) -> str | None:
    """Why evaluating the adapter in ``adapter_dir`` under ``spec`` would not score what the server
    answers: its recorded ``decoding.json`` differs from the spec's settings now (None when they
    agree or nothing is recorded)."""
    from tuneline.eval.generate import read_decoding

    recorded = read_decoding(adapter_dir)
    now = evaluated_decoding(spec)
    if recorded is None or recorded == now:
        return None
    changed = [f"{k} {v!r} -> {now.to_dict()[k]!r}" for k, v in recorded.to_dict().items() if v != now.to_dict()[k]]
    return (f"the adapter records other decoding settings than the spec has now ({', '.join(changed)}): this "
            "evaluation uses the spec's, the server answers with the adapter's decoding.json")


def evaluated_decoding(spec: Any) -> Decoding:
    """The decoding settings evaluation used for ``spec``'s fine-tuned model. Classification with
    label-constrained decoding decodes greedily (only the token limit of ``decoding`` applies)."""
    decoding = Decoding.of(spec.decoding)
    if spec.task.type == "classification" and spec.eval.constrain_to_labels:
        return Decoding(max_new_tokens=decoding.max_new_tokens)
    return decoding


def validate(spec_path: str | Path) -> tuple[LoadedSpec, PreparedData]:
    """Check the spec and every row of its data; raise with all problems found. Trains nothing.

    Runs without the tokenizer (no model needed), so the too-long check is left to ``data prepare``
    and ``run``."""
    loaded = load_spec(spec_path)
    return loaded, prepare(loaded)


def prepare_version(
    loaded: LoadedSpec, ws: Workspace, tokenizer: Any = None,
) -> tuple[PreparedData, DatasetVersion | None]:
    """Curate the spec's data and store it as a dataset version (unless curation is disabled)."""
    from tuneline.curation import save_version

    if tokenizer is None:
        source = resolve_model_source(loaded.spec.model, loaded.base_dir)
        tokenizer = load_tokenizer(source, ws.models_dir)
    data = prepare(loaded, tokenizer)
    if data.curated is None or not loaded.spec.curation.enabled:
        return data, None
    return data, save_version(data.curated, ws.datasets_dir, loaded.spec.name, loaded.sha256)


def curation_summary(data: PreparedData, version: DatasetVersion | None) -> str:
    """One line: the version id, rows per split, drops per reason, PII found."""
    if version is None:
        return "curation off"
    m = version.manifest
    rows = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items() if v)
    dropped = ", ".join(f"{k} {v:,}" for k, v in m["dropped_by_reason"].items()) or "none"
    pii = ", ".join(f"{k} {v:,}" for k, v in m["pii_found"].items()) or "none"
    return f"dataset {version.id}: {rows}; dropped: {dropped}; PII redacted: {pii}"


def run_fingerprint(loaded: LoadedSpec, data: PreparedData, model_fingerprint: str,
                    dataset_version: str | None = None, train_cfg: Any = None) -> str:
    """What a checkpoint must match to be resumed: training config (after a search: the best
    trial's), data and base model."""
    spec = loaded.spec.model_dump(mode="json", include={"task", "model", "data", "curation", "train"})
    if loaded.spec.retrieval is not None:  # the hybrid trains on other prompts
        spec["retrieval"] = loaded.spec.retrieval.model_dump(mode="json")
    if train_cfg is not None:
        spec["train"] = train_cfg.model_dump(mode="json")
    spec["train"].pop("checkpoint_every", None)
    spec["train"].pop("log_every", None)
    payload = json.dumps({"spec": spec, "data": [s.sha256 for s in data.sources], "model": model_fingerprint,
                          "dataset_version": dataset_version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def run(
    spec_path: str | Path,
    *,
    workspace: str | Path | Workspace | None = None,
    resume: bool = False,
    show_progress: bool = True,
    console: Any = None,
) -> RunResult:
    """Run the whole pipeline for one spec and return what it produced (also tracked in MLflow)."""
    import mlflow
    from rich.console import Console

    console = console or Console()
    t0 = time.perf_counter()
    ws, loaded, source, tokenizer, (data, version) = _prepare(spec_path, workspace)
    spec = loaded.spec
    console.print(f"[bold]{spec.name}[/]: {spec.task.type}, model {spec.model}; "
                  + ", ".join(f"{s.split} {s.rows_used} rows" for s in data.sources))
    console.print(curation_summary(data, version), soft_wrap=True)
    device, precision, base_dtype = _compute(spec)
    model = load_model(source, ws.models_dir, device=device, dtype=base_dtype)
    run_dir = ws.run_dir(spec.name)
    state_file = run_dir / "run.json"
    test = evaluation_items(spec, data)
    sets = eval_sets(loaded, ws, test)  # a changed golden set stops the run here, before any training

    mlflow_run_id = None
    if resume:
        if not state_file.is_file():
            raise TrainingError(Problem(f"nothing to resume for {spec.name!r}: {state_file} not found",
                                        hint="run without --resume to start a new run"))
        mlflow_run_id = json.loads(state_file.read_text()).get("mlflow_run_id")

    import tuneline.tracking as tracking

    if mlflow_run_id:
        mlflow.set_tracking_uri(tracking.tracking_uri(loaded, ws))
        active = mlflow.start_run(run_id=mlflow_run_id)
    else:
        active = tracking.start_run(loaded, ws)
    with active as mlrun:
        run_id = mlrun.info.run_id
        atomic_write_text(state_file, json.dumps({"mlflow_run_id": run_id}, indent=2))
        if not resume:
            tracking.log_run_inputs(loaded, data.sources, spec.model, source.fingerprint())
            if version is not None:
                tracking.log_dataset_version(version)
            mlflow.log_params({"data.labels_count": len(data.labels or []), "device": device, "precision": precision})

        evaluation = Evaluation(spec, tokenizer, sets, data.labels, autocast=autocast_for(precision, device),
                                device=device, show_progress=show_progress) if sets else None
        # the hybrid trains (and validates) on prompts with retrieved examples; evaluation and the
        # baselines start from the plain rows and augment per system, as the server does
        retriever = hybrid_retriever(loaded, ws, data, version, device, console)
        trained_on = with_retrieval(data, retriever)
        train_cfg, found = spec.train, None
        if spec.search is not None:  # search -> train the best configuration -> evaluate
            from tuneline.tune import best_train, search

            found = search(loaded, ws, data=trained_on, version=version, tokenizer=tokenizer, source=source, device=device,
                           precision=precision, dtype=base_dtype, resume=resume, parent_run_id=run_id,
                           console=console, show_progress=show_progress)
            if found.best is None:
                raise TrainingError(Problem(f"no search trial completed ({found.counts()})",
                                            hint="see the trials above; widen the space or raise search.trials"))
            train_cfg = best_train(spec, found)
            _log_search(found, console)
        fingerprint = run_fingerprint(loaded, data, source.fingerprint(), version.id if version else None, train_cfg)
        atomic_write_text(state_file, json.dumps({"mlflow_run_id": run_id, "fingerprint": fingerprint}, indent=2))

        scored_base = False
        if evaluation is not None and spec.eval.compare_base and not resume:
            evaluation.score_system("base", model, spec.model)  # before training, on the untouched model
            scored_base = True
        baselines = None
        if spec.baseline.enabled and test and not resume:  # the cheaper options, on the untouched model
            answered = None
            if scored_base and evaluation is not None and ("test", "base") in evaluation.answers:
                answered = (evaluation.sets[0].examples, evaluation.answers[("test", "base")])
            baselines = measure_baselines(loaded, ws, tokenizer, model, data, device, precision, show_progress,
                                          answered)

        pending: list[Any] = []

        def flush() -> None:
            if pending:
                mlflow.MlflowClient().log_batch(run_id, metrics=pending)
                pending.clear()

        def on_step(step: int, metrics: dict[str, float]) -> None:
            # every step's values, written in batches: one SQLite commit costs ~25 ms here
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            if step % spec.train.log_every == 0:
                flush()

        try:
            if found is not None and found.reusable_adapter and not resume:
                model, result = _reuse_trial(model, found, run_dir, tokenizer, console)
            else:
                # a resumed search run may have stopped before training began: then train from the start
                train_resume = resume and (found is None or latest_checkpoint(run_dir / "checkpoints") is not None)
                model, result = train(train_cfg, model, tokenizer, trained_on.train, run_dir, TrainOptions(
                    resume=train_resume,
                    eval_examples=sample_rows(trained_on.eval, EVAL_LOSS_ROWS, train_cfg.seed) or None,
                    fingerprint=fingerprint, device=device, on_step=on_step, show_progress=show_progress,
                    early_stopping=_early_stopping(loaded, train_cfg, tokenizer, trained_on, precision, device),
                ))
        finally:
            flush()
        mlflow.log_metrics({k: float(v) for k, v in result.to_dict().items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None},
                           step=result.steps)
        atomic_write_text(Path(result.adapter_dir) / "tuneline.yaml", loaded.text)
        # how the candidate was evaluated: the server answers with these settings (tuneline.serve)
        atomic_write_text(Path(result.adapter_dir) / DECODING_FILE,
                          json.dumps(evaluated_decoding(spec).to_dict(), indent=2) + "\n")
        served = None  # the hybrid: the retriever shipped with the adapter, loaded back as the server will
        if retriever is not None and spec.retrieval is not None:
            from tuneline.retrieval import adapter_retriever

            retriever.index.copy_to(result.adapter_dir, spec.retrieval.k)
            served = adapter_retriever(result.adapter_dir, encoders={retriever.encoder.fingerprint: retriever.encoder})
        mlflow.log_artifacts(result.adapter_dir, "adapter")
        adapter_sha256 = tree_sha256(result.adapter_dir)  # the folder exactly as logged
        console.print(f"trained {result.steps} steps in {result.seconds:.0f}s "
                      f"({result.tokens_per_second:.0f} tok/s, final loss {result.final_loss:.4f}); "
                      f"adapter: {result.adapter_dir}")
        if result.best_step is not None and train_cfg.early_stopping is not None:
            console.print(f"early stopping: {'stopped at step ' + str(result.steps) if result.stopped_early else 'ran all steps'}"
                          f"; kept the best weights, step {result.best_step} (validation "
                          f"{train_cfg.early_stopping.metric or spec.objective.primary} {result.best_value:.4f})")
        if result.dropped_too_long:
            console.print(f"[yellow]dropped {result.dropped_too_long} training examples longer than "
                          f"train.seq_len={spec.train.seq_len}[/]")

        report = None
        if evaluation is not None:
            if not scored_base and spec.eval.compare_base and hasattr(model, "disable_adapter"):
                with model.disable_adapter():  # resumed LoRA run: the base is the model minus the adapter
                    evaluation.score_system("base", model, spec.model)
            if hasattr(model, "merge_adapter"):
                # the adapter is saved; generate with it merged into the base weights, as it would be
                # served, instead of computing the adapter products for every generated token
                model.merge_adapter()
            evaluation.score_system("candidate", model, _described(result.adapter_dir, served),
                                    served.augment if served else None)
            del model

            def add_baselines(suite: EvalSuite) -> None:
                if baselines is not None:
                    _with_fine_tuned(baselines, suite, loaded, tokenizer, data, result.seconds, served)
                    suite.baselines = baselines.to_dict()
                    console.print(baseline_table(baselines))

            report = _finish_evaluation(evaluation, loaded, ws, source, device, base_dtype, run_dir, console,
                                        before_record=add_baselines)
        model_version = _register(loaded, ws, source, run_id, version.id if version else None, report, adapter_sha256)
        from tuneline import registry

        gates = registry.gate_state_of(report) if report else registry.GATE_NOT_EVALUATED
        console.print(f"registered as {spec.name} version {model_version} (alias candidate); "
                      + ("promote it with `tuneline promote " + f"{spec.name} {model_version}`"
                         if gates == registry.GATE_PASSED
                         else f"gates {gates}, so `tuneline promote` will refuse it without --force --reason"))
    seconds = time.perf_counter() - t0
    console.print(f"run {run_id} finished in {seconds:.0f}s; see it with `tuneline runs` or `mlflow ui "
                  f"--backend-store-uri {tracking.tracking_uri(loaded, ws)}`")
    return RunResult(run_id, run_dir, result, report, seconds, model_version)


def measure_baselines(loaded: LoadedSpec, ws: Workspace, tokenizer: Any, model: Any, data: PreparedData,
                      device: str, precision: str, show_progress: bool,
                      answered: tuple[list[Any], Any] | None = None) -> Any:
    """Prompt only, few-shot, retrieval and the embedding classifier on the test rows (base model).
    ``answered``: (prompts, answers) the evaluation already has from this model; an option with the
    same prompts (prompt-only outside classification) reuses them instead of generating again."""
    from tuneline.baseline import Context, measure
    from tuneline.retrieval.encoder import load_encoder

    spec = loaded.spec
    needs_encoder = any(o in spec.baseline.options for o in ("retrieval", "embedding"))
    encoder = (load_encoder(spec.baseline.encoder, loaded.base_dir, ws.root / "embeddings", device=device)
               if needs_encoder else None)
    ctx = Context(spec=spec, tokenizer=tokenizer, model=model, train=data.train, validation=data.eval,
                  test=evaluation_items(spec, data), labels=data.labels, autocast=autocast_for(precision, device),
                  device=device, encoder=encoder, show_progress=show_progress, answered=answered)
    return measure(ctx)


def _with_fine_tuned(report: Any, suite: EvalSuite, loaded: LoadedSpec, tokenizer: Any, data: PreparedData,
                     train_seconds: float, retriever: Any = None) -> None:
    """Add the evaluated candidate (cost: its training time; the hybrid's: plus indexing) and recommend."""
    import numpy as np

    from tuneline.baseline import SystemCosts, add_system, recommend
    from tuneline.data.tokenize import encode_prompt

    test = evaluation_items(loaded.spec, data)
    prompts = retriever.augment(test) if retriever is not None and test else test
    lat = suite.latency
    name, what = (("hybrid", f"fine-tuned with the {retriever.k} nearest training examples in its prompt (cost: "
                             "indexing and training)") if retriever is not None
                  else ("fine_tuned", "the fine-tuned candidate (cost: its training time)"))
    one_off = train_seconds + (float(retriever.index.meta.get("seconds", 0.0)) if retriever is not None else 0.0)
    add_system(report, name, what, suite.main_set(), loaded.spec, data.labels, SystemCosts(
        one_off, lat.p50_ms if lat else None, lat.p95_ms if lat else None,
        float(np.mean([len(encode_prompt(tokenizer, ex)) for ex in prompts])) if prompts else None))
    recommend(report, loaded.spec.eval.bootstrap)


def hybrid_retriever(loaded: LoadedSpec, ws: Workspace, data: PreparedData, version: DatasetVersion | None,
                     device: str, console: Any = None) -> Any:
    """The spec's retrieval index over its training rows (built once per dataset version and
    encoder) with ``retrieval.k``; None when the spec has no ``retrieval``."""
    cfg = loaded.spec.retrieval
    if cfg is None:
        return None
    from tuneline.retrieval import Retriever, build_index, index_folder
    from tuneline.retrieval.encoder import load_encoder

    if not data.train:
        raise TrainingError(Problem("retrieval needs training rows to retrieve from", field="retrieval"))
    encoder = load_encoder(cfg.encoder, loaded.base_dir, ws.root / "embeddings", device=device,
                           field="retrieval.encoder")
    folder = index_folder(ws.root, version.id if version else None, data.train, encoder)
    index = build_index(data.train, encoder, folder, version.id if version else None)
    if console is not None:
        console.print(f"hybrid: the {cfg.k} nearest of {len(index.examples):,} training rows in every prompt "
                      f"({cfg.encoder}, index {folder})", soft_wrap=True)
    return Retriever(index, encoder, cfg.k)


def with_retrieval(data: PreparedData, retriever: Any) -> PreparedData:
    """``data`` as the hybrid trains on it: training rows with their nearest other training rows,
    validation rows with their nearest training rows (test rows stay plain: evaluation augments
    them per system). ``data`` itself without a retriever."""
    if retriever is None:
        return data
    from dataclasses import replace

    return replace(data, train=retriever.augment_training(data.train), eval=retriever.augment(data.eval))


def _described(adapter_dir: Any, retriever: Any) -> str:
    return str(adapter_dir) + (f" + the {retriever.k} nearest training examples" if retriever is not None else "")


def _early_stopping(loaded: LoadedSpec, cfg: Any, tokenizer: Any, data: PreparedData, precision: str,
                    device: str) -> Any:
    """The validation that stops a run on a plateau and keeps its best weights (None when off)."""
    es = cfg.early_stopping
    if es is None:
        return None
    from tuneline.eval.validate import RowSample, make_scorer, maximize
    from tuneline.train.loop import EarlyStoppingCheck, steps_per_epoch

    metric = es.metric or loaded.spec.objective.primary
    score = make_scorer(loaded.spec, tokenizer, data.eval, data.labels, metric, precision=precision, device=device,
                        sample=RowSample(es.rows, cfg.seed))
    every = max(1, round(es.every * steps_per_epoch(len(data.train), cfg)))
    return EarlyStoppingCheck(every=every, score=score, maximize=maximize(metric), patience=es.patience,
                      min_delta=es.min_delta, keep_best=True)


def _reuse_trial(model: Any, found: Any, run_dir: Path, tokenizer: Any, console: Any) -> tuple[Any, TrainResult]:
    """The best trial trained on every training row with these values: use its adapter, do not retrain."""
    import shutil

    from peft import PeftModel

    src = Path(found.reusable_adapter)
    dest = run_dir / "adapter"
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dest)  # the previous adapter stays whole until the copy is
    saved = json.loads((src.parent / "train_result.json").read_text())
    saved["adapter_dir"] = str(dest)
    saved["validations"] = [tuple(v) for v in saved.get("validations", [])]
    console.print(f"reusing trial {found.best.number}'s adapter: it trained on every training row with the best values")
    return PeftModel.from_pretrained(model, str(dest)), TrainResult(**saved)


def _log_search(found: Any, console: Any) -> None:
    """The trials table on the console; the best values as this run's params."""
    import mlflow

    from tuneline.tune.report import search_table

    console.print(search_table(found))
    mlflow.log_params({f"search.best.{k}": v for k, v in found.best_params.items()})
    mlflow.set_tags({"tuneline.study": found.study_name, "tuneline.search_best_trial": str(found.best.number)})
    mlflow.log_dict(found.to_dict(), "search/summary.json")


def _prepare(spec_path: str | Path, workspace: str | Path | Workspace | None) -> tuple[
        Workspace, LoadedSpec, Any, Any, tuple[PreparedData, DatasetVersion | None]]:
    """The workspace, the loaded spec, its model source and tokenizer, and the curated data."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    loaded = load_spec(spec_path)
    source = resolve_model_source(loaded.spec.model, loaded.base_dir)
    tokenizer = load_tokenizer(source, ws.models_dir)
    return ws, loaded, source, tokenizer, prepare_version(loaded, ws, tokenizer)


def _compute(spec: Any) -> tuple[str, str, str]:
    """Device, precision, and the dtype of the frozen base weights: bf16 for LoRA when computing in
    bf16; full fine-tuning keeps fp32 master weights."""
    c = Compute.resolve(spec.train.precision, spec.train.method)
    return c.device, c.precision, c.base_dtype


def _register(loaded: LoadedSpec, ws: Workspace, source: Any, run_id: str, dataset_version: str | None,
              suite: EvalSuite | None, adapter_sha256: str) -> int:
    """Register the run's adapter artifact (whose folder has ``adapter_sha256``, see
    :func:`tuneline.artifacts.tree_sha256`) as the next version of the spec's model."""
    import mlflow

    import tuneline
    from tuneline import registry, tracking

    tags = registry.version_tags(
        spec_sha256=loaded.sha256, dataset_version=dataset_version,
        code_version=tracking.git_sha(loaded.base_dir) or f"tuneline {tuneline.__version__}",
        base_model=loaded.spec.model, base_fingerprint=source.fingerprint(), suite=suite)
    tags[ADAPTER_SHA_TAG] = adapter_sha256
    return registry.register_version(tracking.tracking_uri(loaded, ws), loaded.spec.name, run_id,
                                     mlflow.get_artifact_uri("adapter"), tags)


def evaluation_items(spec: Any, data: PreparedData) -> list[Any]:
    """The evaluation items of the test split (the validation split when there is none): for
    generation tasks the rows sharing an input are one item with all their answers as references."""
    from tuneline.eval.items import group_items

    return group_items(data.test or data.eval, spec.task.type)


def eval_sets(loaded: LoadedSpec, ws: Workspace, test: list[Any]) -> list[EvalSet]:
    """The test split (or validation split when there is no test split) and each golden set, as
    evaluation items (:func:`tuneline.eval.items.group_items`: rows sharing an input are one item)."""
    from tuneline.eval.items import group_items

    task = loaded.spec.task.type
    sets = [EvalSet("test", "test", group_items(test, task))] if test else []
    for g in loaded.spec.eval.golden:
        golden = load_golden(loaded, g, ws.root)
        sets.append(EvalSet(g.name, "golden", group_items(golden.examples, task), golden.version, golden.sha256,
                            g.path))
    return sets


def load_adapter_model(source: Any, ws: Workspace, adapter_dir: str | Path, device: str, dtype: str) -> Any:
    """The base model with a saved adapter merged into its weights (as it would be served)."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():  # a fully fine-tuned model saved whole
            return load_model(resolve_model_source(str(folder), folder), ws.models_dir, device=device, dtype=dtype)
        raise TrainingError(Problem(f"no adapter in {folder} (adapter_config.json not found)",
                                    hint="point at the `adapter` folder of a run, e.g. .tuneline/runs/NAME/adapter"))
    base = load_model(source, ws.models_dir, device=device, dtype=dtype)
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def _finish_evaluation(evaluation: Evaluation, loaded: LoadedSpec, ws: Workspace, source: Any, device: str,
                       dtype: str, run_dir: Path, console: Any, production: str | Path | None = None,
                       before_record: Any = None) -> EvalSuite:
    """Score the production adapter (when there is one), then score, record and print the evaluation."""
    import mlflow

    production = production or (loaded.resolve(loaded.spec.eval.production) if loaded.spec.eval.production else None)
    if production is not None:
        from tuneline.retrieval import adapter_retriever

        served = adapter_retriever(production, ws.root / "embeddings", device)
        evaluation.score_system("production", load_adapter_model(source, ws, production, device, dtype),
                                _described(production, served), served.augment if served else None)
    suite = evaluation.finish()
    if before_record is not None:
        before_record(suite)
    (run_dir / "eval_report.json").write_text(json.dumps(suite.to_dict(), indent=2))
    mlflow.log_dict(suite.to_dict(), "eval/report.json")
    mlflow.log_metrics(flat_metrics(suite))
    mlflow.set_tag("tuneline.objective_passed", str(suite.passed).lower())
    for table in render_tables(suite):
        console.print(table)
    if suite.passed:
        console.print(f"gates [green]PASSED[/] ({len(suite.gates)})")
    else:
        console.print("gates [red]FAILED[/]:\n  " + "\n  ".join(describe_failures(suite.gates)))
    return suite


def evaluate(
    spec_path: str | Path,
    *,
    workspace: str | Path | Workspace | None = None,
    adapter: str | Path | None = None,
    production: str | Path | None = None,
    show_progress: bool = True,
    console: Any = None,
) -> EvalSuite:
    """Evaluate a trained adapter (default: the spec's last run) beside the base model and the
    production adapter, on the test split and the golden sets; record it in that run's MLflow run."""
    import mlflow
    from rich.console import Console

    import tuneline.tracking as tracking

    console = console or Console()
    ws, loaded, source, tokenizer, (data, _) = _prepare(spec_path, workspace)
    spec = loaded.spec
    run_dir = ws.run_dir(spec.name)
    candidate = Path(adapter) if adapter else run_dir / "adapter"
    if not (candidate / "adapter_config.json").is_file() and not (candidate / "config.json").is_file():
        raise TrainingError(Problem(f"no trained adapter at {candidate}",
                                    hint=f"train one with `tuneline run {spec_path}`, or pass --adapter FOLDER"))
    sets = eval_sets(loaded, ws, evaluation_items(spec, data))
    if not sets:
        raise TrainingError(Problem("nothing to evaluate on: the spec has no test or validation split and no "
                                    "golden sets", field="data.test", hint="add data.test or eval.golden"))
    if (why := decoding_mismatch(spec, candidate)) is not None:
        console.print(f"[yellow]{why}[/]")
    device, precision, dtype = _compute(spec)
    evaluation = Evaluation(spec, tokenizer, sets, data.labels, autocast=autocast_for(precision, device),
                            device=device, show_progress=show_progress)
    if spec.eval.compare_base:
        evaluation.score_system("base", load_model(source, ws.models_dir, device=device, dtype=dtype), spec.model)
    from tuneline.retrieval import adapter_retriever

    served = adapter_retriever(candidate, ws.root / "embeddings", device)
    evaluation.score_system("candidate", load_adapter_model(source, ws, candidate, device, dtype),
                            _described(candidate, served), served.augment if served else None)
    state = run_dir / "run.json"
    run_id = json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() and not adapter else None
    if run_id:
        mlflow.set_tracking_uri(tracking.tracking_uri(loaded, ws))
        active = mlflow.start_run(run_id=run_id)
    else:
        active = tracking.start_run(loaded, ws, run_name="eval")
    with active as mlrun:
        if not run_id:
            mlflow.set_tag("tuneline.adapter", str(candidate))
        suite = _finish_evaluation(evaluation, loaded, ws, source, device, dtype, run_dir, console, production)
        if run_id:
            from tuneline import registry

            updated = registry.update_eval_tags(tracking.tracking_uri(loaded, ws), run_id, suite, loaded.sha256)
            if same := [str(v) for v, counted in updated if counted]:
                console.print(f"gate results updated on {spec.name} version(s) {', '.join(same)}")
            if other := [str(v) for v, counted in updated if not counted]:
                console.print(f"[yellow]the spec changed since {spec.name} version(s) {', '.join(other)} were trained: "
                              "this evaluation is recorded beside their gate results and does not count for "
                              "promotion[/]")
        console.print(f"recorded in run {mlrun.info.run_id}; HTML page: `tuneline report {mlrun.info.run_id[:12]}`")
    return suite


def tune(
    spec_path: str | Path,
    *,
    workspace: str | Path | Workspace | None = None,
    resume: bool = False,
    restart: bool = False,
    workers: int | None = None,
    trials: int | None = None,
    show_progress: bool = True,
    console: Any = None,
) -> Any:
    """Run (or resume) the spec's hyperparameter search alone; return its :class:`SearchResult`.
    ``tuneline run`` on the same spec and data then reuses the finished study."""
    from rich.console import Console

    from tuneline.tune import search
    from tuneline.tune.report import search_table

    console = console or Console()
    ws, loaded, source, tokenizer, (data, version) = _prepare(spec_path, workspace)
    console.print(curation_summary(data, version), soft_wrap=True)
    device, precision, dtype = _compute(loaded.spec)
    found = search(loaded, ws, data=data, version=version, tokenizer=tokenizer, source=source, device=device,
                   precision=precision, dtype=dtype, resume=resume, restart=restart, workers=workers, trials=trials,
                   console=console, show_progress=show_progress)
    console.print(search_table(found))
    return found


def baseline(
    spec_path: str | Path,
    *,
    workspace: str | Path | Workspace | None = None,
    show_progress: bool = True,
    console: Any = None,
) -> Any:
    """Measure the cheaper options on the test rows; beside the spec's last evaluated run when it was
    scored on the same rows; recommend one. Returns a :class:`tuneline.baseline.BaselineReport`."""
    import mlflow
    from rich.console import Console

    import tuneline.tracking as tracking
    from tuneline.eval import EvalSuite
    from tuneline.eval.results import SetResult

    console = console or Console()
    ws, loaded, source, tokenizer, (data, _) = _prepare(spec_path, workspace)
    spec = loaded.spec
    test = evaluation_items(spec, data)
    if not test:
        raise TrainingError(Problem("nothing to measure the baselines on: no test or validation split",
                                    field="data.test", hint="add data.test"))
    device, precision, dtype = _compute(spec)
    model = load_model(source, ws.models_dir, device=device, dtype=dtype)
    report = measure_baselines(loaded, ws, tokenizer, model, data, device, precision, show_progress)
    run_dir = ws.run_dir(spec.name)
    saved = run_dir / "eval_report.json"
    if saved.is_file():
        suite = EvalSuite.from_dict(json.loads(saved.read_text()))
        main: SetResult = suite.main_set()
        state = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        seconds = 0.0
        if state.get("mlflow_run_id"):
            client = mlflow.MlflowClient(tracking.tracking_uri(loaded, ws))
            seconds = float(client.get_run(state["mlflow_run_id"]).data.metrics.get("seconds", 0.0))
        if main.wheres == [ex.where for ex in test]:
            from tuneline.retrieval import adapter_retriever

            served = adapter_retriever(run_dir / "adapter", ws.root / "embeddings", device)
            _with_fine_tuned(report, suite, loaded, tokenizer, data, seconds, served)
        else:
            console.print(f"[yellow]the last run ({saved}) was evaluated on other rows; the fine-tuned model is "
                          "left out of the comparison (run `tuneline run` again)[/]")
    from tuneline.baseline import recommend

    if report.recommended is None:
        recommend(report, spec.eval.bootstrap)
    (run_dir / "baseline_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    console.print(baseline_table(report))
    return report
