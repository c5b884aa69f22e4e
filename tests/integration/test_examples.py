"""The shipped example specs load, and their data curates as the README says (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.curation.steps import answers_per_input, input_key
from tuneline.eval.items import group_items
from tuneline.pipeline import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("spec", sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.glob("**/*.yaml")))
def test_every_example_spec_validates(spec: str) -> None:
    loaded, data = validate(EXAMPLES / spec)
    assert data.train, f"{spec}: no training rows after curation"


def test_viggo_describe_keeps_every_description_as_a_reference() -> None:
    loaded, data = validate(EXAMPLES / "viggo" / "describe.yaml")
    cur = data.curated
    assert cur is not None
    dropped = {k: v for st in cur.steps for k, v in st.dropped.items()}
    assert "conflict" not in dropped  # different descriptions of one input are references
    assert dropped.get("exact_duplicate", 0) < 20  # only true repeats of input and answer go
    test = data.test
    stats = answers_per_input(test)
    assert stats["inputs"] == 359 and stats["min"] >= 2  # every test input keeps all its descriptions
    items = group_items(test, "summarization")
    assert len(items) == 359 and sum(len(it.all_references) for it in items) == len(test)
    train_inputs = {input_key(ex) for ex in data.train}
    assert not train_inputs & {input_key(ex) for ex in test}  # decontaminated by input
    assert answers_per_input(data.train)["max"] > 1  # the training sample keeps inputs whole


def test_viggo_extract_has_one_output_per_input() -> None:
    loaded, data = validate(EXAMPLES / "viggo" / "extract.yaml")
    assert answers_per_input(data.train)["max"] == 1
    assert len(group_items(data.test, "structured")) == len(data.test) == 300
