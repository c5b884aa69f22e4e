"""Metrics: exact label match after normalisation, macro-F1 over the label set, text overlap."""

from __future__ import annotations

import pytest

from tuneline.eval.metrics import classification_metrics, normalize_label, text_metrics
from tuneline.eval.report import check_objective
from tuneline.spec.models import ObjectiveSpec


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
    same = text_metrics(["the card is blocked"], ["the card is blocked"])
    other = text_metrics(["hello there"], ["the card is blocked"])
    assert same["rouge_l"] == pytest.approx(1.0)
    assert same["bleu"] > other["bleu"]
    assert other["rouge_l"] == 0.0


def test_objective_checks_pass_and_fail():
    obj = ObjectiveSpec(primary="accuracy", thresholds=["accuracy >= 0.8", "macro_f1 > 0.5"])
    checks = check_objective(obj, {"accuracy": 0.9, "macro_f1": 0.5})
    assert [c.passed for c in checks] == [True, False]
