"""Blind A/B human evaluation: export answer pairs for raters, import their preferences.

:func:`export_human` writes two files:

- a CSV for raters, one item per row: ``item, input, reference, response_a, response_b,
  preference, comment`` (a multi-reference item lists every reference in its ``reference`` cell,
  numbered, one per line: :func:`reference_cell`). ``preference`` is left empty for the rater to fill with ``A``, ``B`` or
  ``tie``. It names no system: which system's answer is ``A`` is drawn at random per item, and
  the items are shuffled, so neither the column nor the row order tells the systems apart. Rows
  whose two answers are identical are skipped (nothing to prefer).
- a JSON key kept away from raters: ``{"candidate": ..., "other": ..., "seed": ...,
  "skipped_identical": k, "items": {item: {"a": system, "b": system, "id": row id}}}``.

:func:`import_human` reads the rated CSV with its key and returns the candidate's win rate
against the other system, ties counted as half a win, with a 95% interval: the percentile
bootstrap over items (2,000 resamples of the rated items with replacement, seed 0, so the same
ratings always give the same interval), which, unlike a Wilson interval on wins, handles ties.

On a spec's last evaluation (``runs/<spec>/eval_report.json``), :func:`export_last_evaluation`
writes the sheet of one evaluation set with its key kept in the run folder, and
:func:`import_ratings` reads the rated sheet back: the win rate goes into the report, the gates
are checked again (a ``human_win_rate`` gate needs it) and, when the run is tracked, the win rate,
the sheet and the updated report are logged to its MLflow run.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from tuneline.errors import DataError, EvaluationError, Problem
from tuneline.eval.gates import check_gates
from tuneline.eval.results import EvalSuite, GateResult
from tuneline.spec import LoadedSpec
from tuneline.tracking import tracking_uri
from tuneline.workspace import EVAL_REPORT, Workspace

log = logging.getLogger(__name__)

COLUMNS = ("item", "input", "reference", "response_a", "response_b", "preference", "comment")
# A cell starting with one of these is a formula to a spreadsheet (=HYPERLINK(...), +cmd|...,
# @SUM(...)), fullwidth forms included; such a cell is written with a leading "'" so it shows as
# text. A cell starting with "'" gets one too, so reading strips exactly one and gives the text back.
FORMULA_START = frozenset("=+-@\t\r'\uff1d\uff0b\uff0d\uff20")
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_PREFERENCES = {"a": "a", "b": "b", "tie": "tie", "=": "tie"}


class HumanResult(TypedDict):
    """:func:`import_human`'s answer (stored as the evaluation report's ``human`` entry)."""

    candidate: str
    against: str
    n: int  # rated items
    unrated: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None  # (wins + ties / 2) / n; None when nothing is rated
    low: float | None  # its 95% interval
    high: float | None
    interval: str  # how the interval was computed


def export_human(
    rows: Sequence[Mapping[str, object]],
    *,
    candidate: str,
    other: str,
    out: Path,
    key_out: Path,
    n: int | None,
    seed: int,
) -> int:
    """Write the blind rating sheet ``out`` (CSV) and its key ``key_out`` (JSON).

    Each row needs ``id``, ``input``, ``reference`` and the two systems' answers under the keys
    ``candidate`` and ``other``. Rows with identical answers (after trimming whitespace) are
    skipped; of the rest, ``n`` drawn at random (all when ``n`` is None or larger). Returns the
    number of items written.
    """
    if candidate == other:
        raise ValueError(f"candidate and other are the same system {candidate!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    needed = ("id", "input", "reference", candidate, other)
    problems = [
        Problem(f"missing {', '.join(repr(k) for k in needed if k not in row)}", where=f"row {i}",
                hint=f"every row needs {', '.join(needed)}")
        for i, row in enumerate(rows) if any(k not in row for k in needed)
    ]
    if problems:
        raise DataError(problems, title="cannot export for human evaluation")
    rng = random.Random(seed)
    differing = [r for r in rows if str(r[candidate]).strip() != str(r[other]).strip()]
    skipped = len(rows) - len(differing)
    chosen = rng.sample(differing, n) if n is not None and n < len(differing) else list(differing)
    rng.shuffle(chosen)

    items: dict[str, dict[str, str]] = {}
    width = len(str(len(chosen)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for k, row in enumerate(chosen, 1):
            item = str(k).zfill(width)
            a, b = (candidate, other) if rng.random() < 0.5 else (other, candidate)
            items[item] = {"a": a, "b": b, "id": str(row["id"])}
            writer.writerow([escape_cell(c) for c in (item, row["input"], row["reference"], row[a], row[b], "", "")])
    key = {"candidate": candidate, "other": other, "seed": seed, "skipped_identical": skipped, "items": items}
    key_out.parent.mkdir(parents=True, exist_ok=True)
    key_out.write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("wrote %d items to %s (key %s); skipped %d rows with identical answers", len(chosen), out, key_out, skipped)
    return len(chosen)


def import_human(ratings: Path, key: Path) -> HumanResult:
    """The candidate's win rate from a rated sheet and its key.

    Preferences are read case-insensitively: ``A``, ``B``, ``tie`` or ``=``; an empty one counts
    as unrated, as does a key item missing from the sheet. Every row whose item is not in the
    key (or repeats) or whose preference is anything else is reported, with file and line, in
    one :class:`~tuneline.errors.DataError`.

    Returns ``candidate``, ``against``, ``n`` (rated items), ``unrated``, ``wins``, ``losses``,
    ``ties``, ``win_rate`` = (wins + ties/2) / n, and ``low``/``high``: its 95% percentile
    bootstrap interval over items (None, like ``win_rate``, when nothing is rated); ``interval``
    names the method.
    """
    meta = _read_key(key)
    items: dict[str, dict[str, str]] = meta["items"]
    cand, other = meta["candidate"], meta["other"]
    preferences, problems = _read_preferences(ratings, key, items)
    if problems:
        raise DataError(problems, title=f"bad ratings in {ratings}")
    # in sheet order: the bootstrap resamples these scores
    scores = [0.5 if pref == "tie" else float(items[item][pref] == cand) for item, pref in preferences.items()]
    wins, losses, ties = scores.count(1.0), scores.count(0.0), scores.count(0.5)
    rated = len(scores)
    win_rate: float | None = None
    low: float | None = None
    high: float | None = None
    if rated:
        win_rate = (wins + ties / 2) / rated
        low, high = bootstrap_interval(scores)
    return {
        "candidate": cand, "against": other, "n": rated, "unrated": len(items) - rated,
        "wins": wins, "losses": losses, "ties": ties, "win_rate": win_rate, "low": low, "high": high,
        "interval": f"95% percentile bootstrap over items ({RESAMPLES} resamples, seed {BOOTSTRAP_SEED})",
    }


def _read_preferences(ratings: Path, key: Path, items: dict[str, dict[str, str]]) -> tuple[dict[str, str], list[Problem]]:
    """Each rated item's preference (``a``, ``b`` or ``tie``) in sheet order, and every bad row."""
    try:
        f = ratings.open(encoding="utf-8-sig", newline="")  # utf-8-sig: a spreadsheet may add a BOM
    except OSError as exc:
        raise DataError(Problem(f"cannot read ratings: {exc.strerror}", where=str(ratings))) from exc
    preferences: dict[str, str] = {}
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in ("item", "preference") if c not in header]
        if missing:
            raise DataError(Problem(f"no column {', '.join(missing)}; the header is {header}", where=f"{ratings}:1",
                                    hint="rate the CSV written by export_human, keeping its header row"))
        col_item, col_pref = header.index("item"), header.index("preference")
        line = reader.line_num + 1  # the physical line a record starts on (quoted fields may span lines)
        for rec in reader:
            where, start, line = f"{ratings}:{line}", line, reader.line_num + 1
            if not any(cell.strip() for cell in rec):
                continue
            cells = [unescape_cell(cell) for cell in rec] + [""] * (len(header) - len(rec))  # short row: empty cells
            item, pref_raw = cells[col_item].strip(), cells[col_pref].strip()
            problem = _item_problem(item, items, seen, key, where)
            if problem is None:
                seen[item] = start
                pref = _PREFERENCES.get(pref_raw.lower()) if pref_raw else None
                if pref_raw and pref is None:
                    problem = Problem(f"preference {pref_raw!r} is not A, B or tie", where=where, field="preference",
                                      hint="write A, B or tie (or leave it empty for unrated)")
                elif pref is not None:
                    preferences[item] = pref
            if problem is not None:
                problems.append(problem)
    return preferences, problems


