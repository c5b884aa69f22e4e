"""Golden sets: registered with their hash, a changed file refused, never trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import banking_rows, write_csv, write_spec

from tuneline.curation import prepare
from tuneline.eval.golden import GoldenSetChanged, load_golden, register_golden, registered_versions
from tuneline.spec import load_spec

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


def _spec(tmp_path: Path) -> Path:
    train = banking_rows(LABELS, 10)
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "golden.csv", train[:2] + banking_rows(LABELS, 3, "test"))  # 2 rows also in train
    return write_spec(tmp_path, """
        name: golden-demo
        task: {type: classification}
        objective: {primary: accuracy, thresholds: ["golden.hard.accuracy >= 0.5"]}
        model: smollm2-135m
        data:
          train: {path: train.csv, columns: {label: category}}
        eval:
          golden:
            - {name: hard, path: golden.csv, columns: {label: category}}
    """)


def test_golden_set_is_registered_then_a_change_is_refused_until_registered_again(tmp_path: Path):
    spec = _spec(tmp_path)
    loaded = load_spec(spec)
    g = loaded.spec.eval.golden[0]
    ws = tmp_path / "ws"
    first = load_golden(loaded, g, ws)
    assert first.version == 1 and len(first.examples) == 11
    assert load_golden(loaded, g, ws).version == 1  # unchanged file: same version

    with (tmp_path / "golden.csv").open("a") as f:
        f.write("my card never came,card_arrival\n")
    with pytest.raises(GoldenSetChanged) as exc:
        load_golden(loaded, g, ws)
    msg = str(exc.value)
    assert "golden.csv" in msg and "changed on disk since it was registered as version 1" in msg
    assert "tuneline golden register" in msg and "11 -> 12 rows" in msg

    entry, created = register_golden(loaded, "hard", ws)
    assert created and entry["version"] == 2
    assert load_golden(loaded, g, ws).version == 2
    assert [v["version"] for v in registered_versions(ws, "golden-demo", "hard")] == [1, 2]
    assert Path(registered_versions(ws, "golden-demo", "hard")[0]["copy"]).read_text().count("\n") == 12  # frozen v1
    assert register_golden(loaded, "hard", ws) == (entry, False)


def test_golden_rows_are_never_trained_on(tmp_path: Path):
    spec = _spec(tmp_path)
    loaded = load_spec(spec)
    data = prepare(loaded)
    plain = spec.with_name("plain.yaml")
    plain.write_text(spec.read_text().split("eval:")[0].replace("golden.hard.accuracy", "accuracy"))
    without = prepare(load_spec(plain))
    dropped = [r for r in data.curated.rejects if r.step == "decontaminate"]
    assert len(without.train) - len(data.train) == len(dropped) >= 2
    shared = {"train.csv:2", "train.csv:3"}  # the two training rows copied into the golden set
    assert shared <= {r.where for r in dropped if r.reason.startswith("eval_exact")}
    golden_inputs = {ex.messages[-2]["content"] for ex in load_golden(loaded, loaded.spec.eval.golden[0],
                                                                      tmp_path / "ws").examples}
    assert not golden_inputs & {ex.messages[-2]["content"] for ex in data.train}
    step = next(s for s in data.curated.steps if s.name == "decontaminate")
    assert any(a.startswith("golden:hard@") for a in step.params["against"])
