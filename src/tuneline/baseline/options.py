"""Should we fine-tune at all? The cheaper options measured on the rows the tuned model is scored on.

Each option answers the same test rows and is scored with the same metrics and 95% bootstrap
intervals as the evaluation; beside its quality go its one-off cost (training, indexing, fitting),
its per-request latency (p50/p95 of single requests) and its prompt length. The recommendation is
the cheapest option whose quality is not significantly worse than the best one's (McNemar for
accuracy, the paired bootstrap otherwise, at p < 0.05).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from tuneline.curation.steps import input_of
from tuneline.data.examples import Example, sample_rows
from tuneline.data.tokenize import encode_prompt
from tuneline.eval import stats
from tuneline.eval.generate import (
    Decoding,
    GenerateOptions,
    Generation,
    LabelTrie,
    generate_detailed,
)
from tuneline.eval.metrics import Scored, bleu_tokenize_for, score
from tuneline.eval.results import Estimate, SetResult
from tuneline.eval.stats import Aggregate
from tuneline.retrieval.encoder import Encoder
from tuneline.retrieval.index import (
    NearestIndex,
    retrieval_prompts,
    with_demonstrations,
    with_label_set,
)
from tuneline.spec.models import LOWER_IS_BETTER, Spec

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ALPHA = 0.05
DESCRIPTIONS = {
    "prompt": "base model, instruction{labels}",
    "few_shot": "base model, {shots} fixed examples in the prompt",
    "retrieval": "base model, the {k} nearest training examples in the prompt ({encoder})",
    "embedding": "{encoder} embeddings + logistic regression",
    "fine_tuned": "the fine-tuned candidate",
    "hybrid": "fine-tuned with the {k} nearest training examples in the prompt",
}
WHY = {
    "prompt": "the base model already does the task from the instruction: nothing to train, index or host "
              "beyond the base model",
    "few_shot": "a few fixed examples in the prompt are enough: nothing to train or index",
    "retrieval": "examples retrieved from the training data are enough: the data can change without retraining, "
                 "and every answer can be traced to the examples it was shown",
    "embedding": "a frozen sentence encoder with a linear head matches the best quality: no generation at all, "
                 "seconds to refit when the data changes",
    "fine_tuned": "only fine-tuning reaches this quality: it changes the model's behaviour, format and domain "
                  "consistently",
    "hybrid": "fine-tuning for consistent behaviour plus retrieval for fresh, traceable examples does best",
}


@dataclass
class OptionResult:
    name: str
    description: str
    metrics: dict[str, Estimate]
    one_off_seconds: float
    p50_ms: float | None
    p95_ms: float | None
    prompt_tokens: float | None  # mean prompt length in tokens (None: no prompt)
    scores: list[float] = field(default_factory=list)  # per row: the primary metric's score
    correct: list[bool] | None = None
    predictions: list[str] = field(default_factory=list)
    vs_best: Estimate | None = None  # primary metric: this option minus the best
    p_vs_best: float | None = None
    skipped: str | None = None  # why it was not measured
    # the primary metric over any subset of items (not saved): the paired test compares the metric
    # itself, a corpus BLEU as much as an accuracy, not a mean of per-item scores
    aggregate: Aggregate | None = field(default=None, repr=False, compare=False)


@dataclass
class BaselineReport:
    set: str
    n: int
    metric: str
    options: list[OptionResult]
    best: str | None = None
    recommended: str | None = None
    reasons: list[str] = field(default_factory=list)
    # the items measured, as indices into the split's items, when they are a sample (baseline.max_rows)
    rows: list[int] | None = None
    of: int | None = None  # how many items the split has, when ``rows`` is a sample of them

    def option(self, name: str) -> OptionResult | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def items(self) -> str:
        """The items measured, in words: ``1000 items``, or the sample and what it was drawn from."""
        if self.rows is None:
            return f"{self.n} items"
        return f"a seeded sample of {self.n} of the {self.of} items, baseline.max_rows"

    def to_dict(self, with_rows: bool = True) -> dict[str, object]:
        d = asdict(self)
        for o in d["options"]:
            o.pop("aggregate", None)
            if not with_rows:
                o.pop("scores"), o.pop("correct"), o.pop("predictions")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineReport:
        def est(x: dict[str, float] | None) -> Estimate | None:
            return Estimate(**x) if x else None

        options = []
        for o in d["options"]:
            o = dict(o)
            o["metrics"] = {k: Estimate(**v) for k, v in o["metrics"].items()}
            o["vs_best"] = est(o.get("vs_best"))
            options.append(OptionResult(**o))
        return cls(**{**d, "options": options})


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Context:
    """What every option needs: the spec, the base model and tokenizer, the splits, the encoder.
    ``test`` holds evaluation items (:func:`tuneline.eval.items.group_items`), as the evaluation scores."""

    spec: Spec
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module  # the base model (prompt, few-shot, retrieval)
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] | None
    autocast: AbstractContextManager[object]
    device: str
    encoder: Encoder | None = None  # loaded when an option needs it (retrieval, embedding)
    show_progress: bool = False
    # prompts this base model has already answered with the same settings (the evaluation's base
    # system on the test items) and its answers: an option with exactly these prompts reuses them
    answered: tuple[list[Example], Generation] | None = None

    @cached_property
    def trie(self) -> LabelTrie | None:
        """The label trie every option's constrained answers walk, built once from the first test
        item (as the evaluation builds its own): a label's tokens after the assistant header do not
        depend on the prompt before it. Built per call instead, it added ~58 ms to every timed
        single request (the built-in model's 77 BANKING77 labels), which a server does not pay."""
        spec, tok = self.spec, self.tokenizer
        if spec.task.type != "classification" or not spec.eval.constrain_to_labels or not self.labels or not self.test:
            return None
        eos = cast("int | None", tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None)
        return LabelTrie(tok, self.labels, self.test[0], eos)

    @property
    def encoder_loaded(self) -> Encoder:
        """The encoder, for the options that need one (:func:`measure` loads it for them)."""
        assert self.encoder is not None, "the retrieval and embedding options need an encoder"
        return self.encoder


def measure(ctx: Context) -> BaselineReport:
    """Every option in ``spec.baseline.options`` that applies to the task, on ``ctx.test``."""
    cfg = ctx.spec.baseline
    primary = ctx.spec.objective.primary
    total = len(ctx.test)
    rows = sample_rows(list(range(total)), cfg.max_rows, cfg.seed) if cfg.max_rows else None
    if rows is not None and len(rows) < total:
        log.info("baselines on a sample of %d of the %d test items (baseline.max_rows)", len(rows), total)
        ctx = replace(ctx, test=[ctx.test[i] for i in rows], answered=_answered_rows(ctx.answered, rows))
    else:
        rows = None
    out = BaselineReport(set="test", n=len(ctx.test), metric=primary, options=[], rows=rows,
                         of=total if rows is not None else None)
    train_vectors: np.ndarray | None = None
    index_seconds = 0.0
    for name in cfg.options:
        desc = DESCRIPTIONS[name].format(labels="", shots=cfg.shots, k=cfg.k, encoder=cfg.encoder)
        if name == "embedding" and ctx.spec.task.type != "classification":
            out.options.append(_skipped(name, desc, "a classifier head needs a classification task"))
            continue
        if name in ("retrieval", "embedding") and train_vectors is None:
            # the one-off cost is what embedding the training rows took, also when it is cached now
            train_vectors = ctx.encoder_loaded.embed([_text(ex) for ex in ctx.train])
            index_seconds = ctx.encoder_loaded.last_seconds
        log.info("baseline %s", name)
        t0 = time.perf_counter()
        if name == "prompt":
            out.options.append(_prompt_only(ctx, desc))
        elif name == "few_shot":
            out.options.append(_few_shot(ctx, desc))
        elif name == "retrieval":
            assert train_vectors is not None
            out.options.append(_retrieval(ctx, desc, train_vectors, index_seconds))
        else:
            assert train_vectors is not None
            out.options.append(_embedding(ctx, desc, train_vectors, index_seconds))
        log.info("baseline %s took %.1fs", name, time.perf_counter() - t0)
    return out


def _answered_rows(answered: tuple[list[Example], Generation] | None,
                   rows: list[int]) -> tuple[list[Example], Generation] | None:
    """The evaluation's answers (:attr:`Context.answered`) on the sampled items only."""
    if answered is None:
        return None
    seen, gen = answered
    return [seen[i] for i in rows], Generation([gen.texts[i] for i in rows], gen.seconds_per_example,
                                               [gen.stopped[i] for i in rows], [gen.tokens[i] for i in rows])


def _text(ex: Example) -> str:
    return input_of(ex)


def _skipped(name: str, desc: str, why: str) -> OptionResult:
    return OptionResult(name, desc, {}, 0.0, None, None, None, skipped=why)


def _generate(ctx: Context, examples: list[Example], what: str, batch_size: int | None = None,
              progress: bool = True) -> Generation:
    """``progress=False`` for a timed single request: a bar per request is a line per request in a log."""
    trie = ctx.trie
    decoding = Decoding(max_new_tokens=trie.max_len) if trie else Decoding.of(ctx.spec.decoding)
    return generate_detailed(ctx.model, ctx.tokenizer, examples, GenerateOptions(
        batch_size=batch_size or ctx.spec.eval.batch_size, decoding=decoding, autocast=ctx.autocast,
        device=ctx.device, description=f"baseline {what}", show_progress=ctx.show_progress and progress,
        labels=trie, share_prefix=len(examples) > 1))


def _latency_rows(ctx: Context) -> list[int]:
    n = min(ctx.spec.baseline.latency_requests, len(ctx.test))
    return random.Random(ctx.spec.baseline.seed + 1).sample(range(len(ctx.test)), n)


def _timed(fn: Callable[[int], object], rows: list[int]) -> tuple[float | None, float | None]:
    """p50/p95 ms of ``fn(row)`` over ``rows`` (one warm-up call first)."""
    if not rows:
        return None, None
    fn(rows[0])
    times = []
    for r in rows:
        t0 = time.perf_counter()
        fn(r)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def _generated_option(ctx: Context, name: str, desc: str, prompts: list[Example], one_off: float,
                      single: Callable[[int], object] | None = None) -> OptionResult:
    """Score generated answers to ``prompts``; time single requests (``single(row)`` or one prompt alone)."""

    gen = _already_answered(ctx, prompts) or _generate(ctx, prompts, name)
    option = _scored(ctx, name, desc, gen.texts, gen.tokens, gen.stopped, one_off)
    option.p50_ms, option.p95_ms = _timed(single or (lambda r: _generate(ctx, [prompts[r]], name, 1, progress=False)),
                                          _latency_rows(ctx))
    option.prompt_tokens = float(np.mean([len(encode_prompt(ctx.tokenizer, ex)) for ex in prompts]))
    return option


def _already_answered(ctx: Context, prompts: list[Example]) -> Generation | None:
    """The evaluation's answers when it gave the base model exactly ``prompts`` (greedy decoding
    with the same settings gives the same answers again), else None."""
    if ctx.answered is None:
        return None
    seen, gen = ctx.answered
    same = len(seen) == len(prompts) and all(a.prompt_messages == b.prompt_messages
                                             for a, b in zip(seen, prompts, strict=True))
    return gen if same else None


def _scored(ctx: Context, name: str, desc: str, texts: list[str], tokens: list[int] | None,
            stopped: list[bool] | None, one_off: float) -> OptionResult:
    sc = score(ctx.spec.task.type, texts, [ex.all_references for ex in ctx.test], ctx.labels,
               primary=ctx.spec.objective.primary, answer_tokens=tokens, stopped=stopped,
               bleu_tokenize=bleu_tokenize_for(ctx.spec))
    metrics = _intervals(sc, len(texts), ctx.spec.eval.bootstrap)
    return OptionResult(name, desc, metrics, one_off, None, None, None, scores=[float(x) for x in sc.primary_scores],
                        correct=[bool(x) for x in sc.correct] if sc.correct is not None else None, predictions=texts,
                        aggregate=sc.metrics.get(ctx.spec.objective.primary))


def _intervals(sc: Scored, n: int, resamples: int) -> dict[str, Estimate]:
    """Each metric of ``sc`` over its ``n`` items, with its bootstrap interval."""
    idx = stats.resample_indices(n, resamples) if n else None
    metrics = {}
    for m, agg in sc.metrics.items():
        iv = stats.bootstrap(agg, n, indices=idx)
        metrics[m] = Estimate(iv.value, iv.low, iv.high)
    return metrics


def _prompt_only(ctx: Context, desc: str) -> OptionResult:
    prompts = list(ctx.test)
    if ctx.spec.task.type == "classification" and ctx.labels:
        listed = [with_label_set(ex, ctx.labels) for ex in prompts]
        limit = getattr(getattr(ctx.model, "config", None), "max_position_embeddings", 2048) or 2048
        if max(len(encode_prompt(ctx.tokenizer, ex)) for ex in listed[:50]) <= limit // 2:
            prompts, desc = listed, DESCRIPTIONS["prompt"].format(labels=f" and the {len(ctx.labels)} labels")
    return _generated_option(ctx, "prompt", desc, prompts, 0.0)


def _fixed_shots(ctx: Context) -> list[Example]:
    """``shots`` training examples, seeded; for classification one per label first, so the examples
    cover as many labels as they can."""
    cfg = ctx.spec.baseline
    rng = random.Random(cfg.seed)
    order = list(range(len(ctx.train)))
    rng.shuffle(order)
    picked: list[int] = []
    seen: set[str | None] = set()
    for i in order:  # one per label first
        if len(picked) < cfg.shots and ctx.train[i].label not in seen:
            picked.append(i)
            seen.add(ctx.train[i].label)
    for i in order:
        if len(picked) >= cfg.shots:
            break
        if i not in picked:
            picked.append(i)
    return [ctx.train[i] for i in picked]


def _few_shot(ctx: Context, desc: str) -> OptionResult:
    shots = _fixed_shots(ctx)
    return _generated_option(ctx, "few_shot", desc, [with_demonstrations(ex, shots) for ex in ctx.test], 0.0)


def _retrieval(ctx: Context, desc: str, train_vectors: np.ndarray, index_seconds: float) -> OptionResult:
    k = ctx.spec.baseline.k
    index = NearestIndex(train_vectors, ctx.train)
    test_vectors = ctx.encoder_loaded.embed([_text(ex) for ex in ctx.test])
    prompts = retrieval_prompts(index, ctx.test, test_vectors, k)

    def single(r: int) -> None:  # a request: embed the question, search, generate
        v = ctx.encoder_loaded.embed_one(_text(ctx.test[r]))
        _generate(ctx, retrieval_prompts(index, [ctx.test[r]], v, k), "retrieval", 1, progress=False)

    return _generated_option(ctx, "retrieval", desc, prompts, index_seconds, single)


def _embedding(ctx: Context, desc: str, train_vectors: np.ndarray, index_seconds: float) -> OptionResult:
    """Logistic regression on the embeddings; C chosen on the validation split (never the test rows)."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    y = [ex.reference for ex in ctx.train]
    c_value = 10.0
    if ctx.validation:
        val_x = ctx.encoder_loaded.embed([_text(ex) for ex in ctx.validation])
        val_y = [ex.reference for ex in ctx.validation]
        scores = {}
        for c in (1.0, 10.0, 100.0):
            clf = LogisticRegression(C=c, max_iter=2000).fit(train_vectors, y)
            scores[c] = float(np.mean(clf.predict(val_x) == np.array(val_y)))
        c_value = max(scores, key=lambda c: (scores[c], -c))
    clf = LogisticRegression(C=c_value, max_iter=2000).fit(train_vectors, y)
    fit_seconds = time.perf_counter() - t0
    test_x = ctx.encoder_loaded.embed([_text(ex) for ex in ctx.test])
    predictions = [str(p) for p in clf.predict(test_x)]
    option = _scored(ctx, "embedding", f"{desc} (C={c_value:g}, chosen on the validation split)", predictions,
                     None, None, index_seconds + fit_seconds)
    option.p50_ms, option.p95_ms = _timed(lambda r: clf.predict(ctx.encoder_loaded.embed_one(_text(ctx.test[r]))),
                                          _latency_rows(ctx))
    return option


# --- the fine-tuned model and the recommendation ------------------------------------------------

@dataclass(frozen=True)
class SystemCosts:
    """What an evaluated system costs: once (training, indexing), per request, and in prompt tokens."""

    one_off_seconds: float
    p50_ms: float | None
    p95_ms: float | None
    prompt_tokens: float | None  # mean prompt length in tokens (None: no prompt)


def add_system(report: BaselineReport, name: str, desc: str, suite_set: SetResult | None, spec: Spec,
               labels: list[str] | None, costs: SystemCosts, system: str = "candidate") -> None:
    """Add an evaluated system (the fine-tuned candidate) from the evaluation's set results."""

    res = suite_set.system(system) if suite_set is not None else None
    if suite_set is None or res is None:
        return
    predictions, references = list(res.predictions), suite_set.all_references()
    if report.rows is not None:  # the options were measured on a sample: the same items here
        predictions, references = [predictions[i] for i in report.rows], [references[i] for i in report.rows]
    sc = score(spec.task.type, predictions, references, labels,
               primary=spec.objective.primary, bleu_tokenize=bleu_tokenize_for(spec))
    metrics = dict(res.metrics) if report.rows is None else _intervals(sc, len(predictions), spec.eval.bootstrap)
    report.options.append(OptionResult(
        name, desc, metrics, costs.one_off_seconds, costs.p50_ms, costs.p95_ms, costs.prompt_tokens,
        scores=[float(x) for x in sc.primary_scores],
        correct=[bool(x) for x in sc.correct] if sc.correct is not None else None,
        predictions=predictions, aggregate=sc.metrics.get(spec.objective.primary)))


def recommend(report: BaselineReport, resamples: int = 1000) -> BaselineReport:
    """Pick the best option, test every other against it, and recommend the cheapest one that is not
    significantly worse (cost: one-off seconds, then p50 latency)."""
    metric = report.metric
    higher = metric not in LOWER_IS_BETTER
    measured = [o for o in report.options if o.skipped is None and metric in o.metrics and o.scores]
    if not measured:
        report.reasons = ["no option was measured"]
        return report
    best = max(measured, key=lambda o: o.metrics[metric].value if higher else -o.metrics[metric].value)
    report.best = best.name
    n = len(best.scores)
    for o in measured:
        if o is best:
            o.vs_best, o.p_vs_best = Estimate(0.0, 0.0, 0.0), 1.0
            continue
        if len(o.scores) != n:
            continue
        if o.aggregate is not None and best.aggregate is not None:  # the metric itself, paired over items
            diff, p = stats.paired_bootstrap(o.aggregate, best.aggregate, n, resamples=resamples)
        else:  # a report read back from JSON: the per-item scores
            a, b = np.asarray(o.scores), np.asarray(best.scores)
            diff, p = stats.paired_bootstrap(stats.mean_metric(a), stats.mean_metric(b), n, resamples=resamples)
        if o.correct is not None and best.correct is not None and metric == "accuracy":
            p = stats.mcnemar(np.asarray(o.correct), np.asarray(best.correct))[0]
        o.vs_best, o.p_vs_best = Estimate(diff.value, diff.low, diff.high), float(p)
    tied = [o for o in measured if o is best or (o.p_vs_best is not None and o.p_vs_best >= ALPHA)]
    pick = min(tied, key=_cost_key)
    report.recommended = pick.name
    value = pick.metrics[metric]
    reasons = [f"{pick.name}: {WHY[pick.name]}."]
    if pick is best:
        reasons.append(f"It has the best {metric}, {value.value:.3f} [{value.low:.3f}, {value.high:.3f}]"
                       + ("" if len(tied) == 1 else
                          f", and it is the cheapest of the {len(tied)} options within noise of each other") + ".")
    else:
        reasons.append(f"Its {metric} {value.value:.3f} [{value.low:.3f}, {value.high:.3f}] is not significantly "
                       f"below the best ({best.name}, {best.metrics[metric].value:.3f}; p = {pick.p_vs_best:.3g}), "
                       f"and it costs less: {_cost(pick)} against {_cost(best)}.")
    worse = [o.name for o in measured if o not in tied]
    if worse:
        reasons.append(f"Significantly worse than the best (p < {ALPHA}): {', '.join(worse)}.")
    report.reasons = reasons
    return report


def _cost_key(o: OptionResult) -> tuple[float, float]:
    """Cheaper first: the one-off cost on a log scale in steps of 2x (so 0.3 s and 0.9 s of indexing
    count alike, 10 minutes of training does not), then the per-request latency."""

    return (math.floor(math.log2(1 + o.one_off_seconds)), o.p50_ms if o.p50_ms is not None else float("inf"))


def _cost(o: OptionResult) -> str:
    lat = f", p50 {o.p50_ms:.0f} ms per request" if o.p50_ms is not None else ""
    return f"{o.one_off_seconds:.0f} s once{lat}"
