"""``tuneline compare``: every combination of base models and methods trained on the same data and
scored on the same test items, then one table and a recommendation.

Order: the combinations are planned and checked (methods, heads, models, each combination's spec)
before the data is read; the data is curated once into one dataset version and the test items are
fixed once; combinations measured by an earlier run with the same inputs (:func:`combination_key`)
are reused from the workspace; the others run each in a fresh worker process (``workers`` at a time),
or as Ray tasks, as the search runs its trials; then the recommendation, ``compare.json`` in the
workspace and an MLflow run of kind ``compare`` that ``tuneline report`` renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline import tracking
from tuneline.artifacts import atomic_write_text
from tuneline.compare.measure import EVAL_FILE, RESULT_FILE, Job, Shared, measure, model_license
from tuneline.compare.plan import Planned, plan
from tuneline.compare.results import GENERATIVE, CompareReport, Measured, recommend
from tuneline.context import prepare_version, workspace_of
from tuneline.curation import DatasetVersion, PreparedData
from tuneline.data.examples import Example, sample_rows
from tuneline.errors import EvaluationError, Problem, TrainingError
from tuneline.eval.items import group_items
from tuneline.eval.metrics import bleu_tokenize_for, score
from tuneline.models import load_tokenizer
from tuneline.runtime.compute import default_device
from tuneline.spec import LoadedSpec, load_spec
from tuneline.spec.models import RaySpec, Spec
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

COMPARE_FILE = "compare.json"
TEST_SAMPLE_SEED = 0


@dataclass(frozen=True)
class CompareOptions:
    """What to compare and how: ``models`` and ``methods`` (default: the spec's own), ``overrides``
    (``--set [METHOD:]PATH=VALUE``), worker processes or Ray, and ``rows`` (score on a seeded sample
    of that many test items, the same for every combination; default all)."""

    models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    workers: int = 1
    ray: bool = False
    rows: int | None = None


def compare(spec_path: str | Path, options: CompareOptions, *, workspace: str | Path | Workspace | None = None,
            console: Console | None = None, show_progress: bool = True) -> CompareReport:
    """Measure every combination (or reuse it), recommend one, write compare.json, track it."""
    from rich.console import Console

    started = time.perf_counter()
    out = console or Console()
    loaded = load_spec(spec_path)
    spec = loaded.spec
    models, methods = options.models or [spec.model], options.methods or [spec.train.method]
    planned = plan(loaded, models, methods, options.overrides)  # every input error, before any work
    if options.ray:
        _require_ray()
    ws = workspace_of(workspace)
    sources = list(dict.fromkeys(p.source for p in planned))
    tokenizers = [load_tokenizer(source, ws.models_dir) for source in sources]  # each model's loads, before any work
    data, version = prepare_version(loaded, ws, tokenizers[0])
    test = _test_items(spec, data, options.rows)
    device = default_device()
    shared = Shared(data.with_canary_rows().train, data.eval, test, data.labels, ws.models_dir, device,
                    show_progress=show_progress)
    items_sha = _items_sha256(test)
    data_id = version.id if version is not None else "+".join(s.sha256 for s in data.sources)
    jobs = [_job(ws, spec.name, p, combination_key(p, data_id, items_sha, device)) for p in planned]
    out.print(f"[bold]compare {spec.name}[/]: {len(jobs)} combinations ({', '.join(methods)} x "
              f"{', '.join(models)}) on {len(test)} test items; dataset {data_id[:24]}", highlight=False)
    finished, pending = _reused(jobs, out)
    backend = "ray" if options.ray else "processes"
    if pending:
        finished += _run(shared, pending, options, spec, out)
    order = {j.key: i for i, j in enumerate(jobs)}
    report = CompareReport(spec.name, spec.objective.primary, "test", len(test), version.id if version else None,
                           items_sha, sorted(finished, key=lambda m: order[m.key]), backend=backend,
                           workers=1 if options.ray else options.workers,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for m in report.combinations:
        _attach_scores(m, spec, test, data.labels)
    recommend(report, spec.eval.bootstrap)
    report.seconds = time.perf_counter() - started
    _track(loaded, ws, version, report, {j.key: j for j in jobs})
    atomic_write_text(ws.compare_dir(spec.name) / COMPARE_FILE, json.dumps(report.to_dict(), indent=2))
    return report


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise TrainingError(Problem("--ray needs Ray, and it is not installed", field="--ray",
                                    hint="pip install 'tuneline[ray]', or run with --workers N")) from e


def _test_items(spec: Spec, data: PreparedData, rows: int | None) -> list[Example]:
    items = group_items(data.test or data.eval, spec.task.type)
    if not items:
        raise EvaluationError(Problem("nothing to compare on: the spec has no test or validation split",
                                      field="data.test", hint="add data.test"))
    return sample_rows(items, rows, TEST_SAMPLE_SEED) if rows else items


def _items_sha256(items: list[Example]) -> str:
    payload = json.dumps([[ex.where, list(ex.all_references)] for ex in items], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def combination_key(p: Planned, data_id: str, items_sha256: str, device: str) -> str:
    """What a combination's measurements depend on: its spec's task, training, decoding, objective
    and scoring settings, the base model's weights, the data, the test items and the device (a
    latency measured on a CPU says nothing about a GPU)."""
    spec = p.spec
    train = spec.train.model_dump(mode="json", exclude={"checkpoint_every", "log_every", "distributed", "backend", "ray"})
    payload = {"task": spec.task.model_dump(mode="json"), "train": train, "head": p.combination.head,
               "decoding": spec.decoding.model_dump(mode="json"), "objective": spec.objective.primary,
               "eval": spec.eval.model_dump(mode="json", include={"batch_size", "constrain_to_labels", "latency"}),
               "canaries": spec.eval.canaries.model_dump(mode="json") if spec.eval.canaries else None,
               "model": p.source.fingerprint(), "data": data_id, "items": items_sha256, "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _job(ws: Workspace, name: str, p: Planned, key: str) -> Job:
    c = p.combination
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in c.model)[:40]
    head = f"-{c.head}" if c.head != GENERATIVE else ""
    return Job(p, key, ws.compare_dir(name) / f"{slug}-{c.method}{head}-{key[:12]}", model_license(p.source))


def _reused(jobs: list[Job], console: Console) -> tuple[list[Measured], list[Job]]:
    """The combinations an earlier run measured with the same inputs, and those still to measure."""
    done, pending = [], []
    for job in jobs:
        saved = job.folder / RESULT_FILE
        if saved.is_file():
            m = replace(Measured.from_dict(json.loads(saved.read_text())), reused=True, license=job.license)
            console.print(f"{m.label}: measured before ({job.folder.name}); reusing it", highlight=False)
            done.append(m)
        else:
            pending.append(job)
    return done, pending


def _run(shared: Shared, jobs: list[Job], options: CompareOptions, spec: Spec, console: Console) -> list[Measured]:
    def shown(m: Measured) -> None:
        e = m.metrics.get(spec.objective.primary)
        what = (f"{spec.objective.primary} {e.fmt()}, trained in {m.train_seconds:.0f}s" if m.state == "complete" and e
                else f"[red]failed[/]: {m.error}")
        console.print(f"{m.label}: {what}", highlight=False)

    if options.ray:
        return _run_ray(shared, jobs, spec.search.ray if spec.search else RaySpec(), shown)
    if options.workers <= 1:  # one at a time, each in a fresh process: its peak memory is its own
        for i, job in enumerate(jobs, 1):
            console.print(f"{job.planned.combination.label}: {i} of {len(jobs)} to train, one after another "
                          f"(lr {job.planned.spec.train.lr:.3g}, {job.planned.lr_source})", highlight=False)
        # a pool per combination: in one shared pool, a worker process that dies fails every
        # combination still waiting (seen: IA3 and prompt tuning "terminated abruptly" when the worker
        # started after DoRA's failed in its initializer, the code having changed under the run)
        return [m for job in jobs for m in _run_processes(shared, [job], 1, shown)]
    return _run_processes(replace(shared, show_progress=False), jobs, options.workers, shown)


def _run_processes(shared: Shared, jobs: list[Job], workers: int, shown: Callable[[Measured], None]) -> list[Measured]:
    """Each combination in a fresh worker process, ``workers`` at a time, each with an equal share of
    the CPU threads; the shared rows pickled once to a file. A fresh process, because a process's
    resident memory does not shrink back after a combination (measured: a LoRA trained after a
    classifier head in the same process read a peak of 1,194 MB, against 3,780 MB when it ran first),
    so in one process every combination after the first would read too low."""
    folder = jobs[0].folder.parent
    ctx_file = folder / f".shared-{os.getpid()}.pkl"
    ctx_file.write_bytes(pickle.dumps(shared))
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = []
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1,
                                 initializer=_init_worker,
                                 initargs=(threads, logging.getLogger().getEffectiveLevel())) as pool:
            futures = {pool.submit(_measure_from_file, str(ctx_file), job): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    m = future.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    m = _failed(job, f"worker process ended: {type(e).__name__}: {e}")
                shown(m)
                results.append(m)
    finally:
        ctx_file.unlink(missing_ok=True)
    return results


def _init_worker(threads: int, log_level: int) -> None:
    """A worker process: its share of the CPU threads, and the command's log level (a spawned
    process starts with none, and the training's step lines would be lost)."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(levelname)-8s %(message)s")


