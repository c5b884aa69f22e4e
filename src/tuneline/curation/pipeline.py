"""``curate``: read a spec's sources and run the curation steps, in this order:

validation (a policy per check) -> normalization -> PII -> quality filters -> deduplication
(exact, conflicting, near) -> decontamination against the evaluation rows -> cap per class ->
split (when only a training file is given; all rows of one input in the same split) -> cap per
input (generation tasks) -> the sources' own sampling.

What a duplicate is follows the task type (:func:`dedup_rule`): for classification and
structured one input has one correct answer, so the same input with another answer is a
conflict; for generation tasks (instruction, chat, summarization, translation) different answers
to one input are references, all kept, and a duplicate is the same input *and* the same answer.

The result holds the curated splits, every dropped row with its reason, a report per step and
the content id of the data (see :mod:`tuneline.curation.version`).
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypedDict

from tuneline.curation.canary import Canary, plant
from tuneline.curation.erasure import ErasureFilter, apply_filter
from tuneline.curation.pii import Redactor, redact_json
from tuneline.curation.preferences import Preferences, read_preferences
from tuneline.curation.steps import (
    Recorder,
    Reject,
    Splits,
    StepReport,
    cap_per_class,
    cap_per_input,
    input_key,
    input_of,
    label_counts,
    map_contents,
    sample_inputs,
    stratified_split,
    text_of,
)
from tuneline.curation.textops import (
    NgramIndex,
    alpha_ratio,
    dedup_key,
    near_duplicates,
    near_duplicates_paired,
    normalize_text,
    repetition_ratio,
)
from tuneline.data import read_golden_examples
from tuneline.data.examples import Example, build_examples, check_columns, sample_examples
from tuneline.data.readers import read_records
from tuneline.data.tokenize import lengths_over
from tuneline.errors import DataError, Problem
from tuneline.spec.loader import LoadedSpec
from tuneline.spec.models import GENERATION_TASKS, CurationSpec, DedupSpec, Spec, ValidationSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 25
SPLIT_NAMES = {"train": "train", "eval": "validation", "test": "test"}  # spec section -> stored split


@dataclass(frozen=True)
class SourceInfo:
    split: str
    path: str
    sha256: str
    rows_read: int
    rows_used: int


class ConflictRow(TypedDict):
    where: str
    answer: str


class Conflict(TypedDict):
    """A group of rows with the same input and different answers."""

    split: str
    input: str
    rows: list[ConflictRow]


@dataclass
class Curated:
    splits: Splits  # train, validation, test (possibly empty)
    labels: list[str] | None
    sources: list[SourceInfo]
    steps: list[StepReport]
    rejects: list[Reject]
    pii_counts: dict[str, int] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dedup_rule: str = ""  # which duplicate rule applied, in words (see dedup_rule())
    # the memorization probe (eval.canaries): not data, so not in ``splits``; training adds ``canary_rows``
    canaries: list[Canary] = field(default_factory=list)
    canary_rows: list[Example] = field(default_factory=list)
    preferences: Preferences = field(default_factory=Preferences)  # data.preferences (train.method: dpo)


def raise_if(problems: list[Problem], what: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > MAX_LISTED_PROBLEMS:
        shown.append(Problem(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problems of the same kinds"))
    raise DataError(shown, title=f"{what}; nothing was trained")


def curate(loaded: LoadedSpec, tokenizer: PreTrainedTokenizerBase | None = None,
           erased: ErasureFilter | None = None) -> Curated:
    """Read and curate the spec's data. Raises :class:`DataError` for a check whose policy is ``fail``.

    ``tokenizer`` enables the too-long check (examples longer than ``train.seq_len`` tokens after
    templating); without it that check is skipped and training drops such rows (and counts them).
    With ``curation.enabled: false`` only validation runs (every check at its policy). ``erased``:
    the workspace's erasure filter (:mod:`tuneline.curation.erasure`), applied right after
    validation whether curation is on or off."""
    with _gc_paused():
        return _curate(loaded, tokenizer, erased)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused: curation builds hundreds of thousands of containers
    (rows, messages, keys) and no reference cycles, and the collector's passes over them would
    cost seconds. It runs again (if it ran before) when curation ends, whatever happened."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _curate(loaded: LoadedSpec, tokenizer: PreTrainedTokenizerBase | None, erased: ErasureFilter | None) -> Curated:
    spec = loaded.spec
    cur = spec.curation
    rec = Recorder()
    splits, sources, labels, problems = _read_and_check_rows(loaded, tokenizer, rec)
    raise_if(problems, "the data has problems")
    if erased is not None:  # before anything keeps a copy of a row (held-out sets, conflicts, rejects)
        splits = apply_filter(erased, splits, rec)
    out = Curated(splits, labels, sources, rec.steps, rec.rejects)
    task = spec.task.type
    out.dedup_rule = dedup_rule(task, cur.dedup) if cur.enabled else "curation disabled: no deduplication"
    if cur.enabled:
        # eval rows as read (before any sampling), for decontamination, per source
        held_out = {name: splits[name] for name in ("validation", "test") if splits[name]}
        golden = _golden_rows(loaded)
        held_out.update({f"golden:{k}": rows for k, (rows, _) in golden.items() if rows})
        splits = _normalize(cur, splits, rec)
        splits = _pii(cur, splits, rec, out)
        splits = _quality(cur, splits, rec)
        splits = _dedup(cur, task, splits, rec, out)
        splits = _decontaminate(cur, splits, held_out, rec, {k: sha for k, (_, sha) in golden.items()})
        splits = _balance(cur, splits, rec)
        splits = _split(loaded, cur, splits, rec)
        if task in GENERATION_TASKS:
            splits = _cap_per_input(cur, splits, rec)
    splits = _sample(loaded, splits, rec)
    out.splits = splits
    if not splits["train"]:
        dropped: dict[str, int] = {}
        for st in rec.steps:
            for k, v in st.dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        raise DataError(Problem(
            "curation left no training rows (dropped: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none")
            + ")", field="curation",
            hint="check the rejects (`tuneline data rejects` after a run with validation policies set to drop), "
                 "or relax the curation settings; training rows that repeat the test set are removed on purpose"))
    _plant_canaries(loaded, splits, rec, out)
    held = [*splits["validation"], *splits["test"], *(r for rows, _ in _golden_rows(loaded).values() for r in rows)]
    out.preferences, problems = read_preferences(loaded, held)
    raise_if(problems, "the preference pairs have problems")
    return out


def _plant_canaries(loaded: LoadedSpec, splits: Splits, rec: Recorder, out: Curated) -> None:
    """The memorization probe's canaries, after every other step (none dedups, samples or splits
    them away): training rows of their own, never in ``splits`` (validation and test never see them,
    and the row counts stay those of the real data); declared ones looked up in the training answers."""
    cfg = loaded.spec.eval.canaries
    if cfg is None:
        return
    with rec.step("canaries", {**cfg.model_dump(exclude={"strings"}), "strings": len(cfg.strings)}, splits) as report:
        out.canaries, out.canary_rows = plant(loaded, splits["train"])
        declared = [c for c in out.canaries if c.kind == "declared"]
        report.details = {"planted": sum(c.kind == "planted" for c in out.canaries),
                          "training_rows_added": len(out.canary_rows), "declared": len(declared),
                          "declared_in_training_answers": sum(c.rows > 0 for c in declared),
                          "note": "canary rows are added to training only; not counted in the splits' rows"}
        rec.finish(report, splits)


# --- row checks (the "validation" step: a policy per check) ---------------------------------


def _read_and_check_rows(
    loaded: LoadedSpec, tokenizer: PreTrainedTokenizerBase | None, rec: Recorder,
) -> tuple[Splits, list[SourceInfo], list[str] | None, list[Problem]]:
    spec = loaded.spec
    policy = spec.curation.validation
    fatal: list[Problem] = []
    splits: Splits = {"train": [], "validation": [], "test": []}
    sources: list[SourceInfo] = []
    with rec.step("validation", policy.model_dump(), splits) as report:
        checks = _RowChecks(policy, rec, report, fatal)
        for section, split in SPLIT_NAMES.items():
            src = getattr(spec.data, section)
            if src is not None:
                _read_source(loaded, section, split, checks, splits, sources)
        labels = _label_set(spec, splits)
        if spec.task.type == "classification":
            _check_labels(spec, splits, labels or [], checks)
        if tokenizer is not None:
            _check_lengths(spec.train.seq_len, tokenizer, splits, checks)
        else:
            report.details["too_long"] = "skipped: no tokenizer (training drops and counts such rows)"
        rec.finish(report, splits)
    return splits, sources, labels, fatal


@dataclass
class _RowChecks:
    """Where the row checks put what they find: rejects, the step's report, fatal problems."""

    policy: ValidationSpec
    rec: Recorder
    report: StepReport
    fatal: list[Problem]


