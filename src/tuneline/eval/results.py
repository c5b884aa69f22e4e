"""What an evaluation produces, as plain dataclasses that round-trip through JSON.

One :class:`EvalSuite` per evaluation: for each evaluation set (the spec's test split and each
golden set) every system (``base``, ``candidate``, ``production`` when one exists) scored on the
same rows with the same prompts; paired comparisons; flips; the forgetting probe; robustness
under perturbations; latency; and the gates. The run folder keeps it as ``eval_report.json``
and MLflow as the artifact ``eval/report.json``; ``tuneline report`` renders it as HTML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("base", "candidate", "production")


@dataclass
class Estimate:
    """A metric value with its 95% bootstrap interval (``low``/``high`` None when not computed)."""

    value: float
    low: float | None = None
    high: float | None = None

    def fmt(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class Confusion:
    """Rows: the reference label; columns: the predicted label (``labels`` plus ``(invalid)``
    when some prediction is not a label)."""

    labels: list[str]
    columns: list[str]
    matrix: list[list[int]]


@dataclass
class SystemResult:
    name: str  # base | candidate | production
    model: str  # what was scored: the base model reference, or the adapter's folder / version
    metrics: dict[str, Estimate]
    seconds_per_example: float
    predictions: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # per-example primary score (1/0 for a label)
    stopped: list[bool] = field(default_factory=list)  # ended with end-of-turn, not at the token limit
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> precision, recall, f1, support
    confusion: Confusion | None = None


@dataclass
class Comparison:
    """``a`` minus ``b`` on ``metric``, paired over the same rows."""

    a: str
    b: str
    metric: str
    diff: Estimate
    p_value: float
    test: str  # mcnemar | paired_bootstrap
    significant: bool  # p < 0.05
    a_only: int | None = None  # McNemar: rows only ``a`` got right
    b_only: int | None = None  # rows only ``b`` got right


@dataclass
class Flip:
    index: int  # the item's position in its set
    where: str
    input: str
    reference: str  # the item's first reference
    before: str  # the earlier system's answer (b)
    after: str  # the later system's answer (a)
    # fixed (wrong before, right now) | broken (right before, wrong now); generation tasks, by the
    # item's primary score: improved | worsened (by at least FLIP_DELTA)
    kind: str
    closest_reference: str | None = None  # of the item's references, the closest to ``after`` (ROUGE-L)
    n_references: int = 1  # how many references the item has
    delta: float | None = None  # generation tasks: after's primary score on the item minus before's


# A generation item "flips" when its primary score (sentence BLEU, chrF, ROUGE-L, ...) moved by at least this
FLIP_DELTA = 0.2
FLIP_MEANINGS = {
    "fixed": "wrong with {earlier}, right with {later}",
    "broken": "right with {earlier}, wrong with {later}",
    "improved": "{later}'s {primary} on the item at least " + f"{FLIP_DELTA:g}" + " above {earlier}'s, largest first",
    "worsened": "{later}'s {primary} on the item at least " + f"{FLIP_DELTA:g}" + " below {earlier}'s, largest first",
}


@dataclass
class SetResult:
    """One evaluation set. ``n`` counts items: for generation tasks the rows sharing an input are
    one item with all their answers as references (``item_references``; ``references`` keeps each
    item's first one, as reports before multi-reference items had it)."""

    name: str  # "test" or the golden set's name
    kind: str  # test | golden
    n: int
    systems: list[SystemResult]
    comparisons: list[Comparison] = field(default_factory=list)
    flips: dict[str, list[Flip]] = field(default_factory=dict)  # "candidate_vs_base" -> flips
    version: int | None = None  # golden sets: the registered version
    sha256: str | None = None
    path: str | None = None
    references: list[str] = field(default_factory=list)  # per item: its first reference
    wheres: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    item_references: list[list[str]] = field(default_factory=list)  # per item: all its references

    def system(self, name: str) -> SystemResult | None:
        return next((s for s in self.systems if s.name == name), None)

    def all_references(self) -> list[list[str]]:
        """Every item's references (a report without ``item_references``: its one reference each)."""
        if len(self.item_references) == len(self.references) and self.item_references:
            return [list(r) for r in self.item_references]
        return [[r] for r in self.references]

    def reference_counts(self) -> list[int]:
        """How many references each item has (1 each in a report that did not record them)."""
        if self.item_references:
            return [len(r) for r in self.item_references]
        return [1] * self.n


@dataclass
class ProbeItem:
    question: str
    reference: str
    base: str
    candidate: str
    base_ok: bool
    candidate_ok: bool


@dataclass
class Forgetting:
    """General-ability probe: share answered right before (base) and after (candidate)."""

    n: int
    base: Estimate
    candidate: Estimate
    drop: float  # base - candidate (positive: the candidate forgot)
    items: list[ProbeItem] = field(default_factory=list)


@dataclass
class Perturbed:
    value: float
    drop: float  # clean - perturbed, on the same rows


@dataclass
class Robustness:
    set: str
    metric: str
    n: int
    clean: float
    perturbations: dict[str, Perturbed]

    @property
    def worst_drop(self) -> float:
        return max((p.drop for p in self.perturbations.values()), default=0.0)


@dataclass
class Latency:
    """One request at a time (batch 1), as a server answers a single client."""

    n: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    tokens_per_second: float


@dataclass
class CanaryItem:
    """One canary of the memorization probe: its answers per system (one per probe), whether the
    whole secret came back, and the longest share of it reproduced (best probe)."""

    id: str  # c1... planted, d1... declared
    kind: str  # planted | declared
    secret: str
    rows: int  # training rows holding it (0: a declared string not in the training answers, not probed)
    probes: int
    answers: dict[str, list[str]] = field(default_factory=dict)
    leaked: dict[str, bool] = field(default_factory=dict)
    match: dict[str, float] = field(default_factory=dict)


@dataclass
class CanaryReport:
    """The memorization probe (``eval.canaries``): ``leaked[system]`` canaries, of ``n`` probed,
    whose secret the system reproduced (the candidate's is the gate quantity ``canary_leak``)."""

    n: int
    leaked: dict[str, int]
    items: list[CanaryItem] = field(default_factory=list)
    unprobed: list[str] = field(default_factory=list)  # declared canaries no training answer holds


@dataclass
class GateResult:
    expr: str
    observed: float | None
    threshold: float
    passed: bool
    margin: float | None  # how far past (positive) or short of (negative) the threshold
    note: str = ""  # e.g. why a gate was skipped


@dataclass
class EvalSuite:
    spec: str
    task: str
    primary: str
    created: str
    sets: list[SetResult]
    gates: list[GateResult] = field(default_factory=list)
    forgetting: Forgetting | None = None
    robustness: Robustness | None = None
    latency: Latency | None = None
    human: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None  # tuneline.baseline.BaselineReport.to_dict()
    canaries: CanaryReport | None = None  # the memorization probe (eval.canaries)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def main_set(self) -> SetResult:
        return self.sets[0]

    def to_dict(self, with_rows: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        if not with_rows:
            for s in d["sets"]:
                for key in ("references", "wheres", "inputs", "item_references"):
                    s.pop(key)
                for sys_ in s["systems"]:
                    for key in ("predictions", "scores", "stopped"):
                        sys_.pop(key)
            if d["forgetting"]:
                d["forgetting"].pop("items")
            for item in (d.get("canaries") or {}).get("items", []):
                item.pop("answers")
            for o in (d.get("baselines") or {}).get("options", []):
                for key in ("scores", "correct", "predictions"):
                    o.pop(key, None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSuite:
        def est(x: dict[str, Any]) -> Estimate:
            return Estimate(**x)

        sets = []
        for s in d["sets"]:
            systems = []
            for r in s["systems"]:
                r = dict(r)
                r["metrics"] = {k: est(v) for k, v in r["metrics"].items()}
                r["confusion"] = Confusion(**r["confusion"]) if r.get("confusion") else None
                systems.append(SystemResult(**r))
            s = dict(s)
            s["systems"] = systems
            s["comparisons"] = [Comparison(**{**c, "diff": est(c["diff"])}) for c in s.get("comparisons", [])]
            s["flips"] = {k: [Flip(**f) for f in v] for k, v in s.get("flips", {}).items()}
            sets.append(SetResult(**s))
        f = d.get("forgetting")
        forgetting = None if not f else Forgetting(
            n=f["n"], base=est(f["base"]), candidate=est(f["candidate"]), drop=f["drop"],
            items=[ProbeItem(**i) for i in f.get("items", [])])
        r = d.get("robustness")
        robustness = None if not r else Robustness(
            set=r["set"], metric=r["metric"], n=r["n"], clean=r["clean"],
            perturbations={k: Perturbed(**v) for k, v in r["perturbations"].items()})
        lat = d.get("latency")
        can = d.get("canaries")
        canaries = None if not can else CanaryReport(
            n=can["n"], leaked=can["leaked"], items=[CanaryItem(**i) for i in can.get("items", [])],
            unprobed=can.get("unprobed", []))
        return cls(
            spec=d["spec"], task=d["task"], primary=d["primary"], created=d["created"], sets=sets,
            gates=[GateResult(**g) for g in d.get("gates", [])], forgetting=forgetting, robustness=robustness,
            latency=Latency(**lat) if lat else None, human=d.get("human"), baselines=d.get("baselines"),
            canaries=canaries,
        )
