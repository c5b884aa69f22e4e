"""The two-sample statistics behind the drift detectors: each returns an effect size (how far
apart the samples are, independent of how many rows there are) and a p-value (whether the
difference could be chance). A detector fires only when both pass, so a large window cannot turn
a negligible shift into an alert and a small window cannot turn noise into one.

- :func:`mmd_test`: maximum mean discrepancy (RBF kernel, median-heuristic bandwidth, unbiased
  MMD^2) with a seeded permutation p-value, for embeddings;
- :func:`classifier_test`: domain-classifier ROC AUC (logistic regression, scored on a held-out
  half) with a Mann-Whitney p-value, for embeddings;
- :func:`ks_test`: two-sample Kolmogorov-Smirnov (effect: the distance D), for lengths;
- :func:`chi_square_test`: label counts (effect: bias-corrected Cramér's V);
- :func:`wilson` and :func:`newcombe_diff`: 95% intervals for a rate and for a rise of a rate;
- :func:`percentiles`.

numpy only at import; scipy and sklearn are imported by the functions that use them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
OTHER = "<other>"  # labels the reference never saw
SPARSE = "<sparse>"  # labels too rare for the chi-square approximation, pooled


@dataclass(frozen=True)
class TestResult:
    """A two-sample test: ``effect`` (the statistic's effect size), ``p_value``, and the numbers
    of rows compared (after any subsampling)."""

    effect: float
    p_value: float
    n_reference: int
    n_current: int


def stream(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one ``purpose`` of ``seed``: two uses of the same seed (the caller's
    sampling of the reference rows and a test's subsampling of them) must not draw the same
    bits, or the second sample follows the first's order (on a file sorted by label, a
    subsample of some labels only: a drift that is not there)."""
    return np.random.default_rng([seed, *purpose.encode()])


def _subsample(x: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= cap:
        return x
    return x[np.sort(rng.choice(len(x), cap, replace=False))]


def _sq_distances(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def rbf_kernel(z: np.ndarray) -> np.ndarray:
    """The RBF kernel matrix of the rows of ``z``, exp(-d^2 / median(d^2)) with the median of
    the off-diagonal squared distances (the median heuristic)."""
    d2 = _sq_distances(z.astype(np.float64))
    n = len(z)
    off = d2[~np.eye(n, dtype=bool)] if n <= 1500 else d2[np.triu_indices(n, k=1)]
    med = float(np.median(off)) if off.size else 1.0
    return np.exp(-d2 / (med if med > 0 else 1.0))


def _mmd2_from_sums(s_xx: np.ndarray | float, s_yy: np.ndarray | float, s_xy: np.ndarray | float,
                    m: int, n: int) -> np.ndarray | float:
    # the kernel's diagonal is 1: the off-diagonal sums are the block sums less the block sizes
    return (s_xx - m) / (m * (m - 1)) + (s_yy - n) / (n * (n - 1)) - 2.0 * s_xy / (m * n)


def mmd_test(reference: np.ndarray, current: np.ndarray, *, permutations: int = 500, seed: int = 0,
             max_reference: int = 2000, max_current: int = 1000, reference_ratio: float = 2.0) -> TestResult:
    """Unbiased MMD^2 between the rows of ``reference`` and ``current`` and its permutation p-value.

    One kernel matrix over the pooled sample; each permutation relabels which rows are "current"
    and only needs z'Kz for the indicator z of the new current rows (the other block sums follow
    from the row sums), so the permutations are a few matrix products. The current sample is
    subsampled (seeded) to at most ``max_current`` rows, the reference to at most
    ``reference_ratio`` times the current rows (at least 1000) and ``max_reference``: the
    kernel matrix stays small and the p-value's resolution is 1 / (permutations + 1)."""
    rng = stream(seed, "mmd")
    y = _subsample(np.asarray(current), max_current, rng)
    x = _subsample(np.asarray(reference), min(max_reference, max(int(reference_ratio * len(y)), 1000)), rng)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least 2 rows on each side")
    k = rbf_kernel(np.vstack([x, y]))
    total = float(k.sum())
    rows = k.sum(axis=1)
    kf = k.astype(np.float32)

    def stat(z: np.ndarray) -> np.ndarray:  # z: (P, N) 0/1 indicators of the current rows
        s_yy = np.einsum("pi,pi->p", z @ kf, z).astype(np.float64)
        zr = z.astype(np.float64) @ rows
        return np.asarray(_mmd2_from_sums(total - 2 * zr + s_yy, s_yy, zr - s_yy, m, n))

    observed_z = np.zeros((1, m + n), dtype=np.float32)
    observed_z[0, m:] = 1.0
    observed = float(stat(observed_z)[0])
    exceed = 0
    done = 0
    while done < permutations:
        batch = min(100, permutations - done)
        z = np.zeros((batch, m + n), dtype=np.float32)
        order = rng.permuted(np.tile(np.arange(m + n), (batch, 1)), axis=1)[:, :n]
        np.put_along_axis(z, order, 1.0, axis=1)
        exceed += int((stat(z) >= observed - 1e-12).sum())
        done += batch
    return TestResult(observed, (1 + exceed) / (1 + permutations), m, n)


def auc_mann_whitney(scores_pos: np.ndarray, scores_neg: np.ndarray) -> tuple[float, float]:
    """ROC AUC of ``scores_pos`` over ``scores_neg`` and the one-sided Mann-Whitney p-value of
    AUC > 0.5 (normal approximation with the tie correction)."""
    from scipy.stats import mannwhitneyu  # type: ignore[import-untyped]

    res = mannwhitneyu(scores_pos, scores_neg, alternative="greater", method="asymptotic")
    auc = float(res.statistic) / (len(scores_pos) * len(scores_neg))
    return auc, float(res.pvalue)


def classifier_test(reference: np.ndarray, current: np.ndarray, *, seed: int = 0, test_share: float = 0.5,
                    max_reference: int = 2000, max_current: int = 1000, reference_ratio: float = 2.0) -> TestResult:
    """Domain classifier: logistic regression trained to tell current rows from reference rows
    on a seeded stratified share of both, then scored on the rest. Effect: the held-out ROC
    AUC - 0.5; p-value: one-sided Mann-Whitney of the held-out scores (AUC > 0.5). Subsampled as
    in :func:`mmd_test`.

    One split, not cross-validation: scores of held-out rows from one fixed model are
    exchangeable when nothing moved, so the Mann-Whitney p-value is exact. Pooling the folds of
    a cross-validation ranks scores of different models against each other; on BANKING77 halves
    that gave p-values far too small (p < 0.001 in 1 of 20 windows of 100 rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rng = stream(seed, "classifier")
    y = _subsample(np.asarray(current), max_current, rng)
    x = _subsample(np.asarray(reference), min(max_reference, max(int(reference_ratio * len(y)), 1000)), rng)
    m, n = len(x), len(y)
    if min(m, n) < 4:
        raise ValueError("the domain classifier needs at least 4 rows on each side")
    data = np.vstack([x, y]).astype(np.float64)
    target = np.r_[np.zeros(m, dtype=int), np.ones(n, dtype=int)]
    d_train, d_test, t_train, t_test = train_test_split(data, target, test_size=test_share, stratify=target,
                                                        random_state=int(rng.integers(2**31)))
    clf = LogisticRegression(C=1.0, class_weight="balanced", solver="liblinear", tol=1e-3, max_iter=300)
    clf.fit(d_train, t_train)
    scores = clf.decision_function(d_test)
    auc, p = auc_mann_whitney(scores[t_test == 1], scores[t_test == 0])
    return TestResult(auc - 0.5, p, m, n)


def ks_test(reference: Sequence[float], current: Sequence[float]) -> TestResult:
    """Two-sample Kolmogorov-Smirnov: effect = D (the largest gap between the two empirical
    distribution functions, 0..1), p-value two-sided."""
    from scipy.stats import ks_2samp

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("KS needs rows on both sides")
    res = ks_2samp(a, b, alternative="two-sided", method="auto")
    return TestResult(float(res.statistic), float(res.pvalue), len(a), len(b))


def label_table(reference: Sequence[str | None], current: Sequence[str | None],
                min_expected: float = 5.0) -> tuple[list[str], np.ndarray]:
    """The 2 x K table of label counts (reference row, current row). Current labels the reference
    never saw (and missing ones) count as ``<other>``; labels whose expected count in either row
    is under ``min_expected`` are pooled into ``<sparse>``."""
    known = {lab for lab in reference if lab is not None}
    ref = Counter(lab if lab is not None else OTHER for lab in reference)
    cur = Counter(lab if lab in known else OTHER for lab in current)
    labels = sorted(set(ref) | set(cur))
    table = np.array([[ref[lab] for lab in labels], [cur[lab] for lab in labels]], dtype=np.float64)
    rows = table.sum(axis=1, keepdims=True)
    expected = rows * table.sum(axis=0, keepdims=True) / max(table.sum(), 1.0)
    sparse = (expected < min_expected).any(axis=0)
    if sparse.any():
        keep = [lab for lab, s in zip(labels, sparse, strict=True) if not s]
        pooled = table[:, sparse].sum(axis=1, keepdims=True)
        return [*keep, SPARSE], np.hstack([table[:, ~sparse], pooled])
    return labels, table


def cramers_v(table: np.ndarray, chi2: float) -> float:
    """Bias-corrected Cramér's V (Bergsma 2013) of an r x k contingency table: 0 when the rows
    share one distribution (also with many sparse columns, where the plain V is biased up), 1
    when they share no column."""
    n = float(table.sum())
    r, k = table.shape
    if n <= 1 or min(r, k) < 2:
        return 0.0
    phi2 = max(0.0, chi2 / n - (k - 1) * (r - 1) / (n - 1))
    r_c = r - (r - 1) ** 2 / (n - 1)
    k_c = k - (k - 1) ** 2 / (n - 1)
    denom = min(r_c - 1, k_c - 1)
    return math.sqrt(phi2 / denom) if denom > 0 else 0.0


def chi_square_test(reference: Sequence[str | None], current: Sequence[str | None]) -> TestResult:
    """Chi-square test of homogeneity of the label counts (see :func:`label_table`); effect:
    bias-corrected Cramér's V. One column after pooling: p = 1, effect 0."""
    from scipy.stats import chi2_contingency

    _, table = label_table(reference, current)
    n_ref, n_cur = int(table[0].sum()), int(table[1].sum())
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or n_ref == 0 or n_cur == 0:
        return TestResult(0.0, 1.0, n_ref, n_cur)
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    return TestResult(cramers_v(table, float(chi2)), float(p), n_ref, n_cur)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate (95% by default); (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the exact bounds at 0 and n successes are 0 and 1; the formula leaves rounding noise (4e-19)
    lower = 0.0 if successes <= 0 else max(0.0, centre - half)
    upper = 1.0 if successes >= n else min(1.0, centre + half)
    return lower, upper


def newcombe_diff(s_cur: int, n_cur: int, s_ref: int, n_ref: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of the difference of two rates,
    current - reference, built from the two Wilson intervals."""
    p1 = s_cur / n_cur if n_cur else 0.0
    p2 = s_ref / n_ref if n_ref else 0.0
    l1, u1 = wilson(s_cur, n_cur, z)
    l2, u2 = wilson(s_ref, n_ref, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return lower, upper


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    """The ``qs`` percentiles of ``values`` (linear interpolation); NaN for each when empty."""
    if len(values) == 0:
        return [math.nan for _ in qs]
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), list(qs))]
