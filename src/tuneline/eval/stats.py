"""Uncertainty for evaluation numbers: bootstrap intervals, paired differences, McNemar's test.

Every metric is computed from per-row statistics that can be summed over a resample of rows
(``Aggregate``): a mean of per-row scores, a corpus BLEU from per-sentence n-gram counts, a
macro-F1 from per-class counts. So one set of resampled row indices serves every metric and
every system, and a paired comparison resamples the same rows for both systems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

RESAMPLES = 1000
ALPHA = 0.05
SEED = 0

# A metric computed on a subset of rows: indices (1-D int array) -> value
Aggregate = Callable[[np.ndarray], float]


@dataclass
class Interval:
    value: float
    low: float
    high: float


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples`` x ``n`` row indices drawn with replacement (seeded: the same for every metric)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def bootstrap(metric: Aggregate, n: int, *, resamples: int = RESAMPLES, seed: int = SEED,
              indices: np.ndarray | None = None) -> Interval:
    """The metric on all ``n`` rows and its percentile 95% interval over bootstrap resamples."""
    value = metric(np.arange(n))
    if n == 0:
        return Interval(value, value, value)
    idx = resample_indices(n, resamples, seed) if indices is None else indices
    samples = np.fromiter((metric(row) for row in idx), dtype=float, count=len(idx))
    low, high = np.quantile(samples, [ALPHA / 2, 1 - ALPHA / 2])
    return Interval(float(value), float(low), float(high))


def mean_metric(scores: Sequence[float] | NDArray[np.generic]) -> Aggregate:
    arr = np.asarray(scores, dtype=float)
    return lambda idx: float(arr[idx].mean()) if len(idx) else 0.0


def paired_bootstrap(metric_a: Aggregate, metric_b: Aggregate, n: int, *, resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[Interval, float]:
    """``a - b`` over the same resampled rows: its interval and a two-sided p-value.

    The p-value is twice the share of resamples on the other side of zero from the observed
    difference (the paired bootstrap test of Koehn, 2004), capped at 1."""
    diff = metric_a(np.arange(n)) - metric_b(np.arange(n))
    if n == 0:
        return Interval(diff, diff, diff), 1.0
    idx = resample_indices(n, resamples, seed)
    d = np.fromiter((metric_a(r) - metric_b(r) for r in idx), dtype=float, count=len(idx))
    low, high = np.quantile(d, [ALPHA / 2, 1 - ALPHA / 2])
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return Interval(float(diff), float(low), float(high)), p


def mcnemar(a_correct: Sequence[bool] | NDArray[np.bool_], b_correct: Sequence[bool] | NDArray[np.bool_],
            ) -> tuple[float, int, int]:
    """McNemar's test on paired right/wrong outcomes: (p-value, rows only a got right, rows only b got right).

    Exact (two-sided binomial on the discordant rows) when there are fewer than 25 of them, else
    the chi-square statistic with continuity correction, ``(|b - c| - 1)^2 / (b + c)``."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    return mcnemar_p(a_only, b_only), a_only, b_only


def mcnemar_p(a_only: int, b_only: int) -> float:
    """The p-value of McNemar's test from the two discordant counts."""
    from scipy.stats import binom, chi2  # type: ignore[import-untyped]

    m = a_only + b_only
    if m == 0:
        return 1.0
    if m < 25:
        return float(min(1.0, 2 * binom.cdf(min(a_only, b_only), m, 0.5)))
    stat = (abs(a_only - b_only) - 1) ** 2 / m
    return float(chi2.sf(stat, 1))


def macro_f1_metric(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> Aggregate:
    """Macro-F1 from integer predictions (``-1``: not a label) and references, averaged over the
    labels that occur among the rows' references or (valid) predictions.

    Equal to scikit-learn's ``f1_score(average="macro", zero_division=0)`` with ``labels`` those
    labels: an answer that is no label counts as wrong, not as a class of its own. Averaging over
    the labels present (not all labels) keeps a bootstrap resample, which leaves out about a third
    of a rare label's rows, from scoring the labels it happens to miss as 0."""
    correct = pred == ref

    def metric(idx: np.ndarray) -> float:
        p, r, c = pred[idx], ref[idx], correct[idx]
        tp = np.bincount(r[c], minlength=n_labels)
        n_pred = np.bincount(p[p >= 0], minlength=n_labels)
        n_ref = np.bincount(r, minlength=n_labels)
        denom = n_pred + n_ref
        present = denom > 0
        if not present.any():
            return 0.0
        return float(np.mean(2 * tp[present] / denom[present]))

    return metric


def summed_stats_metric(stats: np.ndarray, score: Callable[[np.ndarray], float]) -> Aggregate:
    """A corpus metric computed from per-row sufficient statistics summed over the rows (BLEU, chrF)."""
    return lambda idx: score(stats[idx].sum(axis=0)) if len(idx) else 0.0
