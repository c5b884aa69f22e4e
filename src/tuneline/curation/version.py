"""Dataset versions: curated splits stored as Parquet under the workspace, with a manifest, the
rejected rows and a data card.

The version id is the SHA-256 of the canonical rows (each split's rows in order, as sorted-key
JSON, plus the label set): the same inputs and steps always give the same id, and any change to
a row gives a new one. ``where`` (file:line) is kept in the files but not hashed, so moving a row
within a source file changes nothing but its location.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict

from tuneline.curation.canary import CANARIES_FILE, Canary, canaries_digest
from tuneline.curation.pipeline import Conflict, Curated
from tuneline.curation.preferences import (
    PREFERENCES_FILE,
    PreferencePair,
    load_pairs,
    pairs_digest,
    write_pairs,
)
from tuneline.curation.steps import (
    RejectRow,
    StepRow,
    answers_per_input,
    example_row,
    input_key,
    text_of,
)
from tuneline.data.examples import Example
from tuneline.errors import DataError, Problem

SPLITS = ("train", "validation", "test")
PREFIX = "ds-"


class ManifestSource(TypedDict):
    split: str
    path: str
    sha256: str
    rows: int


class ErasureRecord(TypedDict):
    """Rows removed from a stored version by an erasure request (``tuneline data forget``): the
    request's id, when, and counts -- never the content."""

    id: str
    at: str
    removed: dict[str, int]  # split -> rows
    rejects: int
    conflicts: int  # conflict groups (or rows of them) removed


class Manifest(TypedDict):
    """A dataset version's ``manifest.json`` (:func:`manifest_of`; keys marked NotRequired are absent
    from the manifests of older versions)."""

    id: str
    spec: str
    spec_sha256: str
    created: str
    sources: list[ManifestSource]
    steps: list[StepRow]
    counts: dict[str, int]
    rejected: int
    dropped_by_reason: dict[str, int]
    pii_found: dict[str, int]
    conflicts: list[Conflict]
    conflict_groups: int
    dedup_rule: NotRequired[str]
    answers_per_input: NotRequired[dict[str, dict[str, float]]]
    input_overlap: NotRequired[dict[str, int]]
    labels: list[str] | None
    label_counts: dict[str, dict[str, int]]
    lengths: dict[str, dict[str, float]]
    canaries: NotRequired[CanarySummary]
    preferences: NotRequired[dict[str, object]]  # data.preferences: Preferences.summary() and the file
    erasures: NotRequired[list[ErasureRecord]]


class CanarySummary(TypedDict):
    """The memorization probe's canaries of a version (``canaries.json`` lists them): training rows
    that are not data, so not counted in ``counts``."""

    planted: int
    training_rows: int  # planted rows added to training
    declared: int
    declared_found: int  # declared strings some curated training answer holds
    sha256: str
    file: str


class SplitDiff(TypedDict):
    rows_from: int
    rows_to: int
    added: list[Example]
    removed: list[Example]


# a curation step's parameters in each version (None: the step is absent from it)
SettingChange = TypedDict("SettingChange", {"from": dict[str, object] | None, "to": dict[str, object] | None})
# what changed between two versions (:func:`diff_versions`)
VersionDiff = TypedDict("VersionDiff", {"from": str, "to": str, "splits": dict[str, SplitDiff],
                                        "params": dict[str, SettingChange], "sources_changed": list[str]})


