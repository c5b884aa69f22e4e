"""Preference pairs (data.preferences, for train.method: dpo): validated with line numbers, curated
(same answer, PII, duplicates, held-out inputs), stored in the dataset version and counted in its id."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import banking_rows, write_csv, write_jsonl, write_spec

from tuneline.curation import prepare
from tuneline.curation.version import save_version
from tuneline.errors import DataError
from tuneline.spec import load_spec

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


def _spec(tmp_path: Path, pairs: list[dict], method: str = "dpo") -> Path:
    write_csv(tmp_path / "train.csv", banking_rows(LABELS, 4))
    write_csv(tmp_path / "test.csv", banking_rows(LABELS, 2, "test"))
    write_jsonl(tmp_path / "prefs.jsonl", pairs)
    return write_spec(tmp_path, f"""
        name: prefs
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy}}
        model: smollm2-135m
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
          preferences: {{path: prefs.jsonl, columns: {{chosen: good, rejected: bad}}}}
        train: {{method: {method}}}
    """)


def _pair(text: str, good: str = "card_arrival", bad: str = "exchange_rate") -> dict[str, str]:
    return {"text": text, "good": good, "bad": bad}


def test_pairs_are_curated_and_every_drop_is_counted(tmp_path: Path):
    test_text = banking_rows(LABELS, 2, "test")[0]["text"]
    spec = _spec(tmp_path, [
        _pair("Where is my new card? Mail me at jane@example.com"),
        _pair("Where is my new card? Mail me at jane@example.com"),  # the same pair again
        _pair("My card is lost", "lost_or_stolen_card", "lost_or_stolen_card"),  # nothing to prefer
        _pair(test_text),  # an evaluation input: never trained on
        _pair("What rate do you use for euros?", "exchange_rate", "card_arrival"),
    ])
    data = prepare(load_spec(spec))
    assert [(p.chosen, p.rejected) for p in data.preferences] == [("card_arrival", "exchange_rate"),
                                                                  ("exchange_rate", "card_arrival")]
    first = data.preferences[0]
    assert first.where == "prefs.jsonl:1"
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt[0]["content"] == "Classify the message."
    assert "jane@example.com" not in first.prompt[1]["content"]  # PII redacted as in the training rows
    assert data.curated is not None
    summary = data.curated.preferences.summary()
    assert summary["rows_read"] == 5 and summary["pairs"] == 2
    assert summary["dropped"] == {"duplicate": 1, "same_answer": 1, "held_out": 1}
    assert summary["pii_found"] == 2  # in both copies: redaction comes before the duplicate check


def test_a_row_without_a_rejected_answer_is_named_by_line_and_field(tmp_path: Path):
    spec = _spec(tmp_path, [_pair("Where is my card?"), {"text": "Is my card lost?", "good": "lost_or_stolen_card"}])
    with pytest.raises(DataError) as info:
        prepare(load_spec(spec))
    message = str(info.value)
    assert "prefs.jsonl:2" in message and "data.preferences.columns.rejected" in message


def test_the_pairs_are_stored_with_the_version_and_change_its_id(tmp_path: Path):
    spec = _spec(tmp_path, [_pair("Where is my new card?")])
    data = prepare(load_spec(spec))
    assert data.curated is not None
    version = save_version(data.curated, tmp_path / "datasets", "prefs", "sha")
    assert version.preferences() == data.preferences
    assert version.manifest["preferences"]["pairs"] == 1
    write_jsonl(tmp_path / "prefs.jsonl", [_pair("Where is my new card?", bad="lost_or_stolen_card")])
    other = prepare(load_spec(spec))
    assert other.curated is not None
    assert save_version(other.curated, tmp_path / "datasets", "prefs", "sha").id != version.id


def test_preferences_and_dpo_go_together(tmp_path: Path):
    from tuneline.errors import SpecError

    with pytest.raises(SpecError, match="preference pairs are read only by train.method: dpo"):
        load_spec(_spec(tmp_path, [_pair("x")], method="lora"))
    body = (tmp_path / "tuneline.yaml").read_text().replace("  preferences:", "  #")
    (tmp_path / "tuneline.yaml").write_text(body.replace("method: lora", "method: dpo"))
    with pytest.raises(SpecError, match="dpo trains on preference pairs: add data.preferences"):
        load_spec(tmp_path / "tuneline.yaml")
