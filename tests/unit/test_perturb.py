"""Perturbations for robustness: deterministic, always a change, only the last user message."""

from __future__ import annotations

import pytest

from tuneline.data.examples import Example
from tuneline.eval.perturb import PERTURBATIONS, TEMPLATES, perturb, perturb_example

TEXT = "I still have not received my new card, when will it arrive at my address?"
TEXTS = [
    TEXT,
    "How do I change my PIN?",
    "Why was I charged an extra fee on my transfer yesterday afternoon",
    "card",
    "Please help me understand the exchange rate you applied to my payment in euros.",
]


def test_kinds():
    assert PERTURBATIONS == ("typos", "casing", "whitespace", "paraphrase")


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_deterministic_and_seed_dependent(kind):
    for text in TEXTS:
        assert perturb(text, kind, 7) == perturb(text, kind, 7)
    assert len({perturb(TEXT, kind, seed) for seed in range(20)}) > 1


@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("text", TEXTS)
def test_every_kind_changes_the_text(kind, text):
    for seed in range(10):
        assert perturb(text, kind, seed) != text


def test_typos_keep_the_word_count_and_touch_few_words():
    for seed in range(50):
        for text in TEXTS:
            out = perturb(text, "typos", seed)
            assert len(out.split()) == len(text.split())
            changed = sum(a != b for a, b in zip(out.split(), text.split(), strict=True))
            eligible = sum(1 for w in text.split() if sum(c.isalpha() for c in w) > 3)
            assert 1 <= changed <= max(1, round(0.15 * eligible))


def test_typos_leave_short_words_and_punctuation_alone():
    out = perturb("Is it on? Yes, it is.", "typos", 0)  # no word longer than 3 letters
    assert out == "Is it on? Yes, it is."
    out = perturb("Where, exactly?", "typos", 3)
    assert out.endswith("?") and "," in out


def test_casing_uses_upper_lower_and_title():
    outs = {perturb(TEXT, "casing", seed) for seed in range(30)}
    assert TEXT.upper() in outs and TEXT.lower() in outs
    assert "I Still Have Not Received My New Card, When Will It Arrive At My Address?" in outs
    assert len(outs) == 3


def test_casing_never_returns_the_text_unchanged():
    for seed in range(10):
        assert perturb("already lower", "casing", seed) != "already lower"


def test_whitespace_keeps_the_words():
    for seed in range(20):
        out = perturb(TEXT, "whitespace", seed)
        assert out.split() == TEXT.split()
        assert out.startswith(" ") and out.endswith(" ") and "\t" in out
        assert len(out) > len(TEXT) + 3


def test_paraphrase_wraps_the_text_in_templates():
    outs = {perturb(TEXT, "paraphrase", seed) for seed in range(40)}
    assert len(outs) >= 4
    assert outs <= {t.format(text=TEXT) for t in TEMPLATES}


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="typos, casing, whitespace, paraphrase"):
        perturb(TEXT, "emoji", 0)
    ex = Example("x", ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}), "a")
    with pytest.raises(ValueError, match="valid kinds"):
        perturb_example(ex, "shout", 0)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturb_example_changes_only_the_last_user_message(kind):
    ex = Example(
        "data.csv:3",
        (
            {"role": "system", "content": "Classify the customer's message into one intent."},
            {"role": "user", "content": "My card was stolen yesterday evening"},
            {"role": "assistant", "content": "lost_or_stolen_card"},
            {"role": "user", "content": TEXT},
            {"role": "assistant", "content": "card_arrival"},
        ),
        "card_arrival",
        "card_arrival",
    )
    out = perturb_example(ex, kind, 5)
    assert out.messages[3] == {"role": "user", "content": perturb(TEXT, kind, 5)}
    assert out.messages[:3] == ex.messages[:3] and out.messages[4] == ex.messages[4]
    assert (out.where, out.reference, out.label) == (ex.where, ex.reference, ex.label)
    assert ex.messages[3]["content"] == TEXT  # the original is not modified
    assert perturb_example(ex, kind, 5) == out


def test_perturb_example_without_a_user_message():
    ex = Example("x", ({"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}), "a")
    with pytest.raises(ValueError, match="no user message"):
        perturb_example(ex, "typos", 0)