def row_json(ex: Example) -> str:
    return json.dumps(example_row(ex), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def version_id(splits: dict[str, list[Example]], labels: list[str] | None, canaries: str | None = None,
               preferences: str | None = None) -> str:
    """``canaries``: the digest of the canaries training adds (:func:`canaries_digest`);
    ``preferences``: the digest of the preference pairs (:meth:`Preferences.digest`); a version
    without either keeps the id it had before they existed."""
    h = hashlib.sha256()
    h.update(json.dumps({"labels": labels}, sort_keys=True).encode())
    if canaries is not None:
        h.update(f"\n#canaries {canaries}\n".encode())
    if preferences is not None:
        h.update(f"\n#preferences {preferences}\n".encode())
    for split in SPLITS:
        h.update(f"\n#{split}\n".encode())
        for ex in splits.get(split, []):
            h.update(row_json(ex).encode())
            h.update(b"\n")
    return PREFIX + h.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    path: Path
    manifest: Manifest

    def split(self, name: str) -> list[Example]:
        return read_split(self.path / f"{name}.parquet")

    def rejects(self) -> list[RejectRow]:
        f = self.path / "rejects.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    @property
    def card(self) -> Path:
        return self.path / "card.md"

    def preferences(self) -> list[PreferencePair]:
        """The preference pairs stored with this version (train.method: dpo); none: an empty list."""
        return load_pairs(self.path / PREFERENCES_FILE)

    def canaries(self) -> list[Canary]:
        """The memorization probe's canaries trained with this version (none: an empty list)."""
        f = self.path / CANARIES_FILE
        return [Canary.from_dict(c) for c in json.loads(f.read_text())["canaries"]] if f.is_file() else []


def manifest_of(curated: Curated, spec_name: str, vid: str, spec_sha256: str) -> Manifest:
    splits = curated.splits
    manifest: Manifest = {
        "id": vid,
        "spec": spec_name,
        "spec_sha256": spec_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": [{"split": s.split, "path": s.path, "sha256": s.sha256, "rows": s.rows_read}
                    for s in curated.sources],
        "steps": [s.to_dict() for s in curated.steps],
        "counts": {k: len(splits.get(k, [])) for k in SPLITS},
        "rejected": len(curated.rejects),
        "dropped_by_reason": _dropped_by_reason(curated),
        "pii_found": curated.pii_counts,
        "conflicts": curated.conflicts[:100],
        "conflict_groups": len(curated.conflicts),
        "dedup_rule": curated.dedup_rule,
        "answers_per_input": {k: answers_per_input(v) for k, v in splits.items() if v},
        "input_overlap": input_overlap(splits),
        "labels": curated.labels,
        "label_counts": {k: _label_counts(v) for k, v in splits.items() if v and v[0].label is not None},
        "lengths": {k: _length_stats(v) for k, v in splits.items() if v},
    }
    if curated.canaries:
        declared = [c for c in curated.canaries if c.kind == "declared"]
        manifest["canaries"] = {"planted": len(curated.canaries) - len(declared),
                                "training_rows": len(curated.canary_rows), "declared": len(declared),
                                "declared_found": sum(c.rows > 0 for c in declared),
                                "sha256": canaries_digest(curated.canaries) or "", "file": CANARIES_FILE}
    if curated.preferences.path:
        manifest["preferences"] = {**curated.preferences.summary(), "file": PREFERENCES_FILE}
    return manifest


def recount(m: Manifest, splits: dict[str, list[Example]]) -> None:
    """Update the row counts and the statistics of ``m`` that derive from the rows, for ``splits``
    (after rows were erased from a stored version)."""
    m["counts"] = {k: len(splits.get(k, [])) for k in SPLITS}
    m["answers_per_input"] = {k: answers_per_input(v) for k, v in splits.items() if v}
    m["input_overlap"] = input_overlap(splits)
    m["label_counts"] = {k: _label_counts(v) for k, v in splits.items() if v and v[0].label is not None}
    m["lengths"] = {k: _length_stats(v) for k, v in splits.items() if v}


def input_overlap(splits: dict[str, list[Example]]) -> dict[str, int]:
    """For validation and test: how many distinct training inputs (:func:`input_key`) also occur
    in that split. 0 when the splits were carved; more is possible with separate files and
    decontamination off."""
    train = {input_key(ex) for ex in splits.get("train", [])}
    return {k: len(train & {input_key(ex) for ex in splits.get(k, [])}) for k in ("validation", "test")}