def _read_source(loaded: LoadedSpec, section: str, split: str, checks: _RowChecks, splits: Splits,
                 sources: list[SourceInfo]) -> None:
    """Read one source file into ``splits[split]``: unreadable rows and rows missing a field go
    by their policy; a missing file, columns that do not fit the spec or no rows are fatal."""
    spec, report, fatal, policy = loaded.spec, checks.report, checks.fatal, checks.policy
    src = getattr(spec.data, section)
    try:
        read = read_records(loaded.resolve(src.path), src.resolved_format(), display=src.path)
    except DataError as exc:  # the file itself: missing or unparseable; always fatal
        fatal.extend(Problem(p.message, p.where, p.field or f"data.{section}.path", p.hint) for p in exc.problems)
        return
    report.rows_in += len(read.records) + len(read.problems)
    col_problems = check_columns(spec.task, src, read.columns, f"{src.path}:1", f"data.{section}")
    if col_problems:  # the file's columns do not fit the spec: always fatal
        fatal.extend(col_problems)
        return
    for p in read.problems:
        _apply(policy.unreadable, "unreadable", p, split, {"raw": read.raw.get(p.where or "", "")},
               checks.rec, report, fatal)
    examples, row_problems = build_examples(spec.task, src, read.records)
    for p in row_problems:
        row = next((r.fields for r in read.records if r.where == p.where), {})
        _apply(policy.missing_field, "missing_field", p, split, {"fields": _jsonable(row)}, checks.rec, report, fatal)
    if not read.records and not read.problems:
        fatal.append(Problem("dataset is empty: no rows", where=src.path, field=f"data.{section}",
                             hint="add rows or point the spec at another file"))
    splits[split] = examples
    sources.append(SourceInfo(split, src.path, read.sha256, len(read.records) + len(read.problems), 0))


