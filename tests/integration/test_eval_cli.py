"""`tuneline eval`: side-by-side table with intervals, gates that fail the command, human A/B round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from helpers import invoke_cli as _cli  # in this process: the commands' imports are loaded already

import tuneline
from tuneline.cli.exits import EXIT_GATES_FAILED
from tuneline.workspace import Workspace


def test_eval_prints_intervals_and_exits_non_zero_on_a_failed_gate(classification_spec: Path, tmp_path: Path):
    ws = Workspace.at(tmp_path / "ws")
    spec_text = classification_spec.read_text()
    classification_spec.write_text(spec_text.replace("max_steps: 4", "max_steps: 80").replace(
        'thresholds: ["accuracy >= 0.5"]',
        'thresholds: ["accuracy >= 0.0", "accuracy - base.accuracy >= 0.99", "p95_latency_ms <= 100000"]'))
    result = tuneline.run(classification_spec, workspace=ws, show_progress=False)
    assert result.report is not None and len(result.report.main_set().flips["candidate_vs_base"]) > 0

    out = _cli("eval", str(classification_spec), "-w", str(ws.root), "--no-progress")
    assert out.exit_code == EXIT_GATES_FAILED, out.output  # 3: not Click's usage error (2)
    text = " ".join(out.stdout.split())
    assert "test split: 12 rows, value [95% interval]" in text
    assert "candidate - base (p)" in text
    assert "gates FAILED" in text
    assert "accuracy - base.accuracy >= 0.99: observed" in text and "short by" in text
    report = json.loads((ws.run_dir("tiny-intents") / "eval_report.json").read_text())
    assert [g["passed"] for g in report["gates"]] == [True, False, True]
    assert report["forgetting"]["n"] >= 30 and report["latency"]["n"] == 12
    assert set(report["robustness"]["perturbations"]) == {"typos", "casing", "whitespace", "paraphrase"}

    # human evaluation: a blind A/B file out, ratings back in, the win rate stored and logged
    ab = tmp_path / "ab.csv"
    out = _cli("eval", "export-human", str(classification_spec), "-w", str(ws.root), "--out", str(ab), "-n", "12")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(ab.open()))
    key = json.loads((ws.run_dir("tiny-intents") / "human" / "ab.key.json").read_text())
    for r in rows:
        r["preference"] = "A" if key["items"][r["item"]]["a"] == "candidate" else "B"  # raters always prefer the candidate
    with ab.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = _cli("eval", "import-human", str(classification_spec), str(ab), "-w", str(ws.root))
    assert out.exit_code == 0, out.output
    assert "win rate 1.000" in out.stdout
    assert json.loads((ws.run_dir("tiny-intents") / "eval_report.json").read_text())["human"]["wins"] == len(rows)
