"""The forgetting probe: the shipped question set, its scoring, and (slow) the base model on it."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from tuneline.eval.probe import (
    ProbeQuestion,
    load_probe,
    normalize_words,
    parse_probe,
    probe_correct,
    probe_examples,
)


def test_shipped_probe_loads_with_enough_distinct_questions():
    qs = load_probe()
    assert len(qs) >= 30
    assert all(isinstance(q, ProbeQuestion) and q.question.strip() and q.answers for q in qs)
    assert all(a.strip() for q in qs for a in q.answers)
    normalized = [" ".join(normalize_words(q.question)) for q in qs]
    assert len(set(normalized)) == len(qs), "duplicate questions"


def test_asset_header_records_the_selection():
    text = resources.files("tuneline.eval").joinpath("assets", "general_probe.jsonl").read_text(encoding="utf-8")
    header = json.loads(text.splitlines()[0])
    assert header["kept"] == len(load_probe())
    assert header["candidates"] > header["kept"]
    assert header["selected"] and "smollm2-135m" in header["_about"]


def test_every_reference_scores_as_its_own_right_answer():
    for q in load_probe():
        assert probe_correct(q.reference, q), q
        assert probe_correct(f"I think it is {q.reference}.", q), q


def test_probe_examples_are_one_user_turn_and_the_reference():
    qs = [ProbeQuestion("What is the capital of France?", ("Paris",)), ProbeQuestion("What is 2 + 2?", ("4", "four"))]
    exs = probe_examples(qs)
    assert [ex.messages for ex in exs] == [
        ({"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}),
        ({"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}),
    ]
    assert [ex.reference for ex in exs] == ["Paris", "4"]
    assert exs[0].prompt_messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert len({ex.where for ex in exs}) == 2 and all(ex.label is None for ex in exs)


PARIS = ProbeQuestion("What is the capital of France?", ("Paris",))
FOUR = ProbeQuestion("What is 2 + 2?", ("4", "four"))
TWELVE = ProbeQuestion("How many months are in a year?", ("12",))
DELHI = ProbeQuestion("What is the capital of India?", ("New Delhi", "Delhi"))


@pytest.mark.parametrize(("answer", "q", "right"), [
    ("The capital of France is Paris.", PARIS, True),
    ("PARIS!", PARIS, True),
    ("paris", PARIS, True),
    ("The capital of France is Lyon.", PARIS, False),
    ("", PARIS, False),
    ("She is a true Parisian.", PARIS, False),  # a word containing the answer is not the answer
    ("2 + 2 = 4", FOUR, True),
    ("Four.", FOUR, True),
    ("The answer is 4.0", FOUR, True),  # numbers compare as numbers
    ("2 + 2 = 14", FOUR, False),  # "4" inside "14" is not 4
    ("It is 40.", FOUR, False),
    ("fourteen", FOUR, False),
    ("There are 12 months.", TWELVE, True),
    ("There are twelve months.", TWELVE, False),  # words for numbers only when listed
    ("It is 012", TWELVE, True),
    ("It is 1.2", TWELVE, False),
    ("The capital is New Delhi.", DELHI, True),
    ("The capital is Delhi.", DELHI, True),
    ("The capital is Mumbai.", DELHI, False),
])
def test_probe_correct(answer, q, right):
    assert probe_correct(answer, q) is right


def test_scoring_folds_accents_and_reads_thousands():
    assert probe_correct("It's São Paulo", ProbeQuestion("q", ("Sao Paulo",)))
    assert probe_correct("about 1,000 metres", ProbeQuestion("q", ("1000",)))
    assert not probe_correct("Sao", ProbeQuestion("q", ("Sao Paulo",)))  # every word of the answer, in order


def test_parse_probe_rejects_a_malformed_line():
    with pytest.raises(ValueError, match=":2:"):
        parse_probe('{"_about": "x"}\n{"question": "q"}\n')


@pytest.mark.slow
def test_base_model_still_answers_the_shipped_probe(builtin_dir: Path, tokenizer):
    """The set was selected on the base model: it must still answer (nearly) all of it."""
    from tuneline.eval.generate import generate
    from tuneline.models import load_model, resolve_model_source
    from tuneline.runtime import autocast_for, resolve_precision

    precision = resolve_precision("auto", "cpu")  # as the pipeline evaluates a LoRA run here
    model = load_model(resolve_model_source(str(builtin_dir)), builtin_dir.parent, dtype=precision)
    qs = load_probe()
    answers, _ = generate(model, tokenizer, probe_examples(qs), batch_size=32, max_new_tokens=24,
                          autocast=autocast_for(precision, "cpu"), labels=None, show_progress=False)
    wrong = [(q.question, a) for q, a in zip(qs, answers, strict=True) if not probe_correct(a, q)]
    score = 1 - len(wrong) / len(qs)
    print(f"base model probe score ({precision}): {score:.3f}; wrong: {wrong}")
    assert score >= 0.9, wrong