def _label_set(spec: Spec, splits: Splits) -> list[str] | None:
    """A classification task's labels: ``task.labels``, else those seen in the training rows."""
    if spec.task.type != "classification":
        return None
    return list(spec.task.labels) if spec.task.labels else sorted({ex.label or "" for ex in splits["train"]})


def _check_labels(spec: Spec, splits: Splits, labels: list[str], checks: _RowChecks) -> None:
    """Rows whose label is not a known one go by the ``unknown_label`` policy."""
    known = set(labels)
    origin = "task.labels" if spec.task.labels else "the labels seen in training data"
    for split, examples in splits.items():
        if split == "train" and not spec.task.labels:
            continue
        kept = []
        for ex in examples:
            if ex.label in known:
                kept.append(ex)
                continue
            p = Problem(f"label {ex.label!r} is not in {origin}", where=ex.where,
                        field=f"data.{_section(split)}",
                        hint="fix the label, add it to task.labels, or add training rows for it")
            if _apply_example(checks.policy.unknown_label, "unknown_label", p, split, ex, checks.rec, checks.report,
                              checks.fatal):
                kept.append(ex)
        splits[split] = kept


def _check_lengths(limit: int, tokenizer: PreTrainedTokenizerBase, splits: Splits, checks: _RowChecks) -> None:
    """Rows longer than ``train.seq_len`` tokens after templating go by the ``too_long`` policy."""
    for split, examples in splits.items():
        over = lengths_over(tokenizer, examples, limit)
        kept = []
        for i, ex in enumerate(examples):
            if i not in over:
                kept.append(ex)
                continue
            n = over[i]
            p = Problem(f"{n} tokens after templating, over train.seq_len={limit}", where=ex.where,
                        field=f"data.{_section(split)}", hint="raise train.seq_len or shorten the row")
            if _apply_example(checks.policy.too_long, "too_long", p, split, ex, checks.rec, checks.report,
                              checks.fatal):
                kept.append(ex)
        splits[split] = kept


