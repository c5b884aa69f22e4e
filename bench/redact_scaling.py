"""How the PII redactor's time grows with hostile input (issue 16: 20 KB of ``a@`` used to stall
the server ~0.25-0.7 s, because every ``@`` re-scanned its neighbourhood).

For each hostile shape, times ``Redactor.redact`` on 2 KB and on 20 KB of it (best of 3) and
prints the ratio: about 10 for linear time, about 100 for quadratic. Ordinary text is timed the
same way for comparison.

    python bench/redact_scaling.py
"""

from __future__ import annotations

import time

from tuneline.curation.pii import Redactor

SHAPES = {
    "a@": "a@",
    "aa@a.": "aa@a.",
    "a.a@": "a.a@",
    "a@a.b": "a@a.b",
    "0.0.0.": "0.0.0.",
    "ordinary text": "my card 4111 1111 1111 1111 was charged twice, mail me at bob@example.com ",
}


def best_of(redactor: Redactor, text: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        redactor.redact(text)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    redactor = Redactor()
    print(f"{'shape':<16}{'2 KB ms':>10}{'20 KB ms':>10}{'ratio':>8}   (linear ~10, quadratic ~100)")
    for name, unit in SHAPES.items():
        small = (unit * (2_000 // len(unit) + 1))[:2_000]
        large = (unit * (20_000 // len(unit) + 1))[:20_000]
        t_small, t_large = best_of(redactor, small), best_of(redactor, large)
        print(f"{name:<16}{1000 * t_small:>10.1f}{1000 * t_large:>10.1f}{t_large / t_small:>8.1f}")


if __name__ == "__main__":
    main()
