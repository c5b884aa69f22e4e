"""Intervals and paired tests: bootstrap coverage, McNemar against scipy, metrics on resamples."""

from __future__ import annotations

import numpy as np
import pytest

from tuneline.eval import stats
from tuneline.eval.metrics import score


def test_bootstrap_interval_covers_the_true_value_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    true_p, n, trials, covered = 0.7, 400, 200, 0
    for t in range(trials):
        sample = rng.random(n) < true_p
        iv = stats.bootstrap(stats.mean_metric(sample), n, resamples=400, seed=t)
        assert iv.low <= iv.value <= iv.high
        covered += iv.low <= true_p <= iv.high
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_interval_width_matches_the_binomial_standard_error():
    sample = np.array([1] * 700 + [0] * 300, dtype=float)
    iv = stats.bootstrap(stats.mean_metric(sample), len(sample))
    expected = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 1000)  # ~0.057
    assert iv.value == pytest.approx(0.7)
    assert iv.high - iv.low == pytest.approx(expected, rel=0.2)


def _pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return np.array(a, bool), np.array(b, bool)


def test_mcnemar_exact_on_a_small_table_matches_scipy_binomtest():
    from scipy.stats import binomtest

    a, b = _pairs(both=30, a_only=9, b_only=2, neither=5)
    p, a_only, b_only = stats.mcnemar(a, b)
    assert (a_only, b_only) == (9, 2)
    assert p == pytest.approx(binomtest(2, 11, 0.5).pvalue)  # exact two-sided: 0.0654
    assert p == pytest.approx(0.06543, abs=1e-4)


def test_mcnemar_chi_square_on_a_textbook_table():
    from scipy.stats import chi2

    # Agresti's presidential approval table: 794 / 150 / 86 / 570
    a, b = _pairs(both=794, a_only=150, b_only=86, neither=570)
    p, _, _ = stats.mcnemar(a, b)
    statistic = (abs(150 - 86) - 1) ** 2 / (150 + 86)  # with continuity correction: 16.82
    assert statistic == pytest.approx(16.818, abs=1e-3)
    assert p == pytest.approx(chi2.sf(statistic, 1))
    assert p == pytest.approx(4.115e-5, rel=1e-3)


def test_mcnemar_with_no_discordant_rows_is_not_significant():
    a, b = _pairs(both=10, a_only=0, b_only=0, neither=3)
    assert stats.mcnemar(a, b)[0] == 1.0


def test_macro_f1_on_resamples_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    labels = [f"l{i}" for i in range(6)]
    refs = [labels[i] for i in rng.integers(0, 5, 300)]  # l5 never occurs as a reference
    preds = [labels[i] if rng.random() < 0.9 else "nonsense" for i in rng.integers(0, 6, 300)]
    sc = score("classification", preds, refs, labels)
    for idx in (np.arange(300), rng.integers(0, 300, 300), np.arange(20)):
        r, p = [refs[i] for i in idx], [preds[i] for i in idx]
        present = sorted(set(r) | (set(p) & set(labels)))  # "nonsense" is wrong, not a class
        ours = sc.metrics["macro_f1"](idx)
        assert ours == pytest.approx(f1_score(r, p, labels=present, average="macro", zero_division=0))


def test_macro_f1_interval_contains_its_value_on_a_small_set_with_many_labels():
    # 2 rows per label, 77 labels, 90% right: resamples miss labels; those must not count as 0
    refs = [f"l{i}" for i in range(77) for _ in range(2)]
    rng = np.random.default_rng(3)
    preds = [r if rng.random() < 0.9 else "l0" for r in refs]
    sc = score("classification", preds, refs, sorted(set(refs)))
    iv = stats.bootstrap(sc.metrics["macro_f1"], len(refs))
    assert iv.low <= iv.value <= iv.high


def test_corpus_bleu_from_summed_statistics_equals_sacrebleu():
    import sacrebleu

    preds = ["the card is blocked", "my transfer did not arrive", "hello", "I lost my card yesterday"]
    refs = ["the card was blocked", "my transfer has not arrived", "hi there", "I lost my card"]
    values = score("instruction", preds, refs, None).values()
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100)


def test_paired_bootstrap_separates_a_real_difference_from_none():
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.8).astype(float)
    b = (rng.random(500) < 0.6).astype(float)
    diff, p = stats.paired_bootstrap(stats.mean_metric(a), stats.mean_metric(b), 500)
    assert diff.low > 0 and p < 0.01
    same, p_same = stats.paired_bootstrap(stats.mean_metric(a), stats.mean_metric(a), 500)
    assert same.value == 0 and p_same == 1.0


def test_per_class_confusion_and_common_metrics():
    sc = score("classification", ["a", "a", "b", "zzz"], ["a", "b", "b", "a"], ["a", "b"],
               answer_tokens=[1, 1, 1, 9], stopped=[True, True, True, False])
    labels, columns, matrix = sc.confusion
    assert labels == ["a", "b"] and columns == ["a", "b", "(invalid)"]
    assert matrix == [[1, 0, 1], [1, 1, 0]]  # rows: reference; columns: prediction
    assert sc.per_class["a"]["precision"] == pytest.approx(0.5) and sc.per_class["b"]["recall"] == pytest.approx(0.5)
    v = sc.values()
    assert v["stopped_rate"] == pytest.approx(0.75) and v["answer_tokens"] == pytest.approx(3.0)


def test_structured_output_metrics():
    refs = ['{"intent": "card_arrival", "urgent": false}'] * 3
    preds = ['{"intent": "card_arrival", "urgent": false}', '```json\n{"intent": "card_arrival", "urgent": true}\n```',
             "intent: card_arrival"]
    v = score("structured", preds, refs, None).values()
    assert v["json_valid"] == pytest.approx(2 / 3)
    assert v["field_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert v["exact_match"] == pytest.approx(1 / 3)


def test_refusals_are_counted():
    v = score("instruction", ["I'm sorry, I can't help with that.", "Your card arrives in 3 days."],
              ["x", "y"], None).values()
    assert v["refusal_rate"] == pytest.approx(0.5)