def _section(split: str) -> str:
    return {v: k for k, v in SPLIT_NAMES.items()}[split]


def _jsonable(fields: Mapping[str, object]) -> dict[str, object]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v) for k, v in fields.items()}


def _apply(policy: str, kind: str, p: Problem, split: str, row: Mapping[str, object], rec: Recorder, report: StepReport,
           fatal: list[Problem]) -> None:
    """A row that cannot be built: fail, or drop it (``warn`` also logs it)."""
    if policy == "fail":
        fatal.append(p)
        return
    if policy == "warn":
        log.warning("dropped %s", p)
    report.dropped[kind] = report.dropped.get(kind, 0) + 1
    rec.rejects.append(Reject(split, p.where or "", report.name, f"{kind}: {p.message}", row))


def _apply_example(policy: str, kind: str, p: Problem, split: str, ex: Example, rec: Recorder, report: StepReport,
                   fatal: list[Problem]) -> bool:
    """A built example failing a check: True when it stays (``warn``)."""
    if policy == "fail":
        fatal.append(p)
        return False
    if policy == "warn":
        log.warning("kept despite: %s", p)
        report.details.setdefault("warned", {}).setdefault(kind, 0)
        report.details["warned"][kind] += 1
        return True
    rec.reject(report, split, ex, kind, f"{kind}: {p.message}")
    return False


# --- the cleaning steps ------------------------------------------------------------------------


def _normalize(cur: CurationSpec, splits: Splits, rec: Recorder) -> Splits:
    cfg = cur.normalize
    with rec.step("normalize", cfg.model_dump(), splits) as report:
        if not cfg.enabled:
            return rec.finish(report, splits)

        unicode, whitespace, control_chars = cfg.unicode, cfg.whitespace, cfg.control_chars

        def norm(text: str) -> str:
            return normalize_text(text, unicode, whitespace, control_chars)

        out: Splits = {}
        for split, examples in splits.items():
            new = []
            for ex in examples:
                n = map_contents(ex, norm, answer_too=ex.label is None)
                report.changed += n is not ex
                new.append(n)
            out[split] = new
        return rec.finish(report, out)


def _pii(cur: CurationSpec, splits: Splits, rec: Recorder, out: Curated) -> Splits:
    """Redact (or drop) rows with PII. Rejects hold no PII either: a dropped row is kept in its
    redacted form, and rows earlier steps rejected (kept as read) are redacted here too."""
    cfg = cur.pii
    with rec.step("pii", cfg.model_dump(), splits) as report:
        if cfg.policy == "off":
            return rec.finish(report, splits)
        redactor = Redactor(cfg.types)
        for i, r in enumerate(rec.rejects):
            row, n = redact_json(r.row, redactor)
            if n:
                rec.rejects[i] = replace(r, row=row)
        counts: dict[str, int] = {}
        found: dict[str, int] = {}  # in the current row, per type

        def redact(text: str) -> str:
            new, n = redactor.redact(text)
            for k, v in n.items():
                found[k] = found.get(k, 0) + v
            return new

        result: Splits = {}
        for split, examples in splits.items():
            kept = []
            for ex in examples:
                found.clear()
                red = map_contents(ex, redact, answer_too=ex.label is None)
                if not found:
                    kept.append(ex)
                    continue
                for k, v in found.items():
                    counts[k] = counts.get(k, 0) + v
                if cfg.policy == "drop":  # the reject keeps the row redacted, and says what it held
                    rec.reject(report, split, red, "pii", "pii: contains " + ", ".join(f"{v} {k}" for k, v in found.items()))
                else:
                    report.changed += 1
                    kept.append(red)
            result[split] = kept
        report.details["found"] = dict(sorted(counts.items()))
        out.pii_counts = dict(sorted(counts.items()))
        return rec.finish(report, result)


