"""Metrics: exact label match after normalisation, macro-F1 over the label set, text overlap."""

from __future__ import annotations

import pytest

from tuneline.eval.metrics import classification_metrics, normalize_label, score


@pytest.mark.parametrize("raw", ["card_arrival", " Card_Arrival.", "card arrival", "card-arrival\n"])
def test_label_normalisation(raw: str):
    assert normalize_label(raw) == "card_arrival"


def test_classification_metrics():
    labels = ["a", "b", "c"]
    m = classification_metrics(["a", "B ", "zzz", "c"], ["a", "b", "c", "a"], labels)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["invalid_rate"] == pytest.approx(0.25)
    # per class F1: a: p=1 r=.5 -> .667; b: 1; c: p=0 -> 0  => macro .556
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_text_metrics_reward_overlap():
    same = score("instruction", ["the card is blocked"], ["the card is blocked"], None).values()
    other = score("instruction", ["hello there"], ["the card is blocked"], None).values()
    assert same["rouge_l"] == pytest.approx(1.0) and same["exact_match"] == 1.0
    assert same["bleu"] > other["bleu"] and same["chrf"] > other["chrf"]
    assert other["rouge_l"] == 0.0 and other["exact_match"] == 0.0
