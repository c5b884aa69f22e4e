"""What the stages and commands share for evaluating: the evaluation sets, the decoding settings the
server will use, a saved adapter loaded as it is served, and recording a finished evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.audit import record
from tuneline.context import RunContext
from tuneline.curation import PreparedData
from tuneline.data import Example
from tuneline.errors import EvaluationError, Problem
from tuneline.eval import (
    EvalSet,
    EvalSuite,
    Evaluation,
    describe_failures,
    flat_metrics,
    load_golden,
    render_tables,
)
from tuneline.eval.generate import Decoding, read_decoding
from tuneline.eval.items import group_items
from tuneline.models import ModelSource, load_model, resolve_model_source
from tuneline.registry import gate_state_of
from tuneline.retrieval import Retriever, adapter_retriever
from tuneline.spec import LoadedSpec
from tuneline.spec.models import Spec
from tuneline.train.classifier import is_classifier_folder, load_classifier
from tuneline.train.peft_builders import is_prompt_learning
from tuneline.workspace import EVAL_REPORT, Workspace

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlflow import ActiveRun
    from torch import nn


def evaluation_items(spec: Spec, data: PreparedData) -> list[Example]:
    """The evaluation items of the test split (the validation split when there is none): for
    generation tasks the rows sharing an input are one item with all their answers as references."""
    return group_items(data.test or data.eval, spec.task.type)


def eval_sets(loaded: LoadedSpec, ws: Workspace, test: list[Example]) -> list[EvalSet]:
    """The test split (or validation split when there is no test split) and each golden set, as
    evaluation items (:func:`tuneline.eval.items.group_items`: rows sharing an input are one item).
    A golden set that changed since it was frozen stops here, before any training."""
    task = loaded.spec.task.type
    sets = [EvalSet("test", "test", group_items(test, task))] if test else []
    for g in loaded.spec.eval.golden:
        golden = load_golden(loaded, g, ws.root)
        sets.append(EvalSet(g.name, "golden", group_items(golden.examples, task), golden.version, golden.sha256,
                            g.path))
    return sets


def evaluated_decoding(spec: Spec) -> Decoding:
    """The decoding settings evaluation used for ``spec``'s fine-tuned model. Classification with
    label-constrained decoding decodes greedily (only the token limit of ``decoding`` applies)."""
    decoding = Decoding.of(spec.decoding)
    if spec.task.type == "classification" and spec.eval.constrain_to_labels:
        return Decoding(max_new_tokens=decoding.max_new_tokens)
    return decoding


def decoding_mismatch(spec: Spec, adapter_dir: str | Path) -> str | None:
    """Why evaluating the adapter in ``adapter_dir`` under ``spec`` would not score what the server
    answers: its recorded ``decoding.json`` differs from the spec's settings now (None when they
    agree or nothing is recorded)."""
    recorded = read_decoding(adapter_dir)
    now = evaluated_decoding(spec)
    if recorded is None or recorded == now:
        return None
    changed = [f"{k} {v!r} -> {now.to_dict()[k]!r}" for k, v in recorded.to_dict().items() if v != now.to_dict()[k]]
    return (f"the adapter records other decoding settings than the spec has now ({', '.join(changed)}): this "
            "evaluation uses the spec's, the server answers with the adapter's decoding.json")


def new_evaluation(ctx: RunContext, sets: list[EvalSet]) -> Evaluation:
    """An evaluation of ``sets`` that also probes the canaries the data planted (eval.canaries)."""
    evaluation = Evaluation(ctx.spec, ctx.tokenizer, sets, ctx.data.labels, autocast=ctx.compute.autocast(),
                            device=ctx.compute.device, show_progress=ctx.show_progress)
    evaluation.canaries = list(ctx.data.canaries)
    return evaluation


def load_adapter_model(source: ModelSource, ws: Workspace, adapter_dir: str | Path, device: str, dtype: str) -> nn.Module:
    """The base model with a saved adapter merged into its weights (as it would be served); a prefix
    or prompt tuning adapter stays a peft model."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():  # a fully fine-tuned model saved whole
            return load_model(resolve_model_source(str(folder), folder), ws.models_dir, device=device, dtype=dtype)
        raise EvaluationError(Problem(f"no adapter in {folder} (adapter_config.json not found)",
                                      hint="point at the `adapter` folder of a run, e.g. .tuneline/runs/NAME/adapter"))
    base = load_model(source, ws.models_dir, device=device, dtype=dtype)
    if is_classifier_folder(folder):  # task.head: classifier: its score head on the base's decoder, LoRA merged
        return load_classifier(base, folder)
    model = PeftModel.from_pretrained(base, str(folder))
    # virtual tokens (prefix and prompt tuning) are not weights to merge: that model answers as a peft model
    return model if is_prompt_learning(model) else model.merge_and_unload()


def described(adapter_dir: str | Path, retriever: Retriever | None) -> str:
    return str(adapter_dir) + (f" + the {retriever.k} nearest training examples" if retriever is not None else "")


def _audit_evaluation(ctx: RunContext, suite: EvalSuite, run: ActiveRun | None) -> None:
    """The audit entry of an evaluation: what was scored (spec, data, run) and the gate results."""
    inputs = {"spec": ctx.loaded.sha256, **({"dataset": ctx.version_id} if ctx.version_id else {})}
    if run is not None:
        inputs["run"] = run.info.run_id
    failed = [g.expr for g in suite.gates if not g.passed]
    candidate = suite.main_set().system("candidate") if suite.sets else None
    metrics = {k: round(v.value, 6) for k, v in candidate.metrics.items()} if candidate is not None else {}
    record(ctx.workspace, "eval", subject=f"spec:{ctx.spec.name}", inputs=inputs,
           outputs={"gates": gate_state_of(suite)}, details={"gates_failed": failed, "metrics": metrics})


def finish_evaluation(ctx: RunContext, evaluation: Evaluation, base_dtype: str, production: str | Path | None = None,
                      before_record: Callable[[EvalSuite], None] | None = None) -> EvalSuite:
    """Score the production adapter (when there is one), then score, record and print the evaluation."""
    import mlflow

    loaded, ws, console, device = ctx.loaded, ctx.workspace, ctx.console, ctx.compute.device
    production = production or (loaded.resolve(loaded.spec.eval.production) if loaded.spec.eval.production else None)
    if production is not None:
        served = adapter_retriever(production, ws.embeddings_dir, device)
        evaluation.score_system("production", load_adapter_model(ctx.source, ws, production, device, base_dtype),
                                described(production, served), served.augment if served else None)
    suite = evaluation.finish()
    if before_record is not None:
        before_record(suite)
    (ctx.run_dir / EVAL_REPORT).write_text(json.dumps(suite.to_dict(), indent=2))
    mlflow.log_dict(suite.to_dict(), "eval/report.json")
    mlflow.log_metrics(flat_metrics(suite))
    mlflow.set_tag("tuneline.objective_passed", str(suite.passed).lower())
    _audit_evaluation(ctx, suite, mlflow.active_run())
    for table in render_tables(suite):
        console.print(table)
    if suite.passed:
        console.print(f"gates [green]PASSED[/] ({len(suite.gates)})")
    else:
        console.print("gates [red]FAILED[/]:\n  " + "\n  ".join(describe_failures(suite.gates)))
    return suite
