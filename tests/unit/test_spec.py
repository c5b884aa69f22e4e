"""The spec: valid specs load, bad ones report every problem with field path and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.errors import SpecError
from tuneline.spec import json_schema, load_spec, parse_spec
from tuneline.spec.models import Threshold

REPO = Path(__file__).resolve().parents[2]

VALID = """\
name: demo
task:
  type: classification
objective:
  primary: accuracy
  thresholds: ["accuracy >= 0.8"]
model: smollm2-135m
data:
  train: {path: train.csv, columns: {label: category}}
"""


def test_every_shipped_example_spec_validates():
    specs = sorted((REPO / "examples").glob("**/*.yaml"))
    names = {str(p.relative_to(REPO / "examples")) for p in specs}
    assert {"banking77/tuneline.yaml", "banking77/hybrid.yaml", "banking77/search.yaml",
            "viggo/describe.yaml", "viggo/extract.yaml"} <= names
    for path in specs:
        loaded = load_spec(path)
        assert loaded.spec.name


def test_valid_spec_gets_defaults():
    spec = parse_spec(VALID)
    assert spec.train.method == "lora"
    assert spec.train.lora.r == 16
    assert spec.data.train.resolved_format() == "csv"
    assert spec.objective.parsed_thresholds()[0].check(0.81)


def test_typo_in_field_name_names_field_line_and_suggestion():
    text = VALID.replace("  primary: accuracy", "  primary: accuracy\n  treshold: 3")
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="tuneline.yaml")
    (p,) = exc.value.problems
    assert p.field == "objective.treshold"
    assert p.where == "tuneline.yaml:6"
    assert "unknown field" in p.message
    assert "thresholds" in (p.hint or "")


def test_all_errors_reported_at_once_with_lines():
    text = """\
name: demo
task:
  type: regression
objective:
  primary: accuracy
model: smollm2-135m
data:
  train: {path: train.csv}
train:
  lr: -1
  batch_size: 0
  epoch: 3
"""
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="s.yaml")
    found = {(p.field, p.where) for p in exc.value.problems}
    assert ("task.type", "s.yaml:3") in found
    assert ("train.lr", "s.yaml:10") in found
    assert ("train.batch_size", "s.yaml:11") in found
    assert ("train.epoch", "s.yaml:12") in found
    assert "4 problems" in str(exc.value)


def test_a_cross_field_problem_is_reported_with_the_field_errors_each_at_its_line():
    text = VALID.replace('"accuracy >= 0.8"', '"accuracy >= 0.8", "rouge_l >= 0.3"') + "train:\n  lr: -1\n"
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="s.yaml")
    found = {(p.field, p.where) for p in exc.value.problems}
    assert found == {("objective.thresholds[1]", "s.yaml:6"), ("train.lr", "s.yaml:11")}
    gate = next(p for p in exc.value.problems if p.field == "objective.thresholds[1]")
    assert "'rouge_l' is not reported for task 'classification'" in gate.message
    assert "2 problems" in str(exc.value)


def test_every_kind_of_cross_field_problem_names_its_field_and_line():
    text = """\
name: demo
task:
  type: classification
objective:
  primary: rouge_l
  thresholds:
    - accuracy >= 0.8
    - golden.nope.accuracy >= 0.5
model: smollm2-135m
data:
  train:
    path: train.csv
    columns:
      lable: category
  test: {path: test.txt}
eval:
  batch_size: 0
  golden:
    - {name: frozen, path: g.csv}
    - {name: frozen, path: h.csv}
curation:
  max_per_input: 3
search:
  metric: bleu
  space:
    lora.rank: {type: int, low: 4, high: 8}
