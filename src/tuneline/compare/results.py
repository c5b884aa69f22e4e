"""What a comparison measured, and the recommendation: the cheapest option not significantly worse
than the best.

Each combination (base model, training method, head) is scored on the same test items. The best is
the one with the best primary metric; every other is tested against it on those items, paired
(McNemar's test for accuracy, the paired bootstrap otherwise, as the evaluation and the baselines
do), at p < :data:`ALPHA`. Among the best and the options not significantly worse than it, the
recommendation is the cheapest to run (:func:`cost_key`):

1. latency: the p50 of single requests; options within :data:`LATENCY_TIE` (10%) of the fastest
   of them count as equally fast (single-request timings move that much between runs);
2. then the adapter's size on disk (what each served variant adds to memory and to a deploy);
3. then trainable parameters, then training time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tuneline.eval import stats
from tuneline.eval.results import Estimate
from tuneline.eval.stats import Aggregate
from tuneline.spec.models import LOWER_IS_BETTER

ALPHA = 0.05
LATENCY_TIE = 0.10  # p50 latencies within 10% of the fastest count as equal
GENERATIVE = "generative"  # the head of a causal LM answering by generation (the default)

COST_RULE = (f"cheapest = lowest p50 latency (within {LATENCY_TIE:.0%} of the fastest counts as equal), then the "
             "smallest adapter on disk, then the fewest trainable parameters, then the shortest training")


@dataclass(frozen=True)
class Combination:
    """One option: a base model, a training method and the head that answers (``generative``: the
    language model generates the answer; ``classifier``: a sequence-classification head)."""

    model: str
    method: str
    head: str = GENERATIVE

    @property
    def label(self) -> str:
        """How the table names it: ``method`` (``+head`` when not generative) ``@ model``."""
        head = f"+{self.head}" if self.head != GENERATIVE else ""
        return f"{self.method}{head} @ {self.model}"


@dataclass
class Measured:
    """One combination's measurements on the test items (``state`` failed: ``error`` says why)."""

    model: str
    method: str
    head: str
    key: str  # what its result depends on (hash): a re-run with the same key reuses it
    state: str  # complete | failed
    lr: float
    lr_source: str  # spec | --set | default for the method (see compare.plan.default_lr)
    metrics: dict[str, Estimate] = field(default_factory=dict)
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    steps: int | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None  # rss (peak resident memory above the process's start) | cuda (max allocated)
    adapter_bytes: int | None = None  # the weight files of the adapter (a full fine-tune: the whole model)
    p50_ms: float | None = None
    p95_ms: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    license: str | None = None
    folder: str | None = None
    error: str | None = None
    reused: bool = False  # measured by an earlier run of the same comparison
    scores: list[float] = field(default_factory=list)  # per item: the primary metric's score
    correct: list[bool] | None = None
    predictions: list[str] = field(default_factory=list)
    vs_best: Estimate | None = None  # primary metric: this minus the best
    p_vs_best: float | None = None
    test: str | None = None  # mcnemar | paired_bootstrap
    # the primary metric over any subset of items (not saved): the paired test compares the metric
    # itself (a corpus BLEU as much as an accuracy), not a mean of per-item scores
    aggregate: Aggregate | None = field(default=None, repr=False, compare=False)

    @property
    def combination(self) -> Combination:
        return Combination(self.model, self.method, self.head)

    @property
    def label(self) -> str:
        return self.combination.label

    def to_dict(self, with_rows: bool = True) -> dict[str, object]:
        d = asdict(self)
        d.pop("aggregate")
        if not with_rows:
            for rows in ("scores", "correct", "predictions"):
                d.pop(rows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measured:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "aggregate"}
        d["metrics"] = {k: Estimate(**v) for k, v in d.get("metrics", {}).items()}
        d["vs_best"] = Estimate(**d["vs_best"]) if d.get("vs_best") else None
        return cls(**d)


@dataclass
class CompareReport:
    spec: str
    metric: str
    set: str
    n: int  # test items every combination answered
    dataset_version: str | None
    items_sha256: str  # the test items (where, references): the same rows for every combination
    combinations: list[Measured]
    best: str | None = None  # a combination's label
    recommended: str | None = None
    reasons: list[str] = field(default_factory=list)
    cost_rule: str = COST_RULE
    backend: str = "in-process"  # processes | ray (in-process: a report written before each combination got a process)
    workers: int = 1
    seconds: float = 0.0
    created: str = ""
    mlflow_run_id: str | None = None

    def get(self, label: str | None) -> Measured | None:
        return next((m for m in self.combinations if m.label == label), None)

    def to_dict(self, with_rows: bool = True) -> dict[str, object]:
        d = asdict(self)
        d["combinations"] = [m.to_dict(with_rows) for m in self.combinations]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareReport:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**d, "combinations": [Measured.from_dict(m) for m in d["combinations"]]})


