"""The curation steps, each a function over the examples of every split.

Every step takes and returns ``{split: [Example]}``, records what it did in a :class:`StepReport`
(rows in and out, drops per reason, rows changed, seconds) and turns every row it drops into a
:class:`Reject` that keeps the row and says why. Nothing is dropped without being counted.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict

from tuneline.curation.textops import dedup_key
from tuneline.data.examples import Example, Message

Splits = dict[str, list[Example]]


class ExampleRow(TypedDict):
    """The JSON form of an example (:func:`example_row`)."""

    messages: list[Message]
    reference: str
    label: str | None


class RejectRow(TypedDict):
    """A reject as stored in ``rejects.jsonl`` (:meth:`Reject.to_dict`)."""

    split: str
    where: str
    step: str
    reason: str
    row: Mapping[str, object]  # the example's JSON form, or the fields of a row that could not become one


class StepRow(TypedDict):
    """A step's report as stored in a manifest (:meth:`StepReport.to_dict`)."""

    name: str
    params: dict[str, object]
    rows_in: int
    rows_out: int
    dropped: dict[str, int]
    changed: int
    seconds: float
    details: dict[str, Any]  # step-specific (counts, notes): an open JSON object


@dataclass(frozen=True)
class Reject:
    """A row curation dropped: where it came from, which step dropped it, why, and the row."""

    split: str
    where: str
    step: str
    reason: str
    row: Mapping[str, object]

    def to_dict(self) -> RejectRow:
        return {"split": self.split, "where": self.where, "step": self.step, "reason": self.reason, "row": self.row}


@dataclass
class StepReport:
    name: str
    params: dict[str, object]
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason kind -> rows
    changed: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> StepRow:
        return {"name": self.name, "params": self.params, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "dropped": self.dropped, "changed": self.changed, "seconds": round(self.seconds, 4),
                "details": self.details}


class Recorder:
    """Collects step reports and rejects while the steps run."""

    def __init__(self) -> None:
        self.steps: list[StepReport] = []
        self.rejects: list[Reject] = []

    @contextmanager
    def step(self, name: str, params: dict[str, object], splits: Splits) -> Iterator[StepReport]:
        report = StepReport(name, params, rows_in=_count(splits))
        t0 = time.perf_counter()
        yield report
        report.seconds = time.perf_counter() - t0
        self.steps.append(report)

    def reject(self, report: StepReport, split: str, ex: Example, kind: str, reason: str) -> None:
        report.dropped[kind] = report.dropped.get(kind, 0) + 1
        self.rejects.append(Reject(split, ex.where, report.name, reason, example_row(ex)))

    def finish(self, report: StepReport, splits: Splits) -> Splits:
        report.rows_out = _count(splits)
        return splits


def _count(splits: Splits) -> int:
    return sum(len(v) for v in splits.values())


def example_row(ex: Example) -> ExampleRow:
    """The JSON form of an example, as stored in a dataset version."""
    return {"messages": [dict(m) for m in ex.messages], "reference": ex.reference, "label": ex.label}


def text_of(ex: Example) -> str:
    """What curation reads: every turn but the system prompt (which comes from the spec)."""
    msgs = ex.messages
    if len(msgs) == 2 and msgs[0]["role"] != "system" and msgs[1]["role"] != "system":  # question, answer
        return f"{msgs[0]['content']}\n{msgs[1]['content']}"
    return "\n".join([m["content"] for m in msgs if m["role"] != "system"])


def input_of(ex: Example) -> str:
    """The input side: every turn before the final answer, the system prompt excepted."""
    msgs = ex.messages
    if len(msgs) == 2 and msgs[0]["role"] != "system":
        return msgs[0]["content"]
    return "\n".join([m["content"] for m in msgs[:-1] if m["role"] != "system"])


def map_contents(ex: Example, fn: Callable[[str], str], answer_too: bool) -> Example:
    """``ex`` with ``fn`` applied to each non-system turn (the final answer only if ``answer_too``);
    ``ex`` itself when ``fn`` changed none of them."""
    msgs = ex.messages
    last = len(msgs) - 1
    new: list[str] | None = None  # the new contents, once one differs
    for i in range(len(msgs) if answer_too else last):
        m = msgs[i]
        if m["role"] == "system":
            continue
        content = m["content"]
        mapped = fn(content)
        if mapped != content and new is None:
            new = [m["content"] for m in msgs]
        if new is not None:
            new[i] = mapped
    if new is None:
        return ex
    mapped_msgs = tuple(m if m["role"] == "system" or (i == last and not answer_too) else {**m, "content": new[i]}
                        for i, m in enumerate(msgs))
    reference = mapped_msgs[-1]["content"] if ex.label is None else ex.reference
    return Example(ex.where, mapped_msgs, reference, ex.label)