def _quality(cur: CurationSpec, splits: Splits, rec: Recorder) -> Splits:
    cfg = cur.quality
    with rec.step("quality", cfg.model_dump(), splits) as report:
        result: Splits = {}
        min_chars, max_chars, max_repetition, min_alpha_ratio = (
            cfg.min_chars, cfg.max_chars, cfg.max_repetition, cfg.min_alpha_ratio)
        for split, examples in splits.items():
            kept = []
            for ex in examples:
                text = text_of(ex)
                n = len(text)
                if n < min_chars:
                    rec.reject(report, split, ex, "too_short", f"too_short: {n} characters < min_chars {cfg.min_chars}")
                elif n > max_chars:
                    rec.reject(report, split, ex, "too_long_text", f"too_long_text: {n} characters > max_chars {cfg.max_chars}")
                elif (r := repetition_ratio(text)) > max_repetition:
                    rec.reject(report, split, ex, "repetitive", f"repetitive: {r:.0%} of its word 3-grams repeat "
                                                                f"(max_repetition {cfg.max_repetition:g})")
                elif (a := alpha_ratio(text)) < min_alpha_ratio:
                    rec.reject(report, split, ex, "non_text", f"non_text: {a:.0%} letters "
                                                              f"(min_alpha_ratio {cfg.min_alpha_ratio:g})")
                else:
                    kept.append(ex)
            result[split] = kept
        return rec.finish(report, result)


def dedup_rule(task: str, cfg: DedupSpec) -> str:
    """Which duplicate rule applies to ``task`` with these settings, in one sentence."""
    conflicts = cfg.resolved_conflicts(task)
    answer = "label" if task == "classification" else "output" if task == "structured" else "answer"
    if task in GENERATION_TASKS:
        head = f"generation task ({task}): a duplicate is the same input and the same answer"
        near = "a near-duplicate has a near-same input and a near-same answer"
    else:
        head = (f"{task}: one correct {answer} per input; a duplicate is the same input with the same {answer}")
        near = "a near-duplicate has a near-same input"
    if conflicts == "references":
        what = "different answers to one input are kept as references"
    else:
        what = (f"different {answer}s to one input are a conflict: "
                + {"drop": "all its rows dropped", "keep_first": "the first row kept",
                   "warn": "all kept, with a warning"}[conflicts] + f" (conflicts: {conflicts})")
    parts = [head if cfg.exact else head + " (exact: false, not removed)",
             near if cfg.near else near + " (near: false, not removed)", what]
    return "; ".join(parts)


def _dedup(cur: CurationSpec, task: str, splits: Splits, rec: Recorder, out: Curated) -> Splits:
    cfg = cur.dedup
    conflicts = cfg.resolved_conflicts(task)
    paired = task in GENERATION_TASKS  # near-duplicates over input and answer
    with rec.step("dedup", {**cfg.model_dump(), "conflicts": conflicts}, splits) as report:
        report.details["rule"] = out.dedup_rule
        result: Splits = {}
        for split, examples in splits.items():
            texts = [input_of(ex) for ex in examples]
            drop: dict[int, tuple[str, str]] = {}
            if cfg.exact:
                _exact_drops(split, examples, texts, conflicts, out, drop)
            if cfg.near:
                _near_drops(cfg, paired, examples, texts, drop)
            kept = []
            for i, ex in enumerate(examples):
                if i in drop:
                    kind, reason = drop[i]
                    rec.reject(report, split, ex, kind, reason)
                else:
                    kept.append(ex)
            result[split] = kept
        report.details["conflict_groups"] = len(out.conflicts)
        return rec.finish(report, result)


def _exact_drops(split: str, examples: list[Example], texts: list[str], conflicts: str, out: Curated,
                 drop: dict[int, tuple[str, str]]) -> None:
    """Conflicting duplicates (recorded in ``out.conflicts``, dropped per ``conflicts``) and exact
    duplicates, into ``drop`` (row -> (kind, reason))."""
    inputs = [dedup_key(t) for t in texts]
    # answers repeat (labels above all): each distinct one keyed once
    answer_keys = {r: dedup_key(r) for r in {ex.reference for ex in examples}}
    answers = [answer_keys[ex.reference] for ex in examples]
    repeated = {key for key, n in Counter(inputs).items() if n > 1}
    by_input: dict[str, list[int]] = {}  # the inputs of more than one row, in order
    for i, key in enumerate(inputs):
        if key in repeated:
            by_input.setdefault(key, []).append(i)
    # conflicting duplicates: the same input with different answers (references
    # instead: kept, as the several good answers of a generation task's input)
    for rows in by_input.values() if conflicts != "references" else ():
        if len({answers[i] for i in rows}) > 1:
            _conflict(split, examples, texts, rows, conflicts, out, drop)
    # exact duplicates: the same input and the same answer as an earlier row (so only
    # rows whose input repeats can be one)
    for rows in by_input.values():
        first_with: dict[str, int] = {}  # answer -> its first row
        for i in rows:
            first = first_with.setdefault(answers[i], i)
            if first != i and i not in drop:
                drop[i] = ("exact_duplicate", f"exact_duplicate: same as {examples[first].where}")