def _measure_from_file(ctx_file: str, job: Job) -> Measured:
    shared: Shared = pickle.loads(Path(ctx_file).read_bytes())
    return measure(shared, job)


def _failed(job: Job, why: str) -> Measured:
    c, spec = job.planned.combination, job.planned.spec
    return Measured(c.model, c.method, c.head, job.key, "failed", spec.train.lr, job.planned.lr_source,
                    license=job.license, folder=str(job.folder), error=why[:2000])


def _measure_remote(shared: Shared, job: Job, threads: int) -> Measured:
    """One combination in a Ray worker."""
    import torch

    torch.set_num_threads(threads)
    return measure(shared, job)


def _run_ray(shared: Shared, jobs: list[Job], cfg: RaySpec, shown: Callable[[Measured], None]) -> list[Measured]:
    """Each combination as a Ray task (the spec's search.ray: cluster address, CPUs and GPUs per
    task, retries of a task whose worker died); the shared rows go to the object store once. On a
    cluster the workspace must be on storage every node sees, as for the search."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, ignore_reinit_error=True,
                 logging_level=logging.WARNING, log_to_driver=False, num_cpus=None if cfg.address else os.cpu_count())
    remote = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial,
                        max_retries=cfg.max_failures)(_measure_remote)
    shared_ref = ray.put(replace(shared, show_progress=False))
    threads = max(1, int(cfg.cpus_per_trial))
    futures = {remote.remote(shared_ref, job, threads): job for job in jobs}
    results = []
    while futures:
        ready, _ = ray.wait(list(futures), num_returns=1)
        job = futures.pop(ready[0])
        try:
            m = ray.get(ready[0])
        except Exception as e:  # the task failed after its retries
            m = _failed(job, f"Ray task failed: {type(e).__name__}: {e}")
        shown(m)
        results.append(m)
    return results


def _attach_scores(m: Measured, spec: Spec, test: list[Example], labels: list[str] | None) -> None:
    """The primary metric as a function of item subsets (for the paired test) and, where the task
    has them, right/wrong answers, from the combination's saved answers."""
    if m.state != "complete" or len(m.predictions) != len(test):
        return
    sc = score(spec.task.type, m.predictions, [ex.all_references for ex in test], labels,
               primary=spec.objective.primary, bleu_tokenize=bleu_tokenize_for(spec))
    m.aggregate = sc.metrics.get(spec.objective.primary)
    m.correct = [bool(x) for x in sc.correct] if sc.correct is not None else None


