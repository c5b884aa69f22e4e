"""The systems measured beside the fine-tuned model: the hybrid's retriever, and the cheaper options
(prompt only, few-shot, retrieval, an embedding classifier) on the untouched base model."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from tuneline.baseline import BaselineReport, Context, SystemCosts, add_system, measure, recommend
from tuneline.context import RunContext
from tuneline.curation import PreparedData
from tuneline.data import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.errors import Problem, TrainingError
from tuneline.eval import EvalSuite
from tuneline.pipeline.evaluation import evaluation_items
from tuneline.retrieval import Retriever, build_index, index_folder
from tuneline.retrieval.encoder import load_encoder

if TYPE_CHECKING:
    from torch import nn

    from tuneline.eval.generate import Generation


def measure_baselines(ctx: RunContext, model: nn.Module, answered: tuple[list[Example], Generation] | None = None,
                      all_rows: bool = False) -> BaselineReport:
    """Prompt only, few-shot, retrieval and the embedding classifier on the test rows (base model).
    ``answered``: (prompts, answers) the evaluation already has from this model; an option with the
    same prompts (prompt-only outside classification) reuses them instead of generating again.
    ``all_rows``: every test item, also when the spec's ``baseline.max_rows`` samples them."""
    spec, data, device = ctx.spec, ctx.data, ctx.compute.device
    if all_rows and spec.baseline.max_rows is not None:
        spec = spec.model_copy(update={"baseline": spec.baseline.model_copy(update={"max_rows": None})})
    needs_encoder = any(o in spec.baseline.options for o in ("retrieval", "embedding"))
    encoder = (load_encoder(spec.baseline.encoder, ctx.loaded.base_dir, ctx.workspace.embeddings_dir, device=device)
               if needs_encoder else None)
    return measure(Context(spec=spec, tokenizer=ctx.tokenizer, model=model, train=data.train, validation=data.eval,
                           test=evaluation_items(spec, data), labels=data.labels, autocast=ctx.compute.autocast(),
                           device=device, encoder=encoder, show_progress=ctx.show_progress, answered=answered))


def with_fine_tuned(ctx: RunContext, report: BaselineReport, suite: EvalSuite, train_seconds: float,
                    retriever: Retriever | None = None) -> None:
    """Add the evaluated candidate (cost: its training time; the hybrid's: plus indexing) and recommend."""
    test = evaluation_items(ctx.spec, ctx.data)
    prompts = retriever.augment(test) if retriever is not None and test else test
    lat = suite.latency
    name, what = (("hybrid", f"fine-tuned with the {retriever.k} nearest training examples in its prompt (cost: "
                             "indexing and training)") if retriever is not None
                  else ("fine_tuned", "the fine-tuned candidate (cost: its training time)"))
    one_off = train_seconds + (float(retriever.index.meta.get("seconds", 0.0)) if retriever is not None else 0.0)
    add_system(report, name, what, suite.main_set(), ctx.spec, ctx.data.labels, SystemCosts(
        one_off, lat.p50_ms if lat else None, lat.p95_ms if lat else None,
        float(np.mean([len(encode_prompt(ctx.tokenizer, ex)) for ex in prompts])) if prompts else None))
    recommend(report, ctx.spec.eval.bootstrap)


def hybrid_retriever(ctx: RunContext) -> Retriever | None:
    """The spec's retrieval index over its training rows (built once per dataset version and
    encoder) with ``retrieval.k``; None when the spec has no ``retrieval``."""
    cfg, data = ctx.spec.retrieval, ctx.data
    if cfg is None:
        return None
    if not data.train:
        raise TrainingError(Problem("retrieval needs training rows to retrieve from", field="retrieval"))
    encoder = load_encoder(cfg.encoder, ctx.loaded.base_dir, ctx.workspace.embeddings_dir, device=ctx.compute.device,
                           field="retrieval.encoder")
    folder = index_folder(ctx.workspace.root, ctx.version_id, data.train, encoder)
    index = build_index(data.train, encoder, folder, ctx.version_id)
    ctx.console.print(f"hybrid: the {cfg.k} nearest of {len(index.examples):,} training rows in every prompt "
                      f"({cfg.encoder}, index {folder})", soft_wrap=True)
    return Retriever(index, encoder, cfg.k)


def with_retrieval(data: PreparedData, retriever: Retriever | None) -> PreparedData:
    """``data`` as the hybrid trains on it: training rows with their nearest other training rows,
    validation rows with their nearest training rows (test rows stay plain: evaluation augments
    them per system). ``data`` itself without a retriever."""
    if retriever is None:
        return data
    return replace(data, train=retriever.augment_training(data.train), eval=retriever.augment(data.eval))
