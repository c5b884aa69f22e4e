"""Helpers for tests: write small data files and specs."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BANKING = REPO / "examples" / "banking77" / "data"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def banking_rows(labels: list[str], per_label: int, split: str = "train") -> list[dict[str, str]]:
    """The first ``per_label`` BANKING77 rows of each of ``labels`` (real data shipped in examples/)."""
    out: list[dict[str, str]] = []
    counts = dict.fromkeys(labels, 0)
    with (BANKING / f"{split}.csv").open() as f:
        for row in csv.DictReader(f):
            lab = row["category"]
            if lab in counts and counts[lab] < per_label:
                counts[lab] += 1
                out.append(row)
    return out


def write_spec(dir_: Path, body: str) -> Path:
    p = dir_ / "tuneline.yaml"
    p.write_text(textwrap.dedent(body).lstrip())
    return p