def stratified_split(examples: list[Example], shares: dict[str, float], seed: int,
                     groups: Sequence[Hashable] | None = None) -> dict[str, list[Example]]:
    """Split ``examples`` into named parts of the given shares (the rest: "train"), per label when
    labelled, seeded; every part keeps the input order.

    With ``groups`` (a key per row, e.g. the normalized input) the rows of one group go to the same
    part: the shares count groups, a group's label is its first row's, and "train" keeps at least
    one group per label. Without it every row is its own group (the same split as with all keys
    distinct)."""
    rng = random.Random(seed)
    by_label: dict[str | None, list[list[int]]] = defaultdict(list)  # label -> its groups' rows
    group_rows: dict[Hashable, list[int]] = {}
    for i, ex in enumerate(examples):
        key = groups[i] if groups is not None else i
        rows = group_rows.get(key)
        if rows is None:
            rows = group_rows[key] = []
            by_label[ex.label].append(rows)
        rows.append(i)
    assigned: dict[int, str] = {}
    for label in sorted(by_label, key=lambda k: (k is None, k or "")):
        members = by_label[label][:]
        rng.shuffle(members)
        at = 0
        for name, share in shares.items():
            take = int(round(share * len(members)))
            take = min(take, len(members) - at - 1) if len(members) - at > 1 else 0  # leave training groups
            for rows in members[at : at + take]:
                for i in rows:
                    assigned[i] = name
            at += take
    parts: dict[str, list[Example]] = {"train": [], **{name: [] for name in shares}}
    for i, ex in enumerate(examples):
        parts[assigned.get(i, "train")].append(ex)
    return parts


def cap_per_input(examples: list[Example], cap: int, seed: int,
                  keys: Sequence[Hashable]) -> tuple[list[Example], list[Example]]:
    """(kept, dropped): at most ``cap`` rows per key (input), chosen with a seeded shuffle of each
    larger group, groups in order of first appearance; order kept."""
    rng = random.Random(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    drop: set[int] = set()
    for rows in groups.values():
        if len(rows) > cap:
            chosen = rows[:]
            rng.shuffle(chosen)
            drop.update(chosen[cap:])
    return ([ex for i, ex in enumerate(examples) if i not in drop], [ex for i, ex in enumerate(examples) if i in drop])


def input_key(ex: Example) -> str:
    """The key rows of one input share (for references, group-aware splits, answers per input):
    the input turns, case and spacing ignored."""
    return dedup_key(input_of(ex))


def sample_inputs(examples: list[Example], max_rows: int, seed: int) -> list[Example]:
    """At most ``max_rows`` rows, taken as whole inputs: every answer of a chosen input comes along
    (a row sample would drop some of an input's references). Inputs are chosen in a seeded order;
    one that would overshoot ``max_rows`` is passed over for smaller ones, so the sample is as close
    to ``max_rows`` as the groups allow. Rows keep their order."""
    if len(examples) <= max_rows:
        return list(examples)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(input_key(ex), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    keep: set[int] = set()
    for rows in order:
        if len(keep) + len(rows) <= max_rows:
            keep.update(rows)
            if len(keep) == max_rows:
                break
    return [ex for i, ex in enumerate(examples) if i in keep]


def answers_per_input(examples: list[Example]) -> dict[str, float]:
    """How many rows each distinct input has: inputs, rows, min, median, max."""
    counts = sorted(Counter(input_key(ex) for ex in examples).values())
    if not counts:
        return {"inputs": 0, "rows": 0, "min": 0, "median": 0, "max": 0}
    return {"inputs": len(counts), "rows": len(examples), "min": counts[0],
            "median": statistics.median(counts), "max": counts[-1]}


def cap_per_class(examples: list[Example], cap: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, dropped): at most ``cap`` rows per label, chosen with a seeded shuffle; order kept."""
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.label].append(i)
    keep: set[int] = set()
    for key in sorted(groups, key=lambda k: (k is None, k or "")):
        idx = groups[key][:]
        rng.shuffle(idx)
        keep.update(idx[:cap])
    return ([ex for i, ex in enumerate(examples) if i in keep], [ex for i, ex in enumerate(examples) if i not in keep])


def label_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(ex.label or "" for ex in examples).items()))
