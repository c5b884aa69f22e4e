"""The detectors: pure functions from a reference (the serving version's training rows) and a
current window (the logged requests) to :class:`~tuneline.monitor.results.DetectorResult` rows.
No store, no server: ``tuneline.monitor.check`` reads the window and calls these.

When a detector fires (the spec's ``monitor:`` section holds every threshold):

- a statistical detector (``input.embedding``, ``input.length``, ``input.oov``,
  ``output.labels``, ``output.answer_length``) when its test is significant at ``p_value`` *and*
  its effect size is at least its ``min_effect``;
- a rate detector (refusals, truncation, negative feedback, corrections, errors, shed requests)
  when the lower end of the rate's 95% interval is above its threshold;
- a latency or token detector when a threshold is set and the value is above it (no threshold:
  status ``info``, reported only);
- never on a window with fewer than ``window.min_requests`` rows (``quality.min_feedback``
  feedback entries): status ``insufficient``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tuneline.monitor import stats
from tuneline.monitor.results import DetectorResult, Group

if TYPE_CHECKING:
    from tuneline.spec.monitor import MonitorSpec

HELDOUT_SHARE = 0.25  # of the reference texts: kept out of the vocabulary to measure its own OOV rate
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters (and an apostrophe inside): numbers are never OOV
REFUSAL = re.compile(
    r"\b(?:I\s*(?:can(?:'|no)?t|cannot|am\s+unable\s+to|'m\s+unable\s+to|am\s+not\s+able\s+to|'m\s+not\s+able\s+to"
    r"|won't\s+be\s+able\s+to)\s+(?:help|assist|provide|do|answer|comply|fulfil)"
    r"|I\s*(?:'m|\s+am)\s+sorry,?\s+but"
    r"|as\s+an\s+AI\b"
    r"|I\s+apologi[sz]e,?\s+but)",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` the vocabulary and the OOV rate count."""
    return WORD.findall(text.lower())


def word_count(text: str) -> int:
    """Whitespace-separated words: the length the length detectors compare."""
    return len(text.split())


def is_refusal(answer: str) -> bool:
    """Whether ``answer`` reads as a refusal ("I can't help with", "I'm sorry, but", "as an AI")."""
    return REFUSAL.search(answer) is not None


@dataclass(frozen=True)
class Reference:
    """What the current window is compared with: the serving version's training rows.

    ``texts`` are the model's inputs, ``answers`` the training answers (generation), ``labels``
    the training labels (classification), ``embeddings`` the texts' embeddings (or None).
    ``vocabulary`` is built from all but a seeded held-out share of the texts, and
    ``heldout_oov`` holds (unseen words, words) of each held-out text, so the reference's own
    out-of-vocabulary rate is measured on texts the vocabulary never saw, as the current
    window's is."""

    texts: list[str]
    answers: list[str]
    labels: list[str] | None
    embeddings: np.ndarray | None
    vocabulary: frozenset[str]
    heldout_oov: list[tuple[int, int]] = field(default_factory=list)
    seed: int = 0

    @property
    def rows(self) -> int:
        return len(self.texts)


def reference_of(texts: Sequence[str], answers: Sequence[str], labels: Sequence[str] | None,
                 embeddings: np.ndarray | None, seed: int = 0) -> Reference:
    """The :class:`Reference` of training rows ``texts`` (with their ``answers``, ``labels`` and
    ``embeddings`` where the task has them)."""
    if embeddings is not None and len(embeddings) != len(texts):
        raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} reference texts")
    rng = stats.stream(seed, "heldout")
    heldout = np.zeros(len(texts), dtype=bool)
    n_heldout = int(round(HELDOUT_SHARE * len(texts))) if len(texts) >= 4 else 0
    heldout[rng.choice(len(texts), n_heldout, replace=False)] = True
    vocabulary = frozenset(w for t, h in zip(texts, heldout, strict=True) if not h for w in words(t))
    held = [oov_counts(t, vocabulary) for t, h in zip(texts, heldout, strict=True) if h]
    return Reference(list(texts), list(answers), list(labels) if labels is not None else None,
                     embeddings, vocabulary, held, seed)


