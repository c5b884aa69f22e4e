"""A sample evaluation suite and run artifacts for the HTML report's tests, and the page rendered
from them."""

from __future__ import annotations

import functools
import random

from tuneline.eval.results import (
    Comparison,
    Confusion,
    Estimate,
    EvalSuite,
    Flip,
    Forgetting,
    GateResult,
    Latency,
    Perturbed,
    ProbeItem,
    Robustness,
    SetResult,
    SystemResult,
)
from tuneline.report import render_html

EVIL = '<script>alert("x")</script>'
N_LABELS = 77


def make_suite() -> EvalSuite:
    """A classification suite shaped like BANKING77: 77 labels, base/candidate/production on the
    test split, a golden set, every optional section filled, one gate failing."""
    rng = random.Random(0)
    labels = [f"intent_{i:02d}" for i in range(N_LABELS - 1)] + ["card <b>&amp; co"]
    columns = [*labels, "(invalid)"]

    def confusion(acc: float) -> Confusion:
        m = [[0] * len(columns) for _ in labels]
        for i in range(len(labels)):
            for _ in range(13):
                j = i if rng.random() < acc else rng.choice([(i + 1) % len(labels), (i + 7) % len(labels), len(labels)])
                m[i][j] += 1
        return Confusion(labels, columns, m)

    def per_class(acc: float) -> dict[str, dict[str, float]]:
        out = {}
        for lab in labels:
            f1 = min(1.0, max(0.0, acc + rng.uniform(-0.2, 0.2)))
            out[lab] = {"precision": f1, "recall": f1, "f1": f1, "support": 13.0}
        return out

    def system(name: str, acc: float, with_detail: bool = True) -> SystemResult:
        return SystemResult(
            name=name, model=f"models/{name}", seconds_per_example=0.03 + acc / 100,
            metrics={"accuracy": Estimate(acc, acc - 0.03, acc + 0.03),
                     "macro_f1": Estimate(acc - 0.01, acc - 0.045, acc + 0.02)},
            per_class=per_class(acc) if with_detail else {},
            confusion=confusion(acc) if with_detail else None,
        )

    fixed = [Flip(i, f"test.csv:{i + 2}", f"message {i}" if i else EVIL, labels[i % N_LABELS],
                  labels[(i + 1) % N_LABELS], labels[i % N_LABELS], "fixed") for i in range(60)]
    broken = [Flip(100 + i, f"test.csv:{102 + i}", f"broken message {i}", labels[i], labels[i],
                   labels[i + 3], "broken") for i in range(4)]
    test = SetResult(
        name="test", kind="test", n=N_LABELS * 13,
        systems=[system("base", 0.31), system("candidate", 0.86), system("production", 0.81)],
        comparisons=[
            Comparison("candidate", "base", "accuracy", Estimate(0.55, 0.51, 0.59), 1e-9, "mcnemar", True, 560, 11),
            Comparison("candidate", "production", "accuracy", Estimate(0.05, -0.01, 0.1), 0.09, "mcnemar", False, 70, 31),
        ],
        flips={"candidate_vs_base": fixed + broken},
    )
    golden = SetResult(
        name="golden-v3 <edge cases>", kind="golden", n=40, version=3, sha256="ab" * 32, path="golden/edge.jsonl",
        systems=[system("base", 0.4, with_detail=False), system("candidate", 0.7, with_detail=False)],
        comparisons=[Comparison("candidate", "base", "accuracy", Estimate(0.3, 0.1, 0.5), 0.004, "mcnemar", True, 14, 2)],
    )
    forgetting = Forgetting(
        n=30, base=Estimate(0.6, 0.43, 0.77), candidate=Estimate(0.53, 0.37, 0.7), drop=0.07,
        items=[ProbeItem(f"What is {i} + {i}?", str(2 * i), str(2 * i), str(2 * i) if i % 4 else "?", True, bool(i % 4))
               for i in range(30)])
    robustness = Robustness(set="test", metric="accuracy", n=200, clean=0.86,
                            perturbations={"typos": Perturbed(0.79, 0.07), "lowercase": Perturbed(0.85, 0.01),
                                           "extra whitespace": Perturbed(0.86, 0.0)})
    gates = [
        GateResult("accuracy >= 0.75", 0.86, 0.75, True, 0.11),
        GateResult("macro_f1 >= 0.90", 0.85, 0.90, False, -0.05),
        GateResult("forgetting.drop <= 0.10", 0.07, 0.10, True, 0.03, note="probe of 30 general questions"),
    ]
    return EvalSuite(
        spec="banking77-intents", task="classification", primary="accuracy", created="2026-12-01T10:00:00Z",
        sets=[test, golden], gates=gates, forgetting=forgetting, robustness=robustness,
        latency=Latency(n=50, p50_ms=41.5, p95_ms=77.25, mean_ms=45.0, tokens_per_second=212.4),
        human={"against": "base", "n": 40, "win_rate": 0.6, "low": 0.45, "high": 0.74, "wins": 20, "losses": 12,
               "ties": 8},
    )


MANIFEST = {"id": "ds-0123456789abcdef", "spec": "banking77-intents", "created": "2026-11-30T09:00:00Z",
            "counts": {"train": 2855, "validation": 0, "test": 1000}, "rejected": 145,
            "dropped_by_reason": {"exact_duplicate": 45, "test_overlap": 100}, "pii_found": {"email": 3}}
SPEC_TEXT = "name: banking77-intents\ntask:\n  type: classification\n  instruction: \"Answer <label> only & nothing else\"\n"
CURVES = {"train_loss": [(s, 2.5 / (1 + s / 20)) for s in range(0, 200, 5)], "eval_loss": [(100, 0.9), (199, 0.7)]}


@functools.cache
def default_page() -> str:
    return render()


def render(suite: EvalSuite | None = None) -> str:
    return render_html(suite or make_suite(), title="tuneline report: banking77-intents (abc123)",
                       spec_text=SPEC_TEXT, dataset=MANIFEST, loss_curves=CURVES,
                       run_info={"run id": "abc123def456", "experiment": "banking77-intents"})


def make_multiref_suite() -> EvalSuite:
    """A summarization suite whose 3 test items have 3, 1 and 5 references, with two flips."""
    refs = [["The Witcher 3 is a great RPG.", "A great RPG: The Witcher 3.", "The Witcher 3, from 2015."],
            ["Dirt is a driving game."],
            ["Portal 2 is fun.", "I liked Portal 2.", "Portal 2 <b>rocks</b>.", "Portal 2!", "Portal 2, a puzzle game."]]
    metrics = {"rouge_l": Estimate(0.5, 0.4, 0.6), "exact_match": Estimate(0.33, 0.0, 1.0)}
    flips = [Flip(2, "d.jsonl:3", "inform(name[Portal 2])", refs[2][0], "Bad.", "Portal 2!", "fixed",
                  "Portal 2!", 5),
             Flip(1, "d.jsonl:2", "inform(name[Dirt])", refs[1][0], "Dirt is a driving game.", "Dirt.", "broken",
                  refs[1][0], 1)]
    test = SetResult(name="test", kind="test", n=3,
                     systems=[SystemResult("base", "m", metrics, 0.1, ["x", "y", "z"]),
                              SystemResult("candidate", "m+a", metrics, 0.1, ["x", "Dirt.", "Portal 2!"])],
                     flips={"candidate_vs_base": flips}, references=[r[0] for r in refs],
                     wheres=["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"], inputs=["a", "b", "c"], item_references=refs)
    return EvalSuite(spec="viggo", task="summarization", primary="rouge_l", created="2026-12-01T10:00:00Z",
                     sets=[test])
