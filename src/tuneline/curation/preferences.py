"""Preference pairs for ``train.method: dpo``: one input, a chosen and a rejected answer.

``data.preferences`` names a file whose rows hold the task's input columns (``text`` for
classification and summarization, ``instruction``/``input``, ``source``, or a chat's ``messages``
up to the last user turn) plus ``chosen`` and ``rejected`` (mappable with ``columns:`` like any
source). Each row is validated as two rows of the task (the input with each answer), so a bad row
is reported with its file, line and field, by the spec's ``curation.validation.missing_field``
policy. Then, counted per reason:

- ``same_answer``: chosen equals rejected (nothing to prefer);
- PII in either answer or the input is redacted as in the training rows (``curation.pii``);
- ``duplicate``: the same input, chosen and rejected answer again;
- ``held_out``: an input that is also an input of the validation, test or golden rows
  (decontamination: a pair must not teach the answer to an evaluation item).

The kept pairs are stored in the dataset version (``preferences.jsonl``) and count in its id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.curation.pii import Redactor
from tuneline.curation.steps import input_key
from tuneline.data.examples import Example, Message, build_examples, column_map
from tuneline.data.readers import Record, read_records
from tuneline.errors import DataError, Problem
from tuneline.spec.models import DataSource

if TYPE_CHECKING:
    from tuneline.spec import LoadedSpec

PREFERENCES_FILE = "preferences.jsonl"
PAIR_COLUMNS = ("chosen", "rejected")
# the answer column each task's rows are built with (a chat's answer is its last assistant turn)
_ANSWER = {"classification": "label", "instruction": "response", "structured": "response",
           "summarization": "summary", "translation": "target", "chat": "messages"}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (the turns before the answer, system prompt included) and two answers to it."""

    where: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, object]:
        return {"where": self.where, "prompt": [dict(m) for m in self.prompt], "chosen": self.chosen,
                "rejected": self.rejected}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PreferencePair:
        prompt = d["prompt"]
        assert isinstance(prompt, list)
        return cls(str(d["where"]), tuple(prompt), str(d["chosen"]), str(d["rejected"]))


@dataclass
class Preferences:
    """The pairs kept, where they came from, and what was dropped by reason."""

    pairs: list[PreferencePair] = field(default_factory=list)
    path: str = ""
    sha256: str = ""
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    pii_found: int = 0

    def digest(self) -> str | None:
        """What the pairs add to a dataset version's id (None: no pairs)."""
        return pairs_digest(self.pairs)

    def summary(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "rows_read": self.rows_read, "pairs": len(self.pairs),
                "dropped": dict(self.dropped), "pii_found": self.pii_found}


def pairs_digest(pairs: list[PreferencePair]) -> str | None:
    """SHA-256 of preference pairs (None without any): part of a dataset version's id."""
    if not pairs:
        return None
    body = "\n".join(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False) for p in pairs)
    return hashlib.sha256(body.encode()).hexdigest()


def read_preferences(loaded: LoadedSpec, held_out: list[Example]) -> tuple[Preferences, list[Problem]]:
    """The spec's ``data.preferences`` as curated pairs, and the problems of rows the validation
    policy does not let pass (empty when there is no such source)."""
    spec = loaded.spec
    src = spec.data.preferences
    if src is None:
        return Preferences(), []
    read = read_records(loaded.resolve(src.path), src.resolved_format(), display=src.path)
    out = Preferences(path=src.path, sha256=read.sha256, rows_read=len(read.records) + len(read.problems))
    wanted = [*_input_columns(loaded, src), *(src.columns.get(c, c) for c in PAIR_COLUMNS)]
    missing = [c for c in wanted if c not in read.columns]
    if read.records and missing:
        raise DataError(Problem(f"column(s) {', '.join(missing)} not found; the file has {read.columns}",
                                where=f"{src.path}:1", field="data.preferences.columns",
                                hint="map them in the spec: columns: {chosen: <yours>, rejected: <yours>, ...}"))
    chosen, problems = _examples(loaded, src, read.records, "chosen")
    rejected, more = _examples(loaded, src, read.records, "rejected")
    problems += more + read.problems
    if problems and spec.curation.validation.missing_field == "fail":
        return out, problems
    out.dropped["unreadable_or_missing"] = len({p.where for p in problems})
    _keep(out, _paired(chosen, rejected), held_out, _redactor(loaded))
    return out, []