# --- the recommendation -------------------------------------------------------------------------

def _quality(m: Measured, metric: str) -> float:
    value = m.metrics[metric].value
    return -value if metric in LOWER_IS_BETTER else value


def _versus_best(m: Measured, best: Measured, metric: str, resamples: int) -> None:
    """``m``'s difference to the best on the same items, and its p-value (McNemar for accuracy with
    right/wrong answers, else the paired bootstrap of the metric itself)."""
    n = len(best.scores)
    if m.aggregate is not None and best.aggregate is not None:
        diff, p = stats.paired_bootstrap(m.aggregate, best.aggregate, n, resamples=resamples)
    else:  # read back from JSON: the per-item scores
        diff, p = stats.paired_bootstrap(stats.mean_metric(np.asarray(m.scores)),
                                         stats.mean_metric(np.asarray(best.scores)), n, resamples=resamples)
    m.test = "paired_bootstrap"
    if metric == "accuracy" and m.correct is not None and best.correct is not None:
        p = stats.mcnemar(np.asarray(m.correct), np.asarray(best.correct))[0]
        m.test = "mcnemar"
    m.vs_best, m.p_vs_best = Estimate(diff.value, diff.low, diff.high), float(p)


def cost_key(m: Measured, fastest_ms: float) -> tuple[int, float, float, float, float, str]:
    """Cheaper first (:data:`COST_RULE`): within the latency tie of ``fastest_ms`` (10%) or not
    (then by p50), then adapter bytes, trainable parameters and training seconds; the label last,
    so equal costs pick the same option every time."""
    p50 = _num(m.p50_ms)
    slower = int(p50 > fastest_ms * (1 + LATENCY_TIE))
    return (slower, p50 if slower else 0.0, _num(m.adapter_bytes), _num(m.trainable_params),
            _num(m.train_seconds), m.label)


def _num(x: float | None) -> float:
    return float(x) if x is not None else math.inf


def recommend(report: CompareReport, resamples: int = stats.RESAMPLES) -> CompareReport:
    """Pick the best combination, test every other against it on the same items, and recommend the
    cheapest one not significantly worse (:data:`COST_RULE`); the reasons say why in words."""
    metric = report.metric
    measured = [m for m in report.combinations if m.state == "complete" and metric in m.metrics and m.scores]
    if not measured:
        report.best = report.recommended = None
        report.reasons = ["no combination was measured"]
        return report
    best = max(measured, key=lambda m: (_quality(m, metric), -measured.index(m)))
    report.best = best.label
    for m in measured:
        if m is best:
            m.vs_best, m.p_vs_best, m.test = Estimate(0.0, 0.0, 0.0), 1.0, None
        elif len(m.scores) == len(best.scores):
            _versus_best(m, best, metric, resamples)
    tied = [m for m in measured if m is best or (m.p_vs_best is not None and m.p_vs_best >= ALPHA)]
    fastest = min(_num(m.p50_ms) for m in tied)
    pick = min(tied, key=lambda m: cost_key(m, fastest))
    report.recommended = pick.label
    report.reasons = _reasons(pick, best, tied, [m for m in measured if m not in tied], metric)
    return report


def _reasons(pick: Measured, best: Measured, tied: list[Measured], worse: list[Measured], metric: str) -> list[str]:
    value = pick.metrics[metric]
    if pick is best:
        reasons = [f"{pick.label}: it has the best {metric}, {value.fmt()}"
                   + ("" if len(tied) == 1 else
                      f", and it is the cheapest of the {len(tied)} options within noise of each other "
                      f"({cost_text(pick)})") + "."]
    else:
        reasons = [f"{pick.label}: its {metric} {value.fmt()} is not significantly below the best "
                   f"({best.label}, {best.metrics[metric].value:.3f}; p = {pick.p_vs_best:.3g}), and it costs "
                   f"less: {cost_text(pick)} against {cost_text(best)}."]
    if worse:
        reasons.append(f"Significantly worse than the best (p < {ALPHA}): {', '.join(m.label for m in worse)}.")
    reasons.append(f"Cost order: {COST_RULE}.")
    return reasons


def cost_text(m: Measured) -> str:
    """``p50 12 ms, adapter 1.2 MB, 0.2M trainable``: what the cost order compares."""
    parts = [f"p50 {m.p50_ms:.0f} ms" if m.p50_ms is not None else "p50 not measured"]
    if m.adapter_bytes is not None:
        parts.append(f"adapter {human_bytes(m.adapter_bytes)}")
    if m.trainable_params is not None:
        parts.append(f"{human_count(m.trainable_params)} trainable")
    return ", ".join(parts)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if n < 10 * size else f"{n / size:.1f}{unit}"
    return str(n)
