"""The two-sample statistics the drift detectors stand on: known values where they exist, no
signal on samples of one distribution, a clear one on shifted samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneline.monitor import stats


def _unit(rng: np.random.Generator, n: int, shift: float = 0.0, d: int = 32) -> np.ndarray:
    x = rng.normal(size=(n, d))
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_wilson_matches_the_textbook_interval() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662
    low, high = stats.wilson(81, 263)
    assert low == pytest.approx(0.2553, abs=5e-5)
    assert high == pytest.approx(0.3662, abs=5e-5)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    assert stats.wilson(0, 20)[0] == 0.0
    assert stats.wilson(0, 500)[0] == 0.0 and stats.wilson(500, 500)[1] == 1.0  # not 4e-19 of rounding


def test_newcombe_difference_matches_the_published_example() -> None:
    # Newcombe (1998b), example (a): 56/70 vs 48/80 -> difference 0.2, 95% interval 0.0524 to 0.3339
    low, high = stats.newcombe_diff(56, 70, 48, 80)
    assert low == pytest.approx(0.0524, abs=5e-4)
    assert high == pytest.approx(0.3339, abs=5e-4)


def test_mmd_permutation_test_separates_shifted_samples_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    ref = _unit(rng, 400)
    same = stats.mmd_test(ref, _unit(rng, 100), permutations=199, seed=3)
    moved = stats.mmd_test(ref, _unit(rng, 100, shift=3.0), permutations=199, seed=3)
    assert same.p_value > 0.01 and abs(same.effect) < 0.01
    assert moved.p_value == pytest.approx(1 / 200)  # no permutation reached the observed statistic
    assert moved.effect > 0.05
    again = stats.mmd_test(ref, _unit(np.random.default_rng(0), 100), permutations=199, seed=3)
    assert stats.mmd_test(ref, _unit(np.random.default_rng(0), 100), permutations=199, seed=3) == again


def test_mmd_matches_the_direct_unbiased_estimate() -> None:
    rng = np.random.default_rng(1)
    x, y = _unit(rng, 30), _unit(rng, 20, shift=0.5)
    k = stats.rbf_kernel(np.vstack([x, y]))
    kxx, kyy, kxy = k[:30, :30], k[30:, 30:], k[:30, 30:]
    direct = ((kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (20 * 19)
              - 2 * kxy.mean())
    assert stats.mmd_test(x, y, permutations=50).effect == pytest.approx(direct, rel=1e-5)


def test_classifier_auc_is_near_half_without_shift_and_high_with_one() -> None:
    rng = np.random.default_rng(2)
    ref = _unit(rng, 600)
    same = stats.classifier_test(ref, _unit(rng, 200))
    moved = stats.classifier_test(ref, _unit(rng, 200, shift=2.0))
    assert same.p_value > 0.01 and same.effect < 0.05
    assert moved.p_value < 1e-6 and moved.effect > 0.2


def test_ks_effect_is_the_largest_cdf_gap() -> None:
    res = stats.ks_test([1, 2, 3, 4] * 50, [3, 4, 5, 6] * 50)
    assert res.effect == pytest.approx(0.5)
    assert res.p_value < 1e-10


def test_chi_square_pools_unknown_labels_and_cramers_v_is_unbiased() -> None:
    labels, table = stats.label_table(["a", "b"] * 100, ["a", "b", "zzz", None] * 25)
    assert dict(zip(labels, table[1].tolist(), strict=True)) == {"a": 25, "b": 25, stats.OTHER: 50}
    rng = np.random.default_rng(0)
    many = [f"l{i}" for i in range(77)]
    same = stats.chi_square_test(rng.choice(many, 2000).tolist(), rng.choice(many, 500).tolist())
    assert same.effect < 0.15 and same.p_value > 0.001  # below the default min; the plain V is ~0.19 here
    collapsed = stats.chi_square_test(rng.choice(many, 2000).tolist(), rng.choice(many[:3], 500).tolist())
    assert collapsed.effect > 0.5 and collapsed.p_value < 1e-10


def test_sparse_labels_are_pooled() -> None:
    labels, table = stats.label_table(["a"] * 100 + ["b"] * 100 + ["c", "d"], ["a"] * 20 + ["b"] * 20)
    assert dict(zip(labels, table[0].tolist(), strict=True)) == {"a": 100, "b": 100, stats.SPARSE: 2}


def test_percentiles() -> None:
    assert stats.percentiles(list(range(101))) == [50.0, 95.0, 99.0]
    assert all(math.isnan(v) for v in stats.percentiles([]))