def _conflict(split: str, examples: list[Example], texts: list[str], rows: list[int], conflicts: str,
              out: Curated, drop: dict[int, tuple[str, str]]) -> None:
    """One group of rows with the same input and different answers, handled per ``conflicts``."""
    group: list[ConflictRow] = [{"where": examples[i].where, "answer": examples[i].reference} for i in rows]
    out.conflicts.append({"split": split, "input": texts[rows[0]], "rows": group})
    head = examples[rows[0]].where
    if conflicts == "drop":
        for i in rows:
            drop[i] = ("conflict", f"conflict: the same input as {head if i != rows[0] else 'other rows'} "
                       f"with a different answer ({len(rows)} rows)")
    elif conflicts == "keep_first":
        for i in rows[1:]:
            drop[i] = ("conflict", f"conflict: the same input as {head} with a different answer "
                                   f"(conflicts: keep_first kept {head})")
    elif conflicts == "warn":
        log.warning("conflicting answers for the same input at %s", ", ".join(g["where"] for g in group))


def _near_drops(cfg: DedupSpec, paired: bool, examples: list[Example], texts: list[str],
                drop: dict[int, tuple[str, str]]) -> None:
    """Near-duplicates of an earlier row (rows already dropped are skipped), into ``drop``."""
    skip = [i in drop for i in range(len(examples))]
    if paired:
        near = near_duplicates_paired(texts, [ex.reference for ex in examples], cfg.threshold,
                                      cfg.num_perm, cfg.shingle, skip=skip)
        what = "input and answer similarity"
    else:
        near = near_duplicates(texts, cfg.threshold, cfg.num_perm, cfg.shingle, skip=skip)
        what = "similarity"
    for i, near_of in enumerate(near):
        if near_of is not None and i not in drop:
            drop[i] = ("near_duplicate", f"near_duplicate: of {examples[near_of].where} "
                                         f"({what} >= {cfg.threshold:g})")


def _golden_rows(loaded: LoadedSpec) -> dict[str, tuple[list[Example], str]]:
    """Each golden set's rows and file hash: training must never see them."""
    return {g.name: read_golden_examples(loaded, g) for g in loaded.spec.eval.golden}


def _decontaminate(cur: CurationSpec, splits: Splits, held_out: dict[str, list[Example]], rec: Recorder,
                   golden: dict[str, str] | None = None) -> Splits:
    """Drop training rows whose input equals an evaluation row's input, or shares ``threshold`` of
    its n-grams with the evaluation inputs (all held-out sources together). The step's details
    say, per held-out source, how many training rows matched it exactly and by n-gram overlap (a
    row can match several sources)."""
    cfg = cur.decontaminate
    against: list[str] = ["validation", "test"] + [f"golden:{k}@{sha[:16]}" for k, sha in (golden or {}).items()]
    with rec.step("decontaminate", {**cfg.model_dump(), "against": against}, splits) as report:
        if not cfg.enabled or not held_out:
            return rec.finish(report, splits)
        index = NgramIndex((input_of(ex) for rows in held_out.values() for ex in rows), cfg.ngram)
        kept = []
        matched: list[str] = []  # the inputs of dropped rows
        for ex in splits["train"]:
            text = input_of(ex)
            if index.exact(text):
                rec.reject(report, "train", ex, "eval_exact", "eval_exact: the same input as an evaluation row")
                matched.append(text)
            elif (share := index.overlap(text)) >= cfg.threshold:
                rec.reject(report, "train", ex, "eval_overlap",
                           f"eval_overlap: {share:.0%} of its input's {cfg.ngram}-grams occur in evaluation rows")
                matched.append(text)
            else:
                kept.append(ex)
        # per source, for the dropped rows only (a row no source matches alone was not dropped)
        overlap: dict[str, dict[str, int]] = {}
        for name, rows in held_out.items():
            exact = overlapping = 0
            if matched:
                own = NgramIndex((input_of(ex) for ex in rows), cfg.ngram)
                for text in matched:
                    if own.exact(text):
                        exact += 1
                    elif own.overlap(text) >= cfg.threshold:
                        overlapping += 1
            overlap[name] = {"held_out_rows": len(rows), "exact": exact, "ngram_overlap": overlapping}
        report.details["overlap"] = overlap
        return rec.finish(report, {**splits, "train": kept})