def save_version(curated: Curated, root: Path, spec_name: str, spec_sha256: str) -> DatasetVersion:
    """Store ``curated`` under ``root/<id>/`` (atomically) unless that version exists; return it."""
    vid = version_id(curated.splits, curated.labels, canaries_digest(curated.canaries), curated.preferences.digest())
    dest = root / vid
    if (dest / "manifest.json").is_file():
        return load_version(vid, root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{vid}-", dir=root))
    try:
        for split in SPLITS:
            write_split(tmp / f"{split}.parquet", curated.splits.get(split, []))
        with open(tmp / "rejects.jsonl", "w") as f:
            for r in curated.rejects:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        if curated.canaries:
            body = {"note": "memorization probe canaries (eval.canaries): trained on, not data", "canaries":
                    [c.to_dict() for c in curated.canaries]}
            (tmp / CANARIES_FILE).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        if curated.preferences.pairs:
            write_pairs(tmp / PREFERENCES_FILE, curated.preferences.pairs)
        manifest = manifest_of(curated, spec_name, vid, spec_sha256)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (tmp / "card.md").write_text(data_card(manifest))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetVersion(vid, dest, manifest)


def adopt_version(folder: Path, root: Path, expected: str) -> DatasetVersion:
    """A dataset version fetched into ``folder`` (a run's ``dataset/`` artifacts), checked against
    its id and moved into ``root``: its rows must hash to ``expected``, or, for a version rows were
    erased from (its id stays), match the counts its manifest records."""
    where = f"the dataset version fetched into {folder}"
    try:
        fetched = DatasetVersion(expected, folder, json.loads((folder / "manifest.json").read_text()))
        splits = {s: fetched.split(s) for s in SPLITS}
        manifest = fetched.manifest
        if manifest.get("id") != expected:
            raise DataError(Problem(f"{where} is {manifest.get('id')!r}, not {expected!r}"))
        if manifest.get("erasures"):
            intact = all(len(splits[s]) == manifest["counts"].get(s, 0) for s in SPLITS)
        else:
            intact = version_id(splits, manifest.get("labels"), canaries_digest(fetched.canaries()),
                                pairs_digest(fetched.preferences())) == expected
    except (OSError, ValueError) as e:
        raise DataError(Problem(f"{where} cannot be read: {e}", hint="fetch it again")) from e
    if not intact:
        raise DataError(Problem(f"{where} does not hold the rows of {expected} (altered or incomplete)",
                                hint="fetch it again; if it fails again, the stored copy is damaged"))
    dest = root / expected
    if not (dest / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(folder, dest)
    return load_version(expected, root)


def load_version(ref: str, root: Path) -> DatasetVersion:
    """A stored version by id or unique id prefix (``ds-`` optional)."""
    ref = ref if ref.startswith(PREFIX) else PREFIX + ref
    matches = sorted(p for p in root.glob(f"{ref}*") if (p / "manifest.json").is_file()) if root.is_dir() else []
    if len(matches) != 1:
        known = list_versions(root)
        hint = ("known versions: " + ", ".join(v["id"] for v in known[-5:])) if known else \
            "prepare one with `tuneline data prepare SPEC`"
        what = "no dataset version" if not matches else f"{len(matches)} dataset versions start with"
        raise DataError(Problem(f"{what} {ref!r} in {root}", hint=hint))
    path = matches[0]
    return DatasetVersion(path.name, path, json.loads((path / "manifest.json").read_text()))


def list_versions(root: Path) -> list[Manifest]:
    out: list[Manifest] = []
    for m in sorted(root.glob(f"{PREFIX}*/manifest.json")) if root.is_dir() else []:
        out.append(json.loads(m.read_text()))
    return sorted(out, key=lambda m: m.get("created", ""))


def write_split(path: Path, examples: list[Example]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "where": pa.array([ex.where for ex in examples], pa.string()),
        "messages": pa.array([json.dumps([dict(m) for m in ex.messages], ensure_ascii=False) for ex in examples],
                             pa.string()),
        "reference": pa.array([ex.reference for ex in examples], pa.string()),
        "label": pa.array([ex.label for ex in examples], pa.string()),
    })
    pq.write_table(table, path)


def read_split(path: Path) -> list[Example]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    cols = pq.read_table(path).to_pydict()
    return [Example(w, tuple(json.loads(m)), r, lab)
            for w, m, r, lab in zip(cols["where"], cols["messages"], cols["reference"], cols["label"], strict=True)]


def diff_versions(a: DatasetVersion, b: DatasetVersion) -> VersionDiff:
    """Per split: rows only in ``a`` (removed) and only in ``b`` (added), as multisets of rows;
    and the step parameters that changed."""
    out: VersionDiff = {"from": a.id, "to": b.id, "splits": {}, "params": {}, "sources_changed": []}
    for split in SPLITS:
        rows_a, rows_b = a.split(split), b.split(split)
        count_a: dict[str, list[Example]] = {}
        for ex in rows_a:
            count_a.setdefault(row_json(ex), []).append(ex)
        added = []
        for ex in rows_b:
            same = count_a.get(row_json(ex))
            if same:
                same.pop()
            else:
                added.append(ex)
        removed = [ex for exs in count_a.values() for ex in exs]
        removed.sort(key=lambda ex: rows_a.index(ex))
        out["splits"][split] = {"rows_from": len(rows_a), "rows_to": len(rows_b), "added": added, "removed": removed}
    steps_a = {s["name"]: s["params"] for s in a.manifest.get("steps", [])}
    steps_b = {s["name"]: s["params"] for s in b.manifest.get("steps", [])}
    for name in sorted(set(steps_a) | set(steps_b)):
        if steps_a.get(name) != steps_b.get(name):
            out["params"][name] = {"from": steps_a.get(name), "to": steps_b.get(name)}
    src_a = {(s["split"], s["path"]): s["sha256"] for s in a.manifest.get("sources", [])}
    src_b = {(s["split"], s["path"]): s["sha256"] for s in b.manifest.get("sources", [])}
    out["sources_changed"] = sorted(f"{k[0]}: {k[1]}" for k in set(src_a) | set(src_b) if src_a.get(k) != src_b.get(k))
    return out


def _dropped_by_reason(curated: Curated) -> dict[str, int]:
    out: dict[str, int] = {}
    for step in curated.steps:
        for kind, n in step.dropped.items():
            out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))


