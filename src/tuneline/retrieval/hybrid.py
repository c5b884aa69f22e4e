"""The hybrid: a fine-tuned model that sees the ``k`` nearest training examples in its prompt.

Retrieval feeds the model fresh, traceable examples; fine-tuning makes its behaviour consistent.
The index (the training rows and their sentence embeddings) is built once per dataset version and
encoder, stored beside the version (``datasets/<version>/retrieval/<encoder fp>-<rows sha>/``), and copied
into the adapter folder (``adapter/retrieval/``, with ``k``), so that evaluation and the server
retrieve from exactly the index the model was trained with. ``retrieval.json`` holds the SHA-256
of both files; a changed file is refused when the index is loaded.

Training rows are shown their nearest *other* training rows (leave-one-out, and never a row with
the same input text), so the model cannot learn to copy its own answer; evaluation rows and
requests are shown their nearest training rows. Demonstrations are context: the loss covers the
row's own answer only (:attr:`tuneline.data.examples.Example.demonstrations`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from tuneline.artifacts import replace_dir
from tuneline.curation.steps import input_of
from tuneline.data.examples import Example, Message
from tuneline.errors import ModelError, Problem
from tuneline.retrieval.encoder import BUILTIN_ENCODERS, Encoder, load_encoder
from tuneline.retrieval.index import NearestIndex, retrieval_prompts, with_demonstrations

log = logging.getLogger(__name__)


class Retrieved(TypedDict):
    """A training row shown to a request: where it came from, and its similarity to the request."""

    where: str
    similarity: float

FOLDER = "retrieval"  # in a dataset version's folder and in an adapter folder
META = "retrieval.json"
VECTORS = "vectors.npy"
ROWS = "examples.jsonl"


def query_of(messages: Sequence[Message]) -> str:
    """What is embedded to retrieve for a prompt: its non-system turns, one per line (for a plain
    question, the question itself)."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rows_sha256(examples: Sequence[Example]) -> str:
    """Identity of the indexed rows (their order, conversations and answers)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.where, list(ex.messages), ex.reference, ex.label], ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass
class RetrievalIndex:
    """The indexed training rows, their normalised embeddings, and ``retrieval.json``."""

    path: Path
    meta: dict[str, Any]
    vectors: np.ndarray
    examples: list[Example]

    @property
    def k(self) -> int | None:
        return self.meta.get("k")

    def copy_to(self, adapter_dir: str | Path, k: int) -> Path:
        """Ship the index with an adapter (``adapter_dir/retrieval/``), recording ``k``."""
        dest = Path(adapter_dir) / FOLDER
        tmp = dest.with_name(f".{FOLDER}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name in (VECTORS, ROWS):
                shutil.copy2(self.path / name, tmp / name)
            (tmp / META).write_text(json.dumps({**self.meta, "k": k, "copied_from": str(self.path)}, indent=2) + "\n")
            replace_dir(tmp, dest)  # fsynced; an index already there stays whole until this one is
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest


def index_folder(root: Path, dataset_version: str | None, examples: Sequence[Example], encoder: Encoder) -> Path:
    """Where the index of these rows lives: beside their dataset version, or (curation off) under
    ``root/retrieval/``; by encoder and the rows' identity (a version's id is its content: the same
    rows read from another path keep the id but trace to other ``where``s)."""
    name = f"{encoder.fingerprint}-{rows_sha256(examples)[:12]}"
    if dataset_version is not None:
        return root / "datasets" / dataset_version / FOLDER / name
    return root / FOLDER / name


def build_index(examples: Sequence[Example], encoder: Encoder, folder: Path,
                dataset_version: str | None = None) -> RetrievalIndex:
    """The index of ``examples`` at ``folder``: loaded when it is there and holds these rows,
    otherwise built (atomically) from their embeddings."""

    sha = rows_sha256(examples)
    if (folder / META).is_file():
        found = load_index(folder)
        if found.meta.get("rows_sha256") == sha:
            return found
        log.warning("the retrieval index at %s holds other rows; rebuilding it", folder)
    vectors = encoder.embed([input_of(ex) for ex in examples])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        np.save(tmp / VECTORS, vectors)
        with (tmp / ROWS).open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps({"where": ex.where, "messages": list(ex.messages), "reference": ex.reference,
                                    "label": ex.label}, ensure_ascii=False) + "\n")
        meta = {
            "encoder": encoder.name,
            "encoder_path": None if encoder.name in BUILTIN_ENCODERS else str(encoder.path),
            "encoder_fingerprint": encoder.fingerprint,
            "dataset_version": dataset_version,
            "rows": len(examples),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "rows_sha256": sha,
            "files": {VECTORS: _sha256(tmp / VECTORS), ROWS: _sha256(tmp / ROWS)},
            # embedding the rows (also when the embeddings came from the cache: what they cost to compute)
            "seconds": round(encoder.last_seconds, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("retrieval index of %d rows at %s", len(examples), folder)
    return RetrievalIndex(folder, meta, vectors, list(examples))


def load_index(folder: str | Path) -> RetrievalIndex:
    """A stored index, its files checked against the SHA-256 in ``retrieval.json``."""
    folder = Path(folder)
    meta_file = folder / META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(Problem(f"cannot read the retrieval index: {e}", where=str(meta_file),
                                 hint="rebuild it: run the spec again (`tuneline run`)")) from e
    for name, expected in meta.get("files", {}).items():
        actual = _sha256(folder / name) if (folder / name).is_file() else "missing"
        if actual != expected:
            raise ModelError(Problem(
                f"the retrieval index file {name} does not match the index it was trained with "
                f"(sha256 {actual[:12]}, recorded {expected[:12]})", where=str(folder / name),
                hint="the index ships with the adapter and must not change; restore it or retrain"))
    vectors = np.load(folder / VECTORS)
    examples = []
    with (folder / ROWS).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            examples.append(Example(where=row["where"], messages=tuple(row["messages"]), reference=row["reference"],
                                    label=row["label"]))
    return RetrievalIndex(folder, meta, vectors, examples)


class Retriever:
    """Puts the ``k`` nearest indexed rows in front of each prompt."""

    def __init__(self, index: RetrievalIndex, encoder: Encoder, k: int) -> None:
        if encoder.fingerprint != index.meta.get("encoder_fingerprint"):
            raise ModelError(Problem(
                f"the retrieval index at {index.path} was built with encoder {index.meta.get('encoder')!r} "
                f"(fingerprint {index.meta.get('encoder_fingerprint')}), but the loaded encoder {encoder.name!r} "
                f"has fingerprint {encoder.fingerprint}", where=str(index.path / META),
                hint="install the encoder the index was built with, or retrain"))
        self.index, self.encoder, self.k = index, encoder, k
        self.nearest = NearestIndex(index.vectors, index.examples)

    def augment(self, examples: Sequence[Example]) -> list[Example]:
        """Each (plain) example with its ``k`` nearest training rows as demonstrations, nearest last.
        Several examples are embedded through the encoder's cache; a single one uncached (the path a
        request takes, so latency measured through here is honest)."""

        if not examples:
            return []
        texts = [input_of(ex) for ex in examples]
        vectors = self.encoder.embed(texts) if len(texts) > 1 else self.encoder.embed_one(texts[0])
        return retrieval_prompts(self.nearest, examples, vectors, self.k)

    def augment_training(self, examples: Sequence[Example]) -> list[Example]:
        """The indexed rows themselves, each shown its nearest *other* rows: never itself, nor a row
        with the same input text (which would hand it its own answer)."""

        if len(examples) != len(self.index.examples) or rows_sha256(examples) != self.index.meta.get("rows_sha256"):
            raise ValueError("augment_training takes exactly the indexed rows, in order")
        same: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(examples):
            same[input_of(ex)].append(i)
        exclude = [same[input_of(ex)] for ex in examples]
        return retrieval_prompts(self.nearest, examples, self.index.vectors, self.k, exclude)

    def messages(self, messages: Sequence[Message]) -> tuple[list[Message], list[Retrieved]]:
        """A request's messages with the demonstrations inserted after its system prompt, and what
        was retrieved (``where`` and similarity, most similar first) for the response."""
        vector = self.encoder.embed_one(query_of(messages))
        idx, sim = self.nearest.search(vector, self.k)
        demos = [self.index.examples[j] for j in reversed(idx[0])]
        probe = Example("request", tuple(messages) + ({"role": "assistant", "content": ""},), "")
        shown = with_demonstrations(probe, demos)
        hits: list[Retrieved] = [{"where": self.index.examples[j].where, "similarity": round(float(s), 4)}
                for j, s in zip(idx[0], sim[0], strict=True)]
        return list(shown.messages[:-1]), hits


def adapter_retriever(adapter_dir: str | Path, cache_root: Path | None = None, device: str = "cpu",
                      encoders: dict[str, Encoder] | None = None) -> Retriever | None:
    """The retriever shipped with an adapter (``adapter_dir/retrieval/``), or None when it has none.
    ``encoders`` (by fingerprint) lets a server load each encoder once."""
    folder = Path(adapter_dir) / FOLDER
    if not (folder / META).is_file():
        return None
    index = load_index(folder)
    fp = index.meta.get("encoder_fingerprint", "")
    encoder = (encoders or {}).get(fp)
    if encoder is None:
        ref = index.meta.get("encoder_path") or index.meta["encoder"]
        encoder = load_encoder(ref, None, cache_root, device=device, field="retrieval.encoder")
        if encoders is not None:
            encoders[encoder.fingerprint] = encoder
    k = index.k
    if not k:
        raise ModelError(Problem("the adapter's retrieval index does not say how many examples to show (k)",
                                 where=str(folder / META), hint="retrain the adapter with `retrieval: {k: ...}`"))
    return Retriever(index, encoder, int(k))