def _track(loaded: LoadedSpec, ws: Workspace, version: DatasetVersion | None, report: CompareReport,
           jobs: dict[str, Job]) -> None:
    """An MLflow run of kind ``compare``: the spec, the dataset version, each combination's primary
    metric, ``compare/compare.json``, and the recommended combination's evaluation as the run's
    ``eval/report.json`` (so ``tuneline report RUN`` renders the page with the comparison)."""
    import mlflow

    with tracking.start_run(loaded, ws, run_name="compare") as run:
        report.mlflow_run_id = run.info.run_id
        mlflow.set_tags({"tuneline.kind": "compare", "tuneline.spec_sha256": loaded.sha256,
                         "tuneline.task": loaded.spec.task.type,
                         "tuneline.model": ",".join(sorted({m.model for m in report.combinations}))})
        mlflow.log_params({"compare.combinations": ", ".join(m.label for m in report.combinations)[:6000],
                           "compare.items": report.n, "compare.recommended": report.recommended or "none"})
        mlflow.log_text(loaded.text, "spec/tuneline.yaml")
        if version is not None:
            tracking.log_dataset_version(version)
        metric = report.metric
        mlflow.log_metrics({_metric_key(m, metric): m.metrics[metric].value
                            for m in report.combinations if metric in m.metrics})
        mlflow.log_dict(report.to_dict(), f"compare/{COMPARE_FILE}")
        best = report.get(report.recommended)
        if best is not None and (saved := jobs[best.key].folder / EVAL_FILE).is_file():
            mlflow.log_dict(json.loads(saved.read_text()), "eval/report.json")


def _metric_key(m: Measured, metric: str) -> str:
    """``compare.<model>.<method>[+head].<metric>`` in the characters MLflow takes in a key."""
    name = f"compare.{m.model}.{m.method}" + (f"+{m.head}" if m.head != GENERATIVE else "") + f".{metric}"
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)
