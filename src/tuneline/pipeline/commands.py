"""The entry points behind ``tuneline run``, ``eval``, ``tune``, ``baseline`` and ``validate``.

``run`` is the stage sequence of :mod:`tuneline.pipeline.stages`; the others reuse its pieces.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tuneline import registry, tracking
from tuneline.audit import audited
from tuneline.baseline import BaselineReport, baseline_table, recommend
from tuneline.context import RunContext, curation_summary, open_context
from tuneline.curation import PreparedData, prepare
from tuneline.errors import EvaluationError, Problem
from tuneline.eval import EvalSuite
from tuneline.eval.results import SetResult
from tuneline.models import load_model
from tuneline.pipeline import stages
from tuneline.pipeline.evaluation import (
    decoding_mismatch,
    described,
    eval_sets,
    evaluation_items,
    finish_evaluation,
    load_adapter_model,
    new_evaluation,
)
from tuneline.pipeline.systems import measure_baselines, with_fine_tuned
from tuneline.retrieval import adapter_retriever
from tuneline.spec import LoadedSpec, load_spec
from tuneline.train import TrainResult
from tuneline.tune import SearchOptions, SearchResult, search
from tuneline.tune.report import search_table
from tuneline.workspace import BASELINE_REPORT, EVAL_REPORT, Workspace

WorkspaceRef = str | Path | Workspace | None


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


def run(spec_path: str | Path, *, workspace: WorkspaceRef = None, resume: bool = False, show_progress: bool = True,
        console: Console | None = None, dataset: str | None = None) -> RunResult:
    """Run the whole pipeline for one spec and return what it produced (also tracked in MLflow).
    ``dataset``: train on that stored dataset version (here, or fetched from the tracking store)
    instead of curating the spec's files."""
    started = time.perf_counter()
    ctx = open_context(spec_path, workspace, console=console, show_progress=show_progress, dataset=dataset)
    with audited(ctx.workspace, "run", subject=f"spec:{ctx.spec.name}", inputs={"spec": ctx.loaded.sha256}) as entry:
        result = run_stages(ctx, resume=resume, started=started)
        entry.outputs["run"] = result.run_id
        if result.model_version is not None:
            entry.outputs["model"] = f"{ctx.spec.name}/{result.model_version}"
        entry.details.update(resumed=resume, seconds=round(result.seconds, 1),
                             gates="passed" if result.passed else "failed" if result.report else "not evaluated")
    return result


def run_stages(ctx: RunContext, *, resume: bool = False, started: float | None = None) -> RunResult:
    """The stages of ``tuneline run`` on an opened context (``started``: when the command began)."""
    started = time.perf_counter() if started is None else started
    clock = stages.StageClock({"prepare": time.perf_counter() - started})  # spec, data, curation
    stages.check_distributable(ctx)
    stages.announce(ctx)
    sets = stages.eval_sets_of(ctx)
    with stages.track(ctx, resume) as tracked:
        with clock("plan"):  # a hyperparameter search, when the spec asks for one, runs here
            plan = stages.plan_training(ctx, tracked)
        with clock("base_and_baselines"):
            untouched = stages.score_untouched(ctx, tracked, sets, stages.load_base(ctx, plan))
        with clock("train"):
            trained = stages.train_or_reuse(ctx, plan, tracked, untouched)
            shipped = stages.ship_adapter(ctx, plan, trained)
        with clock("evaluate"):
            report = stages.evaluate_candidate(ctx, plan, untouched, trained, shipped)
        with clock("register"):
            version = stages.register(ctx, tracked, shipped, report)
            stages.write_card(ctx, shipped, report, version)
        clock.log()
    seconds = stages.summarize(ctx, tracked, started, clock)
    return RunResult(tracked.run_id, ctx.run_dir, trained.result, report, seconds, version)


def validate(spec_path: str | Path) -> tuple[LoadedSpec, PreparedData]:
    """Check the spec and every row of its data; raise with all problems found. Trains nothing.

    Runs without the tokenizer (no model needed), so the too-long check is left to ``data prepare``
    and ``run``."""
    loaded = load_spec(spec_path)
    return loaded, prepare(loaded)