def _item_problem(item: str, items: dict[str, dict[str, str]], seen: dict[str, int], key: Path,
                  where: str) -> Problem | None:
    if item not in items:
        return Problem(f"unknown item {item!r}: not in the key {key}", where=where, field="item",
                       hint="keep the item column as exported; use the key written with this sheet")
    if item in seen:
        return Problem(f"item {item!r} again (first on line {seen[item]})", where=where, field="item",
                       hint="rate each item once")
    return None


def reference_cell(references: list[str]) -> str:
    """The ``reference`` cell of an item: its one reference, or every reference numbered on its own
    line (``[1] ...``) for a multi-reference item, so raters see all the answers judged good."""
    if len(references) == 1:
        return references[0]
    return "\n".join(f"[{k}] {r}" for k, r in enumerate(references, 1))


def escape_cell(value: object) -> str:
    """``value`` as a CSV cell no spreadsheet runs as a formula (see :data:`FORMULA_START`)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in FORMULA_START else text


def unescape_cell(cell: str) -> str:
    """The text :func:`escape_cell` was given."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in FORMULA_START else cell


def read_sheet(path: Path) -> list[dict[str, str]]:
    """The rows of a rating sheet, each cell as the text it stands for (escaping undone)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        return [dict(zip(header, (unescape_cell(c) for c in rec), strict=False)) for rec in reader if rec]


def bootstrap_interval(scores: list[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean of ``scores`` over bootstrap resamples."""
    import numpy as np

    arr = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(1, len(arr)))  # bounded memory for large sheets
    for s in range(0, resamples, chunk):
        k = min(chunk, resamples - s)
        means[s:s + k] = arr[rng.integers(0, len(arr), size=(k, len(arr)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _read_key(key: Path) -> dict[str, Any]:
    try:
        meta = json.loads(key.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(Problem(f"cannot read the key: {exc.strerror}", where=str(key))) from exc
    except json.JSONDecodeError as exc:
        raise DataError(Problem(f"the key is not valid JSON: {exc.msg}", where=f"{key}:{exc.lineno}")) from exc
    ok = (isinstance(meta, dict) and isinstance(meta.get("items"), dict)
          and isinstance(meta.get("candidate"), str) and isinstance(meta.get("other"), str)
          and all(isinstance(v, dict) and {"a", "b"} <= v.keys() for v in meta["items"].values()))
    if not ok:
        raise DataError(Problem("not a key written by export_human (needs candidate, other and items with a/b)",
                                where=str(key)))
    return meta


# --- on a spec's last evaluation ---------------------------------------------------------------

@dataclass(frozen=True)
class HumanExport:
    """What :func:`export_last_evaluation` wrote."""

    written: int  # items in the sheet
    skipped_identical: int  # rows left out because both answers were the same
    sheet: Path
    key: Path


@dataclass(frozen=True)
class HumanImport:
    """What :func:`import_ratings` read and where it went."""

    result: HumanResult  # now the report's ``human`` entry
    gates: list[GateResult]  # every gate checked again with the human win rate known
    logged_to: str | None  # the MLflow run the win rate was logged to (None: the run is not tracked)


def key_path(ws: Workspace, spec_name: str, sheet: Path) -> Path:
    """Where the key of a rating sheet is kept: in the run folder, named after the sheet."""
    return ws.run_dir(spec_name) / "human" / f"{sheet.stem}.key.json"


def last_evaluation(loaded: LoadedSpec, ws: Workspace) -> EvalSuite:
    """The spec's last evaluation report, or an error saying how to make one."""
    path = ws.run_dir(loaded.spec.name) / EVAL_REPORT
    if not path.is_file():
        raise EvaluationError(Problem(f"no evaluation of {loaded.spec.name!r} yet ({path} not found)",
                                    hint=f"run `tuneline run {loaded.path}` or `tuneline eval {loaded.path}` first"))
    return EvalSuite.from_dict(json.loads(path.read_text()))


def export_last_evaluation(loaded: LoadedSpec, ws: Workspace, *, out: Path, against: str = "base",
                           eval_set: str = "test", n: int | None = 100, seed: int = 0) -> HumanExport:
    """A blind sheet of the last evaluation's answers on ``eval_set`` (candidate vs ``against``:
    base or production) for raters, its key kept in the run folder (:func:`key_path`)."""
    suite = last_evaluation(loaded, ws)
    s = next((x for x in suite.sets if x.name == eval_set), None)
    if s is None:
        raise EvaluationError(Problem(f"no evaluation set {eval_set!r} in the last evaluation", field="--set",
                                    hint=f"choose one of {[x.name for x in suite.sets]}"))
    cand, other = s.system("candidate"), s.system(against)
    if cand is None or other is None:
        raise EvaluationError(Problem(f"the last evaluation has no {against!r} answers", field="--against",
                                    hint="use --against base, or evaluate with a production model first"))
    rows: list[dict[str, str]] = [
        {"id": w, "input": i, "reference": reference_cell(r), "candidate": a, against: b}
        for w, i, r, a, b in zip(s.wheres, s.inputs, s.all_references(), cand.predictions, other.predictions,
                                 strict=True)]
    key = key_path(ws, loaded.spec.name, out)
    written = export_human(rows, candidate="candidate", other=against, out=out, key_out=key, n=n, seed=seed)
    skipped = int(json.loads(key.read_text()).get("skipped_identical", 0))
    return HumanExport(written=written, skipped_identical=skipped, sheet=out, key=key)


def import_ratings(loaded: LoadedSpec, ws: Workspace, ratings: Path, key: Path | None = None) -> HumanImport:
    """Read a rated sheet (with its key, by default the one :func:`export_last_evaluation` kept) into
    the spec's last evaluation: store the win rate in the report, check the gates again, and log
    the win rate, the sheet and the report to the run's MLflow run when it has one."""
    suite = last_evaluation(loaded, ws)
    result = import_human(ratings, key or key_path(ws, loaded.spec.name, ratings))
    if not result["n"]:
        raise DataError(Problem(f"no rated items ({result['unrated']} unrated)", where=str(ratings),
                                field="preference", hint="fill the `preference` column with A, B or tie"))
    suite.human = dict(result)
    suite.gates = check_gates(loaded.spec.objective, suite)
    (ws.run_dir(loaded.spec.name) / EVAL_REPORT).write_text(json.dumps(suite.to_dict(), indent=2))
    run_id = ws.run_state(loaded.spec.name).mlflow_run_id
    if run_id:
        _log_to_run(tracking_uri(loaded, ws), run_id, result, ratings, suite)
    return HumanImport(result=result, gates=suite.gates, logged_to=run_id)


def _log_to_run(uri: str, run_id: str, result: HumanResult, ratings: Path, suite: EvalSuite) -> None:
    import mlflow

    assert result["win_rate"] is not None and result["low"] is not None and result["high"] is not None

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"human.win_rate": result["win_rate"], "human.win_rate_low": result["low"],
                            "human.win_rate_high": result["high"], "human.rated": result["n"]})
        mlflow.log_artifact(str(ratings), "human")
        mlflow.log_dict(suite.to_dict(), "eval/report.json")
