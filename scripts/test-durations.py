"""Refresh tests/durations.json, the seconds each test file took, which `make test` reads to start
the longest files first (tests/conftest.py): the workers then finish together instead of one
running a long file alone at the end.

    .venv/bin/pytest -n 3 --dist loadfile --no-loadscope-reorder --durations=0 -q | .venv/bin/python scripts/test-durations.py
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+([^:\s]+)::")


def main() -> None:
    seconds: Counter[str] = Counter()
    for line in sys.stdin:
        if m := LINE.match(line):
            seconds[m.group(2)] += float(m.group(1))
    if not seconds:
        sys.exit("no durations on standard input: run pytest with --durations=0")
    out = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
    kept = {f: round(s, 1) for f, s in seconds.most_common() if s >= 1.0}
    out.write_text(json.dumps(kept, indent=1) + "\n")
    print(f"{out}: {len(kept)} files, {sum(kept.values()):.0f} s in all")


if __name__ == "__main__":
    main()