def evaluate(spec_path: str | Path, *, workspace: WorkspaceRef = None, adapter: str | Path | None = None,
             production: str | Path | None = None, show_progress: bool = True,
             console: Console | None = None) -> EvalSuite:
    """Evaluate a trained adapter (default: the spec's last run) beside the base model and the
    production adapter, on the test split and the golden sets; record it in that run's MLflow run."""
    import mlflow

    ctx = open_context(spec_path, workspace, console=console, show_progress=show_progress, trains=False)
    spec, console, compute = ctx.spec, ctx.console, ctx.compute
    candidate = Path(adapter) if adapter else ctx.run_dir / "adapter"
    if not (candidate / "adapter_config.json").is_file() and not (candidate / "config.json").is_file():
        raise EvaluationError(Problem(f"no trained adapter at {candidate}",
                                      hint=f"train one with `tuneline run {spec_path}`, or pass --adapter FOLDER"))
    sets = eval_sets(ctx.loaded, ctx.workspace, evaluation_items(spec, ctx.data))
    if not sets:
        raise EvaluationError(Problem("nothing to evaluate on: the spec has no test or validation split and no "
                                      "golden sets", field="data.test", hint="add data.test or eval.golden"))
    if (why := decoding_mismatch(spec, candidate)) is not None:
        console.print(f"[yellow]{why}[/]")
    evaluation = new_evaluation(ctx, sets)
    if spec.eval.compare_base:
        evaluation.score_system("base", load_model(ctx.source, ctx.workspace.models_dir, device=compute.device,
                                                   dtype=compute.served_dtype), spec.model)
    served = adapter_retriever(candidate, ctx.workspace.embeddings_dir, compute.device)
    evaluation.score_system("candidate", load_adapter_model(ctx.source, ctx.workspace, candidate, compute.device,
                                                            compute.served_dtype),
                            described(candidate, served), served.augment if served else None)
    run_id = None if adapter else ctx.workspace.run_state(spec.name).mlflow_run_id
    with tracking.start_or_resume(ctx.loaded, ctx.workspace, run_id, run_name="eval") as mlrun:
        if not run_id:
            mlflow.set_tag("tuneline.adapter", str(candidate))
        suite = finish_evaluation(ctx, evaluation, compute.served_dtype, production)
        if run_id:
            _update_gate_tags(ctx, run_id, suite)
        console.print(f"recorded in run {mlrun.info.run_id}; HTML page: `tuneline report {mlrun.info.run_id[:12]}`")
    return suite


def _update_gate_tags(ctx: RunContext, run_id: str, suite: EvalSuite) -> None:
    """The registered versions of this run get the new gate results (if the spec is unchanged)."""
    name = ctx.spec.name
    updated = registry.update_eval_tags(tracking.tracking_uri(ctx.loaded, ctx.workspace), run_id, suite,
                                        ctx.loaded.sha256)
    if same := [str(v) for v, counted in updated if counted]:
        ctx.console.print(f"gate results updated on {name} version(s) {', '.join(same)}")
    if other := [str(v) for v, counted in updated if not counted]:
        ctx.console.print(f"[yellow]the spec changed since {name} version(s) {', '.join(other)} were trained: "
                          "this evaluation is recorded beside their gate results and does not count for promotion[/]")


def tune(spec_path: str | Path, *, workspace: WorkspaceRef = None, resume: bool = False, restart: bool = False,
         workers: int | None = None, trials: int | None = None, show_progress: bool = True,
         console: Console | None = None) -> SearchResult:
    """Run (or resume) the spec's hyperparameter search alone; return its :class:`SearchResult`.
    ``tuneline run`` on the same spec and data then reuses the finished study."""
    ctx = open_context(spec_path, workspace, console=console, show_progress=show_progress)
    ctx.console.print(curation_summary(ctx.version), soft_wrap=True)
    found = search(ctx, options=SearchOptions(resume=resume, restart=restart, workers=workers, trials=trials))
    ctx.console.print(search_table(found))
    return found


def baseline(spec_path: str | Path, *, workspace: WorkspaceRef = None, show_progress: bool = True,
             console: Console | None = None, all_rows: bool = False) -> BaselineReport:
    """Measure the cheaper options on the test rows; beside the spec's last evaluated run when it was
    scored on the same rows; recommend one. Returns a :class:`tuneline.baseline.BaselineReport`.
    ``all_rows``: every test item, also when the spec's ``baseline.max_rows`` samples them."""
    ctx = open_context(spec_path, workspace, console=console, show_progress=show_progress,
                       trains=False)
    spec, compute = ctx.spec, ctx.compute
    test = evaluation_items(spec, ctx.data)
    if not test:
        raise EvaluationError(Problem("nothing to measure the baselines on: no test or validation split",
                                      field="data.test", hint="add data.test"))
    model = load_model(ctx.source, ctx.workspace.models_dir, device=compute.device, dtype=compute.served_dtype)
    report = measure_baselines(ctx, model, all_rows=all_rows)
    saved = ctx.run_dir / EVAL_REPORT
    if saved.is_file():
        suite = EvalSuite.from_dict(json.loads(saved.read_text()))
        main: SetResult = suite.main_set()
        run_id = ctx.workspace.run_state(spec.name).mlflow_run_id
        seconds = tracking.run_metric(ctx.loaded, ctx.workspace, run_id, "seconds") if run_id else 0.0
        if main.wheres == [ex.where for ex in test]:
            served = adapter_retriever(ctx.run_dir / "adapter", ctx.workspace.embeddings_dir, compute.device)
            with_fine_tuned(ctx, report, suite, seconds, served)
        else:
            ctx.console.print(f"[yellow]the last run ({saved}) was evaluated on other rows; the fine-tuned model is "
                              "left out of the comparison (run `tuneline run` again)[/]")
    if report.recommended is None:
        recommend(report, spec.eval.bootstrap)
    (ctx.run_dir / BASELINE_REPORT).write_text(json.dumps(report.to_dict(), indent=2))
    ctx.console.print(baseline_table(report))
    return report