"""
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="s.yaml")
    found = {(p.field, p.where) for p in exc.value.problems}
    assert found == {
        ("objective.primary", "s.yaml:5"),
        ("objective.thresholds[1]", "s.yaml:8"),
        ("data.train.columns.lable", "s.yaml:14"),
        ("data.test.format", "s.yaml:15"),
        ("eval.batch_size", "s.yaml:17"),  # a field error, reported with them
        ("eval.golden[1].name", "s.yaml:20"),
        ("curation.max_per_input", "s.yaml:22"),
        ("search.metric", "s.yaml:24"),
        ("search.space.lora.rank", "s.yaml:26"),
    }
    lines = [int(p.where.rpartition(":")[2]) for p in exc.value.problems]
    assert lines == sorted(lines)  # in the order of the file


def test_cross_field_rules_wait_for_the_fields_they_read():
    """A task type that is not one reports that, not every metric as unknown for it."""
    text = VALID.replace("type: classification", "type: regression").replace("accuracy", "nonsense")
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="s.yaml")
    assert [p.field for p in exc.value.problems] == ["task.type"]


def test_a_spec_built_in_code_is_checked_across_fields_too():
    from pydantic import ValidationError

    from tuneline.spec import Spec

    data = {"name": "x", "task": {"type": "classification"}, "objective": {"primary": "rouge_l"},
            "model": "smollm2-135m", "data": {"train": {"path": "t.csv"}}}
    with pytest.raises(ValidationError, match="objective.primary: 'rouge_l' is not reported"):
        Spec.model_validate(data)


def test_missing_required_section():
    with pytest.raises(SpecError) as exc:
        parse_spec("name: x\nmodel: smollm2-135m\n")
    fields = {p.field for p in exc.value.problems}
    assert {"task", "objective", "data"} <= fields


def test_threshold_metric_must_fit_task():
    text = VALID.replace('"accuracy >= 0.8"', '"rouge_l >= 0.3"')
    with pytest.raises(SpecError, match="rouge_l"):
        parse_spec(text)


@pytest.mark.parametrize("bad", ["accuracy => 0.8", "accuracy", ">= 0.8", "accuracy >= high"])
def test_bad_threshold_text_is_rejected(bad: str):
    with pytest.raises(ValueError, match="metric >= value"):
        Threshold.parse(bad)


def test_unmapped_logical_column_is_rejected():
    text = VALID.replace("{label: category}", "{lable: category}")
    with pytest.raises(SpecError, match="'lable' is not a column"):
        parse_spec(text)


def test_yaml_syntax_error_has_line():
    with pytest.raises(SpecError) as exc:
        parse_spec("name: x\ntask: [unclosed\nmodel: y\n", where="bad.yaml")
    assert exc.value.problems[0].where.startswith("bad.yaml:")


def test_missing_spec_file(tmp_path: Path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_json_schema_describes_the_spec():
    schema = json_schema()
    assert set(schema["required"]) >= {"name", "task", "objective", "model", "data"}
    assert "train" in schema["properties"]
    json.dumps(schema)  # serialisable


def test_gate_expressions_name_quantities_the_task_reports():
    ok = VALID.replace('"accuracy >= 0.8"', '"accuracy - base.accuracy >= 0.10", "forgetting <= 0.05", '
                                            '"p95_latency_ms <= 800", "robustness.typos <= 0.1"')
    assert len(parse_spec(ok).objective.parsed_thresholds()) == 4
    bad = VALID.replace('"accuracy >= 0.8"', '"accuracy - base.rouge_l >= 0.1", "golden.nope.accuracy >= 0.5"')
    with pytest.raises(SpecError) as exc:
        parse_spec(bad)
    text = str(exc.value)
    assert "rouge_l" in text and "no golden set named 'nope'" in text


@pytest.mark.parametrize(("yaml_text", "line"), [
    ("a: &x [*x]\n", 1),                                   # a list holding itself
    ("b: &y {k: *y}\n", 1),                                # a mapping holding itself
    ("a: &x\n  b: 1\n  <<: *x\n", 3),                      # a merge key that merges itself
    ("a: &x\n  b: &y\n    c: [1, *x]\n", 3),               # through an inner anchor
])
def test_a_self_referencing_yaml_alias_is_refused_with_file_and_line(yaml_text: str, line: int):
    with pytest.raises(SpecError) as exc:  # was: RecursionError
        parse_spec(VALID + yaml_text, where="loop.yaml")
    p = exc.value.problems[0]
    assert p.where == f"loop.yaml:{line + VALID.count(chr(10))}" and "loop" in p.message


def test_yaml_alias_bombs_and_deep_nesting_are_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True))
    with pytest.raises(SpecError, match="expands to more than"):
        parse_spec(VALID + bomb, where="bomb.yaml")
    with pytest.raises(SpecError, match="nested more than"):
        parse_spec(VALID + "deep: " + "[" * 500 + "]" * 500 + "\n", where="deep.yaml")
    # aliases that repeat a value defined before them are fine
    spec = parse_spec(VALID.replace("  train: {path: train.csv, columns: {label: category}}",
                                    "  train: &t {path: train.csv, columns: {label: category}}\n  eval: *t"))
    assert spec.data.eval is not None and spec.data.eval.path == "train.csv"


@pytest.mark.parametrize("name", ["../../etc", "/etc", "a/../../b", "..", "a\\..\\b", ".hidden", "x/y", ""])
def test_an_experiment_name_cannot_leave_the_workspace(name: str):
    text = VALID + f"tracking:\n  experiment: {json.dumps(name)}\n"
    with pytest.raises(SpecError) as exc:
        parse_spec(text, where="exp.yaml")
    p = exc.value.problems[0]
    assert p.field == "tracking.experiment" and p.where == f"exp.yaml:{VALID.count(chr(10)) + 2}"
    assert "artifact folder" in p.message


def test_ordinary_experiment_names_are_kept(tmp_path: Path):
    from tuneline.tracking import experiment_folder
    from tuneline.workspace import Workspace

    for name in ["support intents", "team-a.v2", "Exp_3+ablation@2024=a,b"]:
        assert parse_spec(VALID + f"tracking:\n  experiment: {json.dumps(name)}\n").tracking.experiment == name
    ws = Workspace.at(tmp_path / "ws")
    assert experiment_folder(ws, "support intents") == ws.artifact_root.resolve() / "support intents"
    with pytest.raises(SpecError, match="outside the workspace"):  # a spec built in code skips validation
        experiment_folder(ws, "../../etc")