def _label_counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.label or ""] = counts.get(ex.label or "", 0) + 1
    return dict(sorted(counts.items()))


def _length_stats(examples: list[Example]) -> dict[str, float]:
    n = sorted(len(text_of(ex)) for ex in examples)
    return {"rows": len(n), "min_chars": n[0], "median_chars": statistics.median(n),
            "p95_chars": n[min(len(n) - 1, int(0.95 * len(n)))], "max_chars": n[-1]}


def data_card(m: Manifest) -> str:
    """A Markdown data card for a version's manifest."""
    lines = [f"# Data card: {m['spec']} {m['id']}", "", f"Created {m['created']} by `tuneline data prepare`.", ""]
    lines += ["## Sources", "", "| split | file | sha256 | rows read |", "|---|---|---|---|"]
    lines += [f"| {s['split']} | `{s['path']}` | `{s['sha256'][:16]}` | {s['rows']:,} |" for s in m["sources"]]
    lines += ["", "## Rows", "", "| split | rows |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in m["counts"].items()]
    lines += ["", "## Steps", "", "| step | rows in | rows out | dropped | changed | seconds |", "|---|---|---|---|---|---|"]
    for s in m["steps"]:
        dropped = ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"| {s['name']} | {s['rows_in']:,} | {s['rows_out']:,} | {dropped} | {s['changed']:,} | "
                     f"{s['seconds']:.2f} |")
    lines += ["", f"Rejected rows in all: {m['rejected']:,} (`tuneline data rejects {m['id']}` exports each with "
              "its reason and source line).", ""]
    if m["dropped_by_reason"]:
        lines += ["| reason | rows |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in m["dropped_by_reason"].items()]
        lines.append("")
    if c := m.get("canaries"):
        lines += ["## Canaries (memorization probe)", "",
                  f"{c['planted']} synthetic canaries planted in training only: {c['training_rows']:,} training rows "
                  "added, not counted in Rows above (they are not data); "
                  f"{c['declared']} declared strings, {c['declared_found']} found in training answers. "
                  f"Listed in `{c['file']}`; evaluation reports how many come back as `canary_leak`.", ""]
    lines += ["## PII", ""]
    lines += ([f"- {k}: {v:,} found" for k, v in m["pii_found"].items()] or ["- none found"])
    lines += ["", "## Duplicates and answers per input", ""]
    if m.get("dedup_rule"):
        lines += [f"Rule: {m['dedup_rule']}.", ""]
    lines += [f"Conflicting duplicate groups (same input, different answers): {m['conflict_groups']:,}", ""]
    if m.get("answers_per_input"):
        lines += ["Answers per input (rows per distinct input, case and spacing ignored):", "",
                  "| split | inputs | rows | min | median | max |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['inputs']:,} | {v['rows']:,} | {v['min']} | {v['median']:g} | {v['max']} |"
                  for k, v in m["answers_per_input"].items()]
        lines.append("")
    if "input_overlap" in m:
        lines += ["Training inputs that also occur in: " + ", ".join(
            f"{k} {v:,}" for k, v in m["input_overlap"].items()) + " (0 when those splits were carved from "
                  "the training rows).", ""]
    lines += ["## Lengths (characters, system prompt excluded)", "",
              "| split | rows | min | median | p95 | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['rows']:,} | {v['min_chars']} | {v['median_chars']:g} | {v['p95_chars']} | {v['max_chars']} |"
              for k, v in m["lengths"].items()]
    if m.get("erasures"):
        lines += ["", "## Erasures", "", "Rows removed from this version after it was made (`tuneline data forget`); "
                  "its id names the data as first curated.", "", "| erasure | when | rows removed | rejects removed |",
                  "|---|---|---|---|"]
        lines += [f"| {e['id']} | {e['at']} | " + (", ".join(f"{k} {v:,}" for k, v in e["removed"].items() if v) or "0")
                  + f" | {e['rejects']:,} |" for e in m["erasures"]]
    if m.get("label_counts"):
        splits = list(m["label_counts"])
        labels = sorted({lab for counts in m["label_counts"].values() for lab in counts})
        lines += ["", "## Labels", "", "| label | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        lines += [f"| {lab} | " + " | ".join(str(m["label_counts"][s].get(lab, 0)) for s in splits) + " |"
                  for lab in labels]
    return "\n".join(lines) + "\n"