def _input_columns(loaded: LoadedSpec, src: DataSource) -> list[str]:
    task = loaded.spec.task
    answer = _ANSWER[task.type]
    return [col for logical, col in column_map(task, src).items() if logical != answer or task.type == "chat"]


def _examples(loaded: LoadedSpec, src: DataSource, records: list[Record], which: str) -> tuple[list[Example], list[Problem]]:
    """The rows built with the ``which`` answer: one example per row, or a problem naming its line."""
    task = loaded.spec.task
    cols = column_map(task, src)
    answer_col = src.columns.get(which, which)
    built = []
    for rec in records:
        fields = {logical: rec.fields.get(col) for logical, col in cols.items()}
        answer = rec.fields.get(answer_col)
        if task.type == "chat":
            turns = fields.get("messages")
            fields["messages"] = [*turns, {"role": "assistant", "content": answer}] if isinstance(turns, list) else turns
        else:
            fields[_ANSWER[task.type]] = answer
        built.append(Record(rec.file, rec.line, fields))
    examples, problems = build_examples(task, DataSource(path=src.path), built)
    named = [Problem(p.message.replace(repr(_ANSWER[task.type]), repr(which)), p.where,
                     f"data.preferences.columns.{which}" if _ANSWER[task.type] in (p.field or "") else
                     (p.field or "").replace("data.", "data.preferences.", 1), p.hint) for p in problems]
    return examples, named


def _paired(chosen: list[Example], rejected: list[Example]) -> list[PreferencePair]:
    """Rows whose chosen and rejected answer both built: one pair each (first answer of a list)."""
    by_where: dict[str, Example] = {}
    for ex in rejected:
        by_where.setdefault(ex.where, ex)
    pairs, seen = [], set()
    for ex in chosen:
        other = by_where.get(ex.where)
        if other is None or ex.where in seen:
            continue
        seen.add(ex.where)
        pairs.append(PreferencePair(ex.where, tuple(ex.messages[:-1]), ex.reference, other.reference))
    return pairs


def _redactor(loaded: LoadedSpec) -> Redactor | None:
    pii = loaded.spec.curation.pii
    return Redactor(pii.types) if loaded.spec.curation.enabled and pii.policy != "off" else None


def _keep(out: Preferences, pairs: list[PreferencePair], held_out: list[Example], redactor: Redactor | None) -> None:
    held = {input_key(ex) for ex in held_out}
    seen: set[str] = set()
    for pair in pairs:
        if pair.chosen.strip() == pair.rejected.strip():
            _drop(out, "same_answer")
            continue
        if redactor is not None:
            pair, found = _redacted(pair, redactor)
            out.pii_found += found
        probe = Example(pair.where, (*pair.prompt, {"role": "assistant", "content": pair.chosen}), pair.chosen)
        if input_key(probe) in held:
            _drop(out, "held_out")
            continue
        key = json.dumps([list(pair.prompt), pair.chosen, pair.rejected], sort_keys=True)
        if key in seen:
            _drop(out, "duplicate")
            continue
        seen.add(key)
        out.pairs.append(pair)
    out.dropped = {k: v for k, v in out.dropped.items() if v}


def _drop(out: Preferences, reason: str) -> None:
    out.dropped[reason] = out.dropped.get(reason, 0) + 1


def _redacted(pair: PreferencePair, redactor: Redactor) -> tuple[PreferencePair, int]:
    found = 0

    def clean(text: str) -> str:
        nonlocal found
        redacted, counts = redactor.redact(text)
        found += sum(counts.values())
        return redacted

    prompt = tuple(m if m["role"] == "system" else {**m, "content": clean(m["content"])} for m in pair.prompt)
    return PreferencePair(pair.where, prompt, clean(pair.chosen), clean(pair.rejected)), found


def write_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")


def load_pairs(path: Path) -> list[PreferencePair]:
    """The pairs stored at ``path`` (a version's :data:`PREFERENCES_FILE`); none when it is absent."""
    if not path.is_file():
        return []
    return [PreferencePair.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
