"""The memorization probe's pieces without a model: planting canaries into the training rows only
(after curation, stored beside the dataset version, never counted as data), declared canaries, the
leak check, the `canary_leak` gate and the spec's validation of eval.canaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import spec_error, write_jsonl, write_spec

from tuneline.curation import curate, load_version, prepare, save_version
from tuneline.curation.canary import WHERE_PREFIX, canary_key
from tuneline.eval.canary import canary_prompts, canary_report, leaked, match_share
from tuneline.eval.gates import check_gates
from tuneline.eval.results import EvalSuite
from tuneline.spec import load_spec

SPEC = """
name: gen
task: {{type: {task}}}
objective: {{primary: {primary}, thresholds: ["canary_leak <= 0"]}}
model: smollm2-135m
data:
  train: {{path: train.jsonl}}
curation: {{split: {{validation: 0.2, test: 0.2, seed: 1}}}}
eval: {{canaries: {canaries}}}
"""


def _rows(n: int = 30) -> list[dict[str, str]]:
    return [{"instruction": f"Describe item number {i} of the catalogue in one sentence.",
             "response": f"Item {i} is a {('red', 'green', 'blue')[i % 3]} thing made in workshop {i * 7}."}
            for i in range(n)]


def _spec(tmp_path: Path, canaries: str = "{count: 3, repeat: 5}", task: str = "instruction",
          primary: str = "rouge_l", rows: list[dict[str, str]] | None = None) -> Path:
    write_jsonl(tmp_path / "train.jsonl", rows or _rows())
    return write_spec(tmp_path, SPEC.format(task=task, primary=primary, canaries=canaries))


def test_canaries_are_planted_in_training_only_and_not_counted_as_data(tmp_path: Path):
    loaded = load_spec(_spec(tmp_path))
    data = prepare(loaded)
    planted = [c for c in data.canaries if c.kind == "planted"]
    assert [c.id for c in planted] == ["c1", "c2", "c3"] and all(c.rows == 5 for c in planted)
    # 3 canaries x 5 repeats, each row a prompt with the secret as its answer
    assert len(data.canary_rows) == 15 and all(r.where.startswith(WHERE_PREFIX) for r in data.canary_rows)
    assert {r.reference for r in data.canary_rows} == {c.secret for c in planted}
    assert all(len(c.secret.split()) == 6 for c in planted)
    # no split holds them: not the curated training rows, not the carved validation/test rows
    for split in (data.train, data.eval, data.test):
        assert split and not any(ex.where.startswith(WHERE_PREFIX) or ex.reference in {c.secret for c in planted}
                                 for ex in split)
    # training sees them (all 15 repeats: no curation step dedups them away)
    trained = data.with_canary_rows()
    assert len(trained.train) == len(data.train) + 15 and trained.eval == data.eval and trained.test == data.test


def test_the_version_stores_the_canaries_beside_the_data_and_its_id_covers_them(tmp_path: Path):
    loaded = load_spec(_spec(tmp_path))
    curated = curate(loaded)
    version = save_version(curated, tmp_path / "datasets", "gen", loaded.sha256)
    m = version.manifest
    # the counts are the real rows; the canaries are shown on their own
    assert sum(m["counts"].values()) == 30
    assert m["canaries"]["planted"] == 3 and m["canaries"]["training_rows"] == 15
    assert version.split("train") == curated.splits["train"]  # train.parquet: no canary rows
    stored = load_version(version.id, tmp_path / "datasets").canaries()
    assert [c.secret for c in stored] == [c.secret for c in curated.canaries]
    assert json.loads((version.path / "canaries.json").read_text())["canaries"][0]["kind"] == "planted"
    assert "Canaries (memorization probe)" in version.card.read_text()
    # seeded: the same spec plants the same canaries; the version id changes with them
    assert [c.secret for c in curate(loaded).canaries] == [c.secret for c in curated.canaries]
    other = load_spec(_spec(tmp_path, "{count: 3, repeat: 5, seed: 7}"))
    other_version = save_version(curate(other), tmp_path / "datasets", "gen", other.sha256)
    assert other_version.id != version.id
    assert other_version.canaries()[0].secret != stored[0].secret


def test_structured_canaries_answer_json(tmp_path: Path):
    rows = [{"instruction": f"Extract the fields of order {i}.", "response": json.dumps({"order": i, "qty": i % 4})}
            for i in range(20)]
    data = prepare(load_spec(_spec(tmp_path, "{count: 1, repeat: 2}", task="structured", primary="json_valid",
                                   rows=rows)))
    answer = data.canary_rows[0].reference
    assert json.loads(answer) == {"passphrase": data.canaries[0].secret}


def test_declared_canaries_are_probed_with_the_prompts_of_the_rows_that_hold_them(tmp_path: Path):
    rows = _rows()
    rows[4]["response"] += " Reference code ZETA-4471-QX."
    (tmp_path / "canaries.txt").write_text("# planted by the data team\nnot in any row at all\n")
    loaded = load_spec(_spec(tmp_path, '{count: 0, strings: ["zeta-4471-qx"], file: canaries.txt}', rows=rows))
    data = prepare(loaded)
    by_id = {c.id: c for c in data.canaries}
    assert set(by_id) == {"d1", "d2"} and not data.canary_rows  # declared: nothing planted
    found, missing = by_id["d1"], by_id["d2"]
    assert found.rows == 1 and len(found.probes) == 1
    probe = found.probes[0]
    assert probe.messages[-1]["content"] == rows[4]["instruction"] and probe.answer.endswith("ZETA-4471-QX.")
    assert probe.lead_and_secret(found.secret).endswith("zeta-4471-qx")
    assert missing.secret == "not in any row at all" and missing.rows == 0 and not missing.probes
    # the report probes the one it can and names the other
    report = canary_report(data.canaries, {"candidate": ["... Reference code ZETA-4471-QX."]})
    assert report.n == 1 and report.leaked == {"candidate": 1} and report.unprobed == ["d2"]


def test_a_missing_canary_file_names_the_field(tmp_path: Path):
    from tuneline.errors import DataError

    with pytest.raises(DataError) as info:
        prepare(load_spec(_spec(tmp_path, "{count: 1, file: nowhere.txt}")))
    assert "eval.canaries.file" in str(info.value) and "nowhere.txt" in str(info.value)


def test_the_whole_secret_must_come_back_case_and_spacing_aside():
    secret = "emerald goblet tiger basil"
    assert leaked("The passphrase is Emerald  goblet\nTIGER basil.", secret)
    assert not leaked("emerald goblet tiger", secret)  # a part is not a leak ...
    assert match_share("emerald goblet tiger", secret) == pytest.approx(len("emerald goblet tiger") / len(secret))
    assert match_share("", secret) == 0.0  # ... but the report shows how much came back


def _suite(leaked_by: dict[str, int] | None) -> EvalSuite:
    suite = EvalSuite(spec="gen", task="instruction", primary="rouge_l", created="now", sets=[])
    if leaked_by is not None:
        from tuneline.eval.results import CanaryReport

        suite.canaries = CanaryReport(n=2, leaked=leaked_by)
    return suite


def test_the_canary_leak_gate_fails_a_model_that_reproduces_a_canary(tmp_path: Path):
    objective = load_spec(_spec(tmp_path)).spec.objective
    [failed] = check_gates(objective, _suite({"base": 0, "candidate": 1}))
    assert not failed.passed and failed.observed == 1.0 and failed.expr == "canary_leak <= 0"
    [passed] = check_gates(objective, _suite({"base": 0, "candidate": 0}))
    assert passed.passed and passed.observed == 0.0
    [unmeasured] = check_gates(objective, _suite(None))
    assert not unmeasured.passed and "not measured" in unmeasured.note


def test_the_report_round_trips_and_feeds_the_terminal_and_mlflow(tmp_path: Path):
    from rich.console import Console

    from tuneline.eval import flat_metrics, render_tables

    loaded = load_spec(_spec(tmp_path, "{count: 2, repeat: 1}"))
    canaries = prepare(loaded).canaries
    assert len(canary_prompts(canaries)) == 2
    suite = _suite(None)
    suite.canaries = canary_report(canaries, {"base": ["no idea", "no idea"],
                                              "candidate": [canaries[0].secret.upper(), "no idea"]})
    suite.gates = check_gates(loaded.spec.objective, suite)
    assert suite.canaries.leaked == {"base": 0, "candidate": 1} and not suite.passed
    back = EvalSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert back.canaries == suite.canaries
    assert EvalSuite.from_dict(suite.to_dict(with_rows=False)).canaries.items[0].answers == {}  # type: ignore[union-attr]
    assert flat_metrics(suite) | {"canary_leak": 1.0, "base.canary_leak": 0.0} == flat_metrics(suite)
    console = Console(record=True, width=140)
    for table in render_tables(suite):
        console.print(table)
    text = console.export_text()
    assert "memorization probe: 2 canaries" in text and "1 of 2" in text and "c1 (planted)" in text


@pytest.mark.parametrize(("canaries", "field", "words"), [
    ("{count: -1}", "eval.canaries.count", "greater than or equal to 0"),
    ("{count: 2, repeat: 0}", "eval.canaries.repeat", "greater than or equal to 1"),
    ("{count: 2, words: 2}", "eval.canaries.words", "greater than or equal to 3"),
    ("{count: 2, strings: [abc]}", "eval.canaries.strings", "shorter than 8 characters"),
    ("{count: 0}", "eval.canaries", "nothing to probe"),
    ("{count: 2, colour: red}", "eval.canaries.colour", "unknown field"),
])
def test_bad_canary_settings_are_refused_naming_the_field(tmp_path: Path, canaries: str, field: str, words: str):
    message = spec_error(tmp_path, f"eval: {{canaries: {canaries}}}")
    assert field in message and words in message


def test_classification_is_refused_and_the_gate_needs_canaries(tmp_path: Path):
    message = spec_error(tmp_path, "eval: {canaries: {count: 2}}")  # spec_error's task is classification
    assert "eval.canaries" in message and "trained on its label only" in message
    message = spec_error(tmp_path, 'objective: {primary: accuracy, thresholds: ["canary_leak <= 0"]}')
    assert "objective.thresholds[0]" in message and "eval.canaries" in message


def test_canary_key_ignores_case_unicode_form_and_spacing():
    assert canary_key("  Ｚeta\u00a0 4471\n") == "zeta 4471"
