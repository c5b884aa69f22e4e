"""Curation that knows the task: several answers per input for generation tasks (kept as
references, deduplicated over input and answer, capped per input), one answer per input for
classification and structured (conflicts), group-aware splits, and decontamination overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl, write_spec

from tuneline.curation import curate, save_version
from tuneline.curation.steps import input_key
from tuneline.curation.textops import near_duplicates_paired
from tuneline.errors import SpecError
from tuneline.spec import load_spec

SUMMARY_SPEC = """
name: gen
task: {{type: summarization}}
objective: {{primary: rouge_l}}
model: smollm2-135m
data:
  train: {{path: train.jsonl}}
{extra}
"""

NAMES = ["Aromi", "Bibimbap House", "Blue Spice", "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe",
         "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge", "The Cricketers",
         "The Eagle", "The Golden Curry", "The Mill", "The Phoenix", "The Punter", "Zizzi"]
EATS = ["pub", "coffee shop", "restaurant"]
FOODS = ["Italian", "French", "Indian", "Chinese", "English"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderate", "high"]


def _mr(i: int) -> dict[str, str]:
    return {"name": NAMES[i], "eat": EATS[i % 3], "food": FOODS[i % 5], "area": AREAS[i % 2], "price": PRICES[(i // 3) % 3]}


def _input(i: int) -> str:
    m = _mr(i)
    return f"name[{m['name']}], eatType[{m['eat']}], food[{m['food']}], area[{m['area']}], priceRange[{m['price']}]"


def _answers(i: int) -> list[str]:
    """Three genuinely different descriptions of input ``i``."""
    m = _mr(i)
    return [
        f"{m['name']} is a {m['eat']} serving {m['food']} food in the {m['area']} with {m['price']} prices.",
        f"In the {m['area']} you will find {m['name']}, a {m['price']}-priced {m['eat']} offering {m['food']} dishes.",
        f"Looking for {m['food']} cooking? Try {m['name']}, a {m['eat']} near the {m['area']}; expect {m['price']} prices.",
    ]


def _rows(n_inputs: int = 20) -> list[dict[str, str]]:
    return [{"text": _input(i), "summary": a} for i in range(n_inputs) for a in _answers(i)]


def _prepare(tmp_path: Path, rows: list, extra: str = "", spec: str = SUMMARY_SPEC):
    write_jsonl(tmp_path / "train.jsonl", rows)
    loaded = load_spec(write_spec(tmp_path, spec.format(extra=extra)))
    return loaded, curate(loaded)


def _reasons(curated) -> dict[str, str]:
    return {r.where: r.reason.split(":")[0] for r in curated.rejects}


NO_SPLIT = "curation:\n  split: {validation: 0, test: 0}\n"


def test_three_answers_per_input_are_all_kept_as_references_and_reported(tmp_path: Path):
    loaded, curated = _prepare(tmp_path, _rows())  # default curation: carves validation and test
    assert curated.rejects == []
    assert sum(len(v) for v in curated.splits.values()) == 60
    version = save_version(curated, tmp_path / "ds", "gen", loaded.sha256)
    m = version.manifest
    assert m["counts"] == {"train": 48, "validation": 6, "test": 6}  # 16, 2 and 2 inputs of 3 answers
    for split, stats in m["answers_per_input"].items():
        assert stats["min"] == stats["median"] == stats["max"] == 3, split
    assert m["answers_per_input"]["train"] == {"inputs": 16, "rows": 48, "min": 3, "median": 3, "max": 3}
    assert "different answers to one input are kept as references" in m["dedup_rule"]
    assert m["dedup_rule"].startswith("generation task (summarization): a duplicate is the same input and the same answer")
    dedup = next(s for s in m["steps"] if s["name"] == "dedup")
    assert dedup["params"]["conflicts"] == "references"  # the resolved default
    assert m["conflict_groups"] == 0 and m["input_overlap"] == {"validation": 0, "test": 0}
    card = version.card.read_text()
    assert "Answers per input" in card and "| train | 16 | 48 | 3 | 3 | 3 |" in card
    assert "kept as references" in card and "Training inputs that also occur in: validation 0, test 0" in card


def test_an_exact_repeat_of_input_and_answer_is_dropped_naming_its_first_row(tmp_path: Path):
    rows = _rows()
    rows.append({"text": "  " + rows[4]["text"].upper(), "summary": rows[4]["summary"].replace(" ", "  ")})  # line 61
    _, curated = _prepare(tmp_path, rows, NO_SPLIT)
    assert _reasons(curated) == {"train.jsonl:61": "exact_duplicate"}
    assert "same as train.jsonl:5" in curated.rejects[0].reason
    assert len(curated.splits["train"]) == 60


def test_near_duplicate_answers_to_one_input_drop_one_and_different_answers_stay(tmp_path: Path):
    long = ("Aromi is a family friendly coffee shop by the riverside that serves Italian food at moderate prices "
            "and has a customer rating of three out of five according to its regular guests and visitors")
    rows = _rows()
    rows += [
        {"text": _input(0), "summary": long},                                        # 61
        {"text": _input(0), "summary": long.replace("regular", "frequent")},         # 62: one word changed
        {"text": _input(1), "summary": long.replace("Italian", "French")},           # 63: another input: kept
    ]
    _, curated = _prepare(tmp_path, rows, NO_SPLIT)
    assert _reasons(curated) == {"train.jsonl:62": "near_duplicate"}
    assert "train.jsonl:61" in curated.rejects[0].reason and "input and answer" in curated.rejects[0].reason
    kept = {ex.where for ex in curated.splits["train"]}
    assert {"train.jsonl:1", "train.jsonl:2", "train.jsonl:3", "train.jsonl:61", "train.jsonl:63"} <= kept
    assert len(kept) == 62


def test_near_duplicates_paired_needs_both_input_and_answer_near():
    sentence = "the quick brown fox jumps over the lazy dog near the old river bank at dawn every single day"
    inputs = [
        "describe the fox in one sentence please",            # 0
        "describe the fox in one sentence please",            # 1: same input, near answer -> duplicate of 0
        "describe the fox in one sentence please",            # 2: same input, different answer -> kept
        "a completely different request about cats",          # 3: other input, same answer -> kept
        "describe the fox in one sentence please now",        # 4: near input (0.8), near answer -> duplicate
    ]
    answers = [sentence, sentence.replace("day", "morning"), "a fox jumped", sentence,
               sentence.replace("dawn", "dawn")]
    assert near_duplicates_paired(inputs, answers, threshold=0.7) == [None, 0, None, None, 0]
    # many rows sharing one input with different answers, and many sharing one answer: nothing dropped
    many_inputs = ["one shared input text"] * 300 + [f"input number {i} about topic {i * 7}" for i in range(300)]
    many_answers = [f"answer {i} says {i * 13} things about {i % 17}" for i in range(300)] + ["yes"] * 300
    assert near_duplicates_paired(many_inputs, many_answers) == [None] * 600


def test_a_carved_validation_split_never_shares_an_input_with_training(tmp_path: Path):
    rows = _rows()
    rows += [{"text": _input(i), "summary": f"Extra description number {j} of {NAMES[i]} for variety."}
             for i in range(0, 20, 3) for j in range(2)]  # some inputs with five answers
    for seed in range(5):
        extra = f"curation:\n  split: {{validation: 0.2, test: 0.2, seed: {seed}}}\n"
        loaded, curated = _prepare(tmp_path, rows, extra)
        keys = {k: {input_key(ex) for ex in v} for k, v in curated.splits.items()}
        assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"], seed
        assert not keys["validation"] & keys["test"], seed
        assert {k: len(v) for k, v in keys.items()} == {"train": 12, "validation": 4, "test": 4}  # inputs counted
        assert sum(len(v) for v in curated.splits.values()) == len(rows)
        split = next(s for s in curated.steps if s.name == "split")
        assert split.details["inputs"] == {"train": 12, "validation": 4, "test": 4}
    # deterministic: the same seed gives the same split
    _, again = _prepare(tmp_path, rows, extra)
    assert again.splits == curated.splits


def test_classification_same_text_with_another_label_is_still_a_dropped_conflict(tmp_path: Path):
    spec = SUMMARY_SPEC.replace("type: summarization", "type: classification").replace("rouge_l", "accuracy")
    rows = [{"text": "My card has still not arrived after two weeks", "label": "card"},
            {"text": "What exchange rate do you use for euro payments abroad", "label": "rate"},
            {"text": "my card has still not arrived after two weeks", "label": "rate"},
            {"text": "The top up from my bank account failed this morning", "label": "topup"}]
    loaded, curated = _prepare(tmp_path, rows, NO_SPLIT, spec)
    assert _reasons(curated) == {"train.jsonl:1": "conflict", "train.jsonl:3": "conflict"}
    m = save_version(curated, tmp_path / "ds", "gen", loaded.sha256).manifest
    assert m["conflict_groups"] == 1
    assert m["dedup_rule"].startswith("classification: one correct label per input")
    assert "(conflicts: drop)" in m["dedup_rule"]
    assert next(s for s in m["steps"] if s["name"] == "dedup")["params"]["conflicts"] == "drop"
    assert "cap_per_input" not in [s["name"] for s in m["steps"]]


def test_keep_first_keeps_the_first_row_of_a_conflict(tmp_path: Path):
    spec = SUMMARY_SPEC.replace("type: summarization", "type: classification").replace("rouge_l", "accuracy")
    rows = [{"text": "My card has still not arrived after two weeks", "label": "card"},
            {"text": "my card has still not arrived after two weeks", "label": "rate"},
            {"text": "The top up from my bank account failed this morning", "label": "topup"}]
    extra = "curation:\n  dedup: {near: false, conflicts: keep_first}\n  split: {validation: 0, test: 0}\n"
    _, curated = _prepare(tmp_path, rows, extra, spec)
    assert _reasons(curated) == {"train.jsonl:2": "conflict"}
    assert "keep_first kept train.jsonl:1" in curated.rejects[0].reason


STRUCTURED_SPEC = SUMMARY_SPEC.replace("type: summarization", "type: structured").replace("rouge_l", "exact_match")


def test_structured_two_outputs_for_one_input_are_a_dropped_conflict(tmp_path: Path):
    rows = [{"instruction": "Extract the meaning representation", "input": "Aromi is a cheap pub by the river.",
             "response": json.dumps({"name": "Aromi", "eatType": "pub", "priceRange": "cheap"})},
            {"instruction": "Extract the meaning representation", "input": "Aromi is a cheap pub by the river.",
             "response": json.dumps({"name": "Aromi", "eatType": "pub"})},
            {"instruction": "Extract the meaning representation", "input": "Zizzi serves French food in town.",
             "response": json.dumps({"name": "Zizzi", "food": "French"})}]
    _, curated = _prepare(tmp_path, rows, NO_SPLIT, STRUCTURED_SPEC)
    assert _reasons(curated) == {"train.jsonl:1": "conflict", "train.jsonl:2": "conflict"}
    assert [ex.where for ex in curated.splits["train"]] == ["train.jsonl:3"]
    assert curated.dedup_rule.startswith("structured: one correct output per input")


def test_max_per_input_caps_the_training_answers_and_counts_them(tmp_path: Path):
    rows = _rows()
    extra = "curation:\n  max_per_input: 2\n  split: {validation: 0, test: 0, seed: 3}\n"
    loaded, curated = _prepare(tmp_path, rows, extra)
    assert set(_reasons(curated).values()) == {"over_cap_input"} and len(curated.rejects) == 20
    assert "max_per_input=2" in curated.rejects[0].reason
    train = curated.splits["train"]
    assert len(train) == 40
    lines = [int(ex.where.split(":")[1]) for ex in train]
    assert lines == sorted(lines)  # order kept
    m = save_version(curated, tmp_path / "ds", "gen", loaded.sha256).manifest
    assert m["dropped_by_reason"] == {"over_cap_input": 20}
    assert m["answers_per_input"]["train"] == {"inputs": 20, "rows": 40, "min": 2, "median": 2, "max": 2}
    _, again = _prepare(tmp_path, rows, extra)
    assert again.splits["train"] == train  # seeded


def test_a_capped_input_keeps_its_held_out_answers_whole(tmp_path: Path):
    extra = "curation:\n  max_per_input: 1\n  split: {validation: 0.25, test: 0, seed: 0}\n"
    _, curated = _prepare(tmp_path, _rows(), extra)
    assert len(curated.splits["train"]) == 15 and len(curated.splits["validation"]) == 15  # 5 inputs x 3


@pytest.mark.parametrize("task,setting", [("classification", "dedup: {conflicts: references}"),
                                          ("structured", "dedup: {conflicts: references}"),
                                          ("classification", "max_per_input: 3")])
def test_generation_only_settings_on_a_one_answer_task_are_spec_errors(tmp_path: Path, task: str, setting: str):
    spec = SUMMARY_SPEC.replace("type: summarization", f"type: {task}").replace(
        "rouge_l", "accuracy" if task == "classification" else "exact_match")
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}])
    path = write_spec(tmp_path, spec.format(extra=f"curation:\n  {setting}\n"))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    text = str(exc.value)
    field = "curation.dedup.conflicts" if "conflicts" in setting else "curation.max_per_input"
    assert field in text and "applies only to generation tasks" in text and f"task {task!r}" in text


def test_decontamination_compares_inputs_and_reports_overlap_per_source(tmp_path: Path):
    rows = _rows()
    write_jsonl(tmp_path / "test.jsonl", [{"text": _input(2).lower(), "summary": "A different description."},
                                          {"text": "name[Nowhere], eatType[pub]", "summary": "Nowhere is a pub."}])
    extra = "  test: {path: test.jsonl}\n" + NO_SPLIT
    loaded, curated = _prepare(tmp_path, rows, extra)
    assert _reasons(curated) == {f"train.jsonl:{n}": "eval_exact" for n in (7, 8, 9)}  # every answer of input 2
    step = next(s for s in curated.steps if s.name == "decontaminate")
    assert step.details["overlap"] == {"test": {"held_out_rows": 2, "exact": 3, "ngram_overlap": 0}}
    m = save_version(curated, tmp_path / "ds", "gen", loaded.sha256).manifest
    assert m["input_overlap"] == {"validation": 0, "test": 0}
    # decontamination off: the shared input stays, and the manifest and the card say so
    _, kept = _prepare(tmp_path, rows, extra + "  decontaminate: {enabled: false}\n")
    version = save_version(kept, tmp_path / "ds", "gen", loaded.sha256)
    assert version.manifest["input_overlap"] == {"validation": 0, "test": 1}
    assert "test 1" in version.card.read_text()


def test_sampling_a_generation_split_takes_whole_inputs_with_all_their_references():
    # 30 inputs with 1-4 answers each: a row sample would cut some inputs' references
    rows = [{"text": f"input number {i} about topic {i * 7}", "summary": f"answer {k} for input {i}, variant {k}"}
            for i in range(30) for k in range(1 + i % 4)]
    from tuneline.curation.steps import input_key, sample_inputs
    from tuneline.data.examples import Example

    examples = [Example(f"f:{n}", ({"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["summary"]}),
                        r["summary"]) for n, r in enumerate(rows, start=2)]
    full = {}
    for ex in examples:
        full.setdefault(input_key(ex), []).append(ex)
    for seed in range(3):
        picked = sample_inputs(examples, 40, seed)
        assert 36 <= len(picked) <= 40  # close to the cap, never over
        got = {}
        for ex in picked:
            got.setdefault(input_key(ex), []).append(ex)
        assert all(got[k] == full[k] for k in got)  # every chosen input keeps all its answers
        assert picked == [ex for ex in examples if ex in picked]  # order kept
    assert sample_inputs(examples, 40, 0) == sample_inputs(examples, 40, 0)