def _balance(cur: CurationSpec, splits: Splits, rec: Recorder) -> Splits:
    with rec.step("balance", {"max_per_class": cur.max_per_class}, splits) as report:
        report.details["before"] = {s: label_counts(v) for s, v in splits.items() if v and v[0].label is not None}
        if cur.max_per_class is None or not splits["train"] or splits["train"][0].label is None:
            return rec.finish(report, splits)
        kept, dropped = cap_per_class(splits["train"], cur.max_per_class, cur.split.seed)
        for ex in dropped:
            rec.reject(report, "train", ex, "over_cap", f"over_cap: label {ex.label!r} has more than "
                                                        f"max_per_class={cur.max_per_class} rows")
        return rec.finish(report, {**splits, "train": kept})


def _split(loaded: LoadedSpec, cur: CurationSpec, splits: Splits, rec: Recorder) -> Splits:
    """Carve the validation and test splits the spec does not give from the training rows
    (seeded, stratified by label): all rows of one input (:func:`input_key`) go to the same split,
    and the shares count inputs."""
    data = loaded.spec.data
    given = {"validation": data.eval is not None, "test": data.test is not None}
    shares = {k: v for k, v in {"validation": cur.split.validation, "test": cur.split.test}.items()
              if v > 0 and not given[k]}
    params = {**cur.split.model_dump(), "applied": sorted(shares), "group_by": "input"}
    with rec.step("split", params, splits) as report:
        if not shares:
            return rec.finish(report, splits)
        parts = stratified_split(splits["train"], shares, cur.split.seed,
                                 groups=[input_key(ex) for ex in splits["train"]])
        report.details["sizes"] = {k: len(v) for k, v in parts.items()}
        report.details["inputs"] = {k: len({input_key(ex) for ex in v}) for k, v in parts.items()}
        return rec.finish(report, {"train": parts["train"],
                                   **{k: parts[k] if k in shares else splits[k] for k in ("validation", "test")}})


def _cap_per_input(cur: CurationSpec, splits: Splits, rec: Recorder) -> Splits:
    """Generation tasks: at most ``max_per_input`` answers per input in the training split."""
    cap = cur.max_per_input
    with rec.step("cap_per_input", {"max_per_input": cap, "seed": cur.split.seed}, splits) as report:
        if cap is None or not splits["train"]:
            return rec.finish(report, splits)
        train = splits["train"]
        kept, dropped = cap_per_input(train, cap, cur.split.seed, [input_key(ex) for ex in train])
        for ex in dropped:
            rec.reject(report, "train", ex, "over_cap_input",
                       f"over_cap_input: its input has more than max_per_input={cap} answers")
        return rec.finish(report, {**splits, "train": kept})


def _sample(loaded: LoadedSpec, splits: Splits, rec: Recorder) -> Splits:
    params = {}
    for section, split in SPLIT_NAMES.items():
        src = getattr(loaded.spec.data, section)
        if src is not None and src.sample is not None:
            params[split] = src.sample.model_dump()
    generation = loaded.spec.task.type in GENERATION_TASKS
    with rec.step("sample", params, splits) as report:
        result = dict(splits)
        for split, cfg in params.items():
            before = len(splits[split])
            if generation:  # whole inputs, with all their answers
                result[split] = sample_inputs(splits[split], cfg["max_rows"], cfg["seed"])
            else:
                result[split] = sample_examples(splits[split], cfg["max_rows"], cfg["stratify"], cfg["seed"])
            if before > len(result[split]):
                report.details[split] = (f"{len(result[split])} of {before} rows selected (not rejects: unselected)"
                                         + (", whole inputs with all their answers" if generation else ""))
        return rec.finish(report, result)
