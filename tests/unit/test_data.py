"""Data: readers keep line numbers, bad rows are reported with file/line/field, never dropped silently."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl, write_spec

from tuneline.curation import prepare
from tuneline.data import read_records
from tuneline.data.examples import Example, sample_examples
from tuneline.errors import DataError
from tuneline.spec import load_spec

SPEC = """
name: t
task: {{type: {task}}}
objective: {{primary: {metric}}}
model: smollm2-135m
data:
  train: {train}
"""


def _spec(tmp_path: Path, train: str, task: str = "classification", metric: str = "accuracy") -> Path:
    return write_spec(tmp_path, SPEC.format(train=train, task=task, metric=metric))


def _problems(tmp_path: Path, train: str, **kw) -> list:
    with pytest.raises(DataError) as exc:
        prepare(load_spec(_spec(tmp_path, train, **kw)))
    assert "nothing was trained" in str(exc.value)
    return exc.value.problems


def test_csv_multiline_field_keeps_line_numbers(tmp_path: Path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",a\nthird,b\n')
    rec = read_records(p, "csv", display="d.csv").records
    assert [(r.line, r.fields["label"]) for r in rec] == [(2, "a"), (4, "b")]


def test_jsonl_bad_line_is_reported_with_line(tmp_path: Path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a", "label": "x"}\n{"text": broken\n\n[1, 2]\n{"text": "\xff"}\n')
    out = read_records(p, "jsonl", display="d.jsonl")
    assert len(out.records) == 1
    wheres = [pr.where for pr in out.problems]
    assert wheres == ["d.jsonl:2", "d.jsonl:4", "d.jsonl:5"]
    assert "invalid JSON" in out.problems[0].message
    assert "UTF-8" in out.problems[2].message


def test_parquet_rows_are_read(tmp_path: Path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", "y"]}), p)
    out = read_records(p, "parquet")
    assert [r.fields["label"] for r in out.records] == ["x", "y"]
    assert out.records[1].line == 2


def test_missing_data_file_names_file_and_field(tmp_path: Path):
    (p,) = _problems(tmp_path, "{path: nowhere.csv}")
    assert p.where == "nowhere.csv"
    assert p.field == "data.train.path"
    assert "not found" in p.message


def test_csv_without_mapped_column(tmp_path: Path):
    (tmp_path / "d.csv").write_text("text,intent\nhello,a\n")
    (p,) = _problems(tmp_path, "{path: d.csv, columns: {label: category}}")
    assert p.where == "d.csv:1"
    assert p.field == "data.train.columns.label"
    assert "'category'" in p.message and "intent" in p.message


def test_empty_dataset(tmp_path: Path):
    (tmp_path / "d.csv").write_text("text,label\n")
    (p,) = _problems(tmp_path, "{path: d.csv}")
    assert "empty" in p.message and p.where == "d.csv"


def test_empty_label_cells_listed_with_lines(tmp_path: Path):
    (tmp_path / "d.csv").write_text("text,label\nfine,a\nno label,\nalso none,  \nok,b\n")
    problems = _problems(tmp_path, "{path: d.csv}")
    assert [(p.where, p.field) for p in problems] == [("d.csv:3", "label"), ("d.csv:4", "label")]


def test_label_outside_declared_set(tmp_path: Path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    spec = write_spec(tmp_path, """
        name: t
        task: {type: classification, labels: [x, y]}
        objective: {primary: accuracy}
        model: smollm2-135m
        data: {train: {path: d.jsonl}}
    """)
    with pytest.raises(DataError) as exc:
        prepare(load_spec(spec))
    (p,) = exc.value.problems
    assert p.where == "d.jsonl:2" and "'z'" in p.message


def test_test_label_unseen_in_training_is_an_error(tmp_path: Path):
    write_jsonl(tmp_path / "tr.jsonl", [{"text": "a", "label": "x"}])
    write_jsonl(tmp_path / "te.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "new"}])
    (p,) = _problems(tmp_path, "{path: tr.jsonl}\n  test: {path: te.jsonl}")
    assert p.where == "te.jsonl:2" and p.field == "data.test"


def test_instruction_and_chat_rows(tmp_path: Path):
    write_jsonl(tmp_path / "i.jsonl", [{"q": "Sum 1 and 2", "input": "", "a": "3"}])
    loaded = load_spec(_spec(tmp_path, "{path: i.jsonl, columns: {instruction: q, response: a}}",
                             task="instruction", metric="rouge_l"))
    (ex,) = prepare(loaded).train
    assert ex.messages[-1] == {"role": "assistant", "content": "3"}
    assert ex.reference == "3"

    write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ])
    (p,) = _problems(tmp_path, "{path: c.jsonl}", task="chat", metric="rouge_l")
    assert p.where == "c.jsonl:2" and "last message must be from the assistant" in p.message


def test_stratified_sample_keeps_every_label_and_is_deterministic():
    exs = [Example(f"f:{i}", (), lab, lab) for i, lab in enumerate(["a"] * 90 + ["b"] * 9 + ["c"] * 1)]
    s1 = sample_examples(exs, 10, stratify=True, seed=0)
    s2 = sample_examples(exs, 10, stratify=True, seed=0)
    assert len(s1) == 10
    assert {e.label for e in s1} == {"a", "b", "c"}
    assert [e.where for e in s1] == [e.where for e in s2]
    assert [e.where for e in sample_examples(exs, 10, stratify=True, seed=1)] != [e.where for e in s1]


def test_stratified_sample_smaller_than_label_count_keeps_one_per_label(caplog):
    exs = [Example(f"f:{i}", (), lab, lab) for i, lab in enumerate("abcdefgh" * 3)]
    with caplog.at_level("WARNING"):
        picked = sample_examples(exs, 5, stratify=True, seed=0)
    assert sorted(e.label for e in picked) == list("abcdefgh")
    assert "below the 8 labels" in caplog.text


def test_jsonl_reading_of_valid_files_and_every_kind_of_bad_line(tmp_path: Path):
    """The fast path (one decode for the whole file, the JSON scanner per line) reads what the
    line-by-line path reads, and a bad line gets the same problem whichever path reads it."""
    lines = [b'{"text": "a", "label": "x"}', b'  {"text": "leading spaces"}  ', b'{"text": "crlf"}\r',
             b" \t ", b"\x0c", b"\xef\xbb\xbf{\"text\": \"bom\"}", b'{"a": 1}, {"b": 2}', b'{"a": 1} x',
             b'{"text": NaN, "n": 1e400}', b'"a string"', b'{"text": "ok", "extra": [1, {"b": null}]}']
    good = b"\n".join(lines) + b"\n"
    for raw in (good, good + b'{"text": "\xff"}\n'):  # the second is not UTF-8 as a whole
        p = tmp_path / "d.jsonl"
        p.write_bytes(raw)
        out = read_records(p, "jsonl", display="d.jsonl")
        assert [(r.line, sorted(r.fields)) for r in out.records] == [
            (1, ["label", "text"]), (2, ["text"]), (3, ["text"]), (9, ["n", "text"]), (11, ["extra", "text"])]
        assert [out.records[i].fields["text"] for i in (0, 1, 2, 4)] == ["a", "leading spaces", "crlf", "ok"]
        assert out.records[3].fields["text"] != out.records[3].fields["text"]  # NaN
        assert out.records[3].fields["n"] == float("inf")
        assert out.columns == ["text", "label", "n", "extra"]
        problems = [(pr.where, pr.message) for pr in out.problems]
        assert problems[:4] == [
            ("d.jsonl:6", "invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (column 1)"),
            ("d.jsonl:7", "invalid JSON: Extra data (column 9)"),
            ("d.jsonl:8", "invalid JSON: Extra data (column 10)"),
            ("d.jsonl:10", "expected a JSON object, got str"),
        ]
        if raw != good:
            assert problems[4] == ("d.jsonl:12", "invalid UTF-8 at byte 10")
            assert out.raw["d.jsonl:12"] == '{"text": "\ufffd"}'


def test_jsonl_scanner_agrees_with_json_loads():
    import json

    from tuneline.data.readers import _loads

    for text in ['{"a":1}', ' {"a":1}', '{"a":1} ', '{"a":1}\r', "\ufeff{}", '{"a":1}{"b":2}', "[1,2]", "1",
                 '"x"', "null", "NaN", "-Infinity", '{"a":', '{"a":"\\x"}', '{"a":"\x01"}', "", " ", "tru",
                 '{"a":"\\ud800"}', "1.5e3", '{"a":[1,{"b":null}]}', "\t{}\t", "{} {}"]:
        try:
            expected = ("ok", repr(json.loads(text)))
        except json.JSONDecodeError as exc:
            expected = ("error", str(exc))
        try:
            got = ("ok", repr(_loads(text)))
        except json.JSONDecodeError as exc:
            got = ("error", str(exc))
        assert got == expected, text