def oov_counts(text: str, vocabulary: frozenset[str]) -> tuple[int, int]:
    """(words of ``text`` not in ``vocabulary``, words of ``text``)."""
    ws = words(text)
    return sum(w not in vocabulary for w in ws), len(ws)


# ---------------------------------------------------------------------------------------------
# result helpers


def _insufficient(name: str, group: Group, n: int, need: int, what: str = "requests",
                  threshold: float | None = None, n_reference: int = 0) -> DetectorResult:
    return DetectorResult(name, group, "insufficient", None, threshold,
                          f"not enough data: {n} {what}, a verdict needs {need}",
                          n_reference=n_reference, n_current=n)


def _fmt_p(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def _test_result(name: str, group: Group, res: stats.TestResult, p_value: float, min_effect: float,
                 what: str) -> DetectorResult:
    """A statistical detector's result: fires when significant at ``p_value`` and the effect is
    at least ``min_effect``. ``what`` names the statistic and the rows compared, e.g.
    "input length KS D" and "requests vs training rows"."""
    fired = res.p_value <= p_value and res.effect >= min_effect
    detail = (f"{what} {res.effect:.3g} ({_fmt_p(res.p_value)}, fires at p<={p_value:g} and >={min_effect:g}) "
              f"over {res.n_current} requests vs {res.n_reference} training rows")
    return DetectorResult(name, group, "alert" if fired else "ok", res.effect, min_effect, detail,
                          p_value=res.p_value, n_reference=res.n_reference, n_current=res.n_current,
                          extra={"significance": p_value})


def _rate_result(name: str, group: Group, hits: int, n: int, threshold: float, what: str) -> DetectorResult:
    """A rate detector's result: value = the rate's 95% Wilson lower bound, fires above ``threshold``."""
    low, high = stats.wilson(hits, n)
    rate = hits / n if n else 0.0
    fired = low > threshold
    detail = (f"{what} {rate:.1%} ({hits}/{n}; 95% interval {low:.1%}-{high:.1%}, fires when the lower "
              f"bound is above {threshold:.1%})")
    return DetectorResult(name, group, "alert" if fired else "ok", low, threshold, detail, n_current=n,
                          extra={"rate": rate, "lower": low, "upper": high, "count": hits})


# ---------------------------------------------------------------------------------------------
# input


def effective_permutations(asked: int, p_value: float) -> int:
    """Permutations enough for a permutation p-value to reach ``p_value``: its smallest value is
    1 / (permutations + 1), so fewer than 2 / p_value - 1 could never be significant."""
    return max(asked, math.ceil(2.0 / p_value) - 1)


def embedding_detector(reference: Reference, embeddings: np.ndarray | None, spec: MonitorSpec) -> DetectorResult:
    """``input.embedding``: the shift of the inputs' sentence embeddings (MMD^2 or the domain
    classifier's AUC - 0.5, per ``monitor.input.method``)."""
    cfg = spec.input
    n = 0 if embeddings is None else len(embeddings)
    if n < spec.window.min_requests:
        return _insufficient("input.embedding", "input", n, spec.window.min_requests, threshold=cfg.min_effect)
    if embeddings is None or reference.embeddings is None or len(reference.embeddings) < 10:
        return DetectorResult("input.embedding", "input", "insufficient", None, cfg.min_effect,
                              "not measured: no reference embeddings", n_current=n)
    if cfg.method == "mmd":
        perms = effective_permutations(cfg.permutations, cfg.p_value)
        res = stats.mmd_test(reference.embeddings, embeddings, permutations=perms, seed=spec.window.seed)
        out = _test_result("input.embedding", "input", res, cfg.p_value, cfg.min_effect, "embedding shift MMD^2")
        out.extra.update(method="mmd", permutations=perms)
    else:
        res = stats.classifier_test(reference.embeddings, embeddings, seed=spec.window.seed)
        out = _test_result("input.embedding", "input", res, cfg.p_value, cfg.min_effect,
                           "embedding shift, domain classifier AUC-0.5")
        out.extra.update(method="classifier", auc=res.effect + 0.5)
    return out


def length_detector(reference: Reference, texts: Sequence[str], spec: MonitorSpec) -> DetectorResult:
    """``input.length``: the inputs' word counts against the training texts' (KS)."""
    if len(texts) < spec.window.min_requests:
        return _insufficient("input.length", "input", len(texts), spec.window.min_requests,
                             threshold=spec.input.length_min_effect)
    res = stats.ks_test([word_count(t) for t in reference.texts], [word_count(t) for t in texts])
    out = _test_result("input.length", "input", res, spec.input.p_value, spec.input.length_min_effect,
                       "input length (words) KS D")
    ref_median = float(np.median([word_count(t) for t in reference.texts]))
    out.extra.update(reference_median=ref_median, current_median=float(np.median([word_count(t) for t in texts])))
    return out


def oov_detector(reference: Reference, texts: Sequence[str], spec: MonitorSpec) -> DetectorResult:
    """``input.oov``: the rise of the share of words the training texts never used, current
    window against the reference's held-out texts. Value: the rise; p-value: one-sided
    Mann-Whitney of the per-text shares."""
    cfg = spec.input
    if len(texts) < spec.window.min_requests:
        return _insufficient("input.oov", "input", len(texts), spec.window.min_requests, threshold=cfg.oov_min_increase)
    cur = [oov_counts(t, reference.vocabulary) for t in texts]
    ref = reference.heldout_oov
    cur_share = sum(o for o, _ in cur) / max(1, sum(w for _, w in cur))
    ref_share = sum(o for o, _ in ref) / max(1, sum(w for _, w in ref))
    cur_frac = np.array([o / w for o, w in cur if w])
    ref_frac = np.array([o / w for o, w in ref if w])
    if len(cur_frac) == 0 or len(ref_frac) == 0:
        p = 1.0
    else:
        _, p = stats.auc_mann_whitney(cur_frac, ref_frac)
    rise = cur_share - ref_share
    fired = p <= cfg.p_value and rise >= cfg.oov_min_increase
    detail = (f"words unseen in training {cur_share:.1%} vs {ref_share:.1%} on held-out training texts "
              f"(rise {rise:+.1%}, {_fmt_p(p)}, fires at p<={cfg.p_value:g} and >={cfg.oov_min_increase:.0%}) "
              f"over {len(texts)} requests vs {len(ref)} held-out training rows")
    return DetectorResult("input.oov", "input", "alert" if fired else "ok", rise, cfg.oov_min_increase, detail,
                          p_value=p, n_reference=len(ref), n_current=len(texts),
                          extra={"current_share": cur_share, "reference_share": ref_share})


def input_detectors(reference: Reference, texts: Sequence[str], embeddings: np.ndarray | None,
                    spec: MonitorSpec) -> list[DetectorResult]:
    """``input.embedding``, ``input.length`` and ``input.oov`` on the current window's inputs
    ``texts`` (and their ``embeddings``); none when ``monitor.input.enabled`` is false."""
    if not spec.input.enabled:
        return []
    return [embedding_detector(reference, embeddings, spec), length_detector(reference, texts, spec),
            oov_detector(reference, texts, spec)]


# ---------------------------------------------------------------------------------------------
# output


def labels_detector(reference: Reference, predicted: Sequence[str | None], spec: MonitorSpec) -> DetectorResult:
    """``output.labels``: predicted labels against the training labels (chi-square, Cramér's V);
    labels the training data never had and unparsed answers count as one ``<other>`` label."""
    cfg = spec.output
    if len(predicted) < spec.window.min_requests:
        return _insufficient("output.labels", "output", len(predicted), spec.window.min_requests,
                             threshold=cfg.labels_min_effect)
    if not reference.labels:
        return DetectorResult("output.labels", "output", "insufficient", None, cfg.labels_min_effect,
                              "not measured: the reference has no labels", n_current=len(predicted))
    res = stats.chi_square_test(reference.labels, predicted)
    out = _test_result("output.labels", "output", res, cfg.p_value, cfg.labels_min_effect,
                       "predicted labels chi-square, Cramér's V")
    known = set(reference.labels)
    out.extra["other_share"] = sum(lab not in known for lab in predicted) / len(predicted)
    return out


def _generation_detectors(reference: Reference, answers: Sequence[str], finish_reasons: Sequence[str | None],
                          spec: MonitorSpec) -> list[DetectorResult]:
    cfg = spec.output
    need = spec.window.min_requests
    n = len(answers)
    if n < need:
        return [_insufficient("output.answer_length", "output", n, need, threshold=cfg.length_min_effect),
                _insufficient("output.refusal_rate", "output", n, need, threshold=cfg.refusal_max_increase),
                _insufficient("output.truncated_rate", "output", n, need, threshold=cfg.truncated_max_rate)]
    out = []
    if reference.answers:
        res = stats.ks_test([word_count(a) for a in reference.answers], [word_count(a) for a in answers])
        out.append(_test_result("output.answer_length", "output", res, cfg.p_value, cfg.length_min_effect,
                                "answer length (words) KS D"))
    else:
        out.append(DetectorResult("output.answer_length", "output", "insufficient", None, cfg.length_min_effect,
                                  "not measured: the reference has no answers", n_current=n))
    out.append(refusal_detector(reference, answers, spec))
    reasons = [r for r in finish_reasons if r is not None]
    if len(reasons) < need:
        out.append(_insufficient("output.truncated_rate", "output", len(reasons), need, "answers with a finish "
                                 "reason", threshold=cfg.truncated_max_rate))
    else:
        out.append(_rate_result("output.truncated_rate", "output", sum(r == "length" for r in reasons),
                                len(reasons), cfg.truncated_max_rate, "answers cut by the token limit"))
    return out


def refusal_detector(reference: Reference, answers: Sequence[str], spec: MonitorSpec) -> DetectorResult:
    """``output.refusal_rate``: the rise of the share of refusals over the training answers'
    share; value = the rise's 95% lower bound (Newcombe), fires above ``refusal_max_increase``."""
    limit = spec.output.refusal_max_increase
    cur = sum(is_refusal(a) for a in answers)
    ref = sum(is_refusal(a) for a in reference.answers)
    n, m = len(answers), len(reference.answers)
    # no training answers: the rise over a reference rate of 0, i.e. the current rate's own interval
    low, high = stats.newcombe_diff(cur, n, ref, m) if m else stats.wilson(cur, n)
    cur_rate, ref_rate = cur / n, (ref / m if m else 0.0)
    fired = low > limit
    versus = f"{ref_rate:.1%} in training answers" if m else "none assumed (no training answers)"
    detail = (f"refusals {cur_rate:.1%} ({cur}/{n}) vs {versus} (rise 95% interval "
              f"{low:+.1%} to {high:+.1%}, fires when the lower bound is above {limit:.0%})")
    return DetectorResult("output.refusal_rate", "output", "alert" if fired else "ok", low, limit, detail,
                          n_reference=m, n_current=n,
                          extra={"rate": cur_rate, "reference_rate": ref_rate, "lower": low, "upper": high})


def output_detectors(reference: Reference, answers: Sequence[str], predicted_labels: Sequence[str | None] | None,
                     finish_reasons: Sequence[str | None], task_type: str, spec: MonitorSpec) -> list[DetectorResult]:
    """Output drift of the current window: ``output.labels`` for classification (of
    ``predicted_labels``), otherwise ``output.answer_length``, ``output.refusal_rate`` and
    ``output.truncated_rate`` (``finish_reasons`` "length": cut by the token limit)."""
    if not spec.output.enabled:
        return []
    if task_type == "classification":
        return [labels_detector(reference, list(predicted_labels or []), spec)]
    return _generation_detectors(reference, answers, finish_reasons, spec)


# ---------------------------------------------------------------------------------------------
# quality


def quality_detectors(ratings: Sequence[int | None], corrections: Sequence[str | None],
                      spec: MonitorSpec) -> list[DetectorResult]:
    """``quality.negative_feedback`` (share of rated answers rated at or below
    ``feedback.max_negative_rating``) and ``quality.correction_rate`` (share of feedback entries
    carrying a correction), each against its threshold by its 95% lower bound."""
    cfg = spec.quality
    if not cfg.enabled:
        return []
    need = cfg.min_feedback
    rated = [r for r in ratings if r is not None]
    out = []
    if len(rated) < need:
        out.append(_insufficient("quality.negative_feedback", "quality", len(rated), need, "rated answers",
                                 threshold=cfg.negative_feedback_max))
    else:
        neg = sum(r <= spec.feedback.max_negative_rating for r in rated)
        out.append(_rate_result("quality.negative_feedback", "quality", neg, len(rated), cfg.negative_feedback_max,
                                "answers rated negative"))
    if len(corrections) < need:
        out.append(_insufficient("quality.correction_rate", "quality", len(corrections), need, "feedback entries",
                                 threshold=cfg.correction_max))
    else:
        fixed = sum(bool(c and c.strip()) for c in corrections)
        out.append(_rate_result("quality.correction_rate", "quality", fixed, len(corrections), cfg.correction_max,
                                "feedback entries with a correction"))
    return out


# ---------------------------------------------------------------------------------------------
# operations


def _threshold_result(name: str, value: float, threshold: float | None, n: int, what: str,
                      rows: str = "requests") -> DetectorResult:
    if threshold is None:
        return DetectorResult(name, "operations", "info", value, None, f"{what} {value:.4g} over {n} {rows} "
                              "(reported only: no threshold set)", n_current=n)
    fired = value > threshold
    return DetectorResult(name, "operations", "alert" if fired else "ok", value, threshold,
                          f"{what} {value:.4g} over {n} {rows} (fires above {threshold:g})", n_current=n)


def operations_detectors(statuses: Sequence[int], latencies_ms: Sequence[float | None], tokens: Sequence[int | None],
                         spec: MonitorSpec) -> list[DetectorResult]:
    """Latency p50/p95/p99 of the answered (200) requests, error rate (5xx, 504 past the deadline
    included), shed rate (429) and mean tokens per request; aligned sequences, one item per request."""
    cfg = spec.operations
    if not cfg.enabled:
        return []
    need = spec.window.min_requests
    n = len(statuses)
    names = ["operations.latency_p50_ms", "operations.latency_p95_ms", "operations.latency_p99_ms",
             "operations.error_rate", "operations.shed_rate", "operations.tokens_per_request"]
    if n < need:
        return [_insufficient(name, "operations", n, need) for name in names]
    answered = [float(lat) for s, lat in zip(statuses, latencies_ms, strict=True) if s == 200 and lat is not None]
    out: list[DetectorResult] = []
    if len(answered) < need:
        out += [_insufficient(name, "operations", len(answered), need, "answered requests") for name in names[:3]]
    else:
        p50, p95, p99 = stats.percentiles(answered, (50, 95, 99))
        out += [_threshold_result(names[0], p50, None, len(answered), "latency p50 (ms)", "answered requests"),
                _threshold_result(names[1], p95, cfg.latency_p95_ms, len(answered), "latency p95 (ms)",
                                  "answered requests"),
                _threshold_result(names[2], p99, cfg.latency_p99_ms, len(answered), "latency p99 (ms)",
                                  "answered requests")]
    out.append(_rate_result(names[3], "operations", sum(s >= 500 for s in statuses), n, cfg.error_rate_max,
                            "requests failed (5xx)"))
    out.append(_rate_result(names[4], "operations", sum(s == 429 for s in statuses), n, cfg.shed_rate_max,
                            "requests shed (429)"))
    counted = [t for t in tokens if t is not None]
    if len(counted) < need:
        out.append(_insufficient(names[5], "operations", len(counted), need, "requests with token counts",
                                 threshold=cfg.tokens_per_request_max))
    else:
        out.append(_threshold_result(names[5], float(np.mean(counted)), cfg.tokens_per_request_max, len(counted),
                                     "tokens per request"))
    return out
