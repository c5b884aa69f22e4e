"""Nearest training examples by sentence embedding, and prompts that show them as demonstrations.

The index holds training rows only, so an evaluation row can never be shown to the model as its
own demonstration (curation already drops training rows that repeat or overlap evaluation rows).
Search is exact: one matrix product over normalised embeddings (cosine similarity), which for the
tens of thousands of rows a fine-tuning set has is faster than building an approximate index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tuneline.data.examples import Example, Message


class NearestIndex:
    """Exact cosine nearest neighbours over ``vectors`` (rows L2-normalised)."""

    def __init__(self, vectors: np.ndarray, examples: Sequence[Example]) -> None:
        if len(vectors) != len(examples):
            raise ValueError(f"{len(vectors)} vectors for {len(examples)} examples")
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.examples = list(examples)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[int | Sequence[int] | None] | None = None,
               chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(indices, similarities), each ``len(queries) x k``, most similar first; ties go to the
        lower index. ``exclude[i]`` is an index (or indices) row ``i`` may not return (itself, for
        training rows)."""
        most = max((len(e) if isinstance(e, Sequence) else 1) for e in exclude if e is not None) \
            if exclude is not None and any(e is not None for e in exclude) else 0
        k = min(k, len(self.examples) - most)
        n = len(queries)
        idx = np.zeros((n, max(k, 0)), dtype=np.int64)
        sim = np.zeros((n, max(k, 0)), dtype=np.float32)
        if k <= 0:
            return idx, sim
        for start in range(0, n, chunk):
            s = np.asarray(queries[start:start + chunk], dtype=np.float32) @ self.vectors.T
            if exclude is not None:
                for r in range(len(s)):
                    e = exclude[start + r]
                    if e is not None:
                        s[r, list(e) if isinstance(e, Sequence) else e] = -np.inf
            # stable sort of the negated similarities: equal similarities keep index order
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            idx[start:start + len(s)] = top
            sim[start:start + len(s)] = np.take_along_axis(s, top, axis=1)
        return idx, sim


def _system_and_turns(ex: Example) -> tuple[list[Message], list[Message]]:
    system = [m for m in ex.messages if m["role"] == "system"]
    return system, [m for m in ex.messages if m["role"] != "system"]


def with_demonstrations(ex: Example, demos: Sequence[Example]) -> Example:
    """``ex`` with ``demos`` as earlier turns of the conversation (the last demo closest to the
    question), after the system prompt; the answer to learn or score stays ``ex``'s own."""
    system, turns = _system_and_turns(ex)
    shown: list[Message] = []
    for d in demos:
        shown += _system_and_turns(d)[1]
    return Example(where=ex.where, messages=tuple(system + shown + turns), reference=ex.reference, label=ex.label,
                   demonstrations=len(shown) + ex.demonstrations, references=ex.references)


def with_label_set(ex: Example, labels: Sequence[str]) -> Example:
    """``ex`` with the label set appended to its system prompt (a system prompt added if it has none)."""
    system, turns = _system_and_turns(ex)
    note = "Answer with exactly one of these labels: " + ", ".join(labels) + "."
    text = (system[0]["content"] + "\n" + note) if system else note
    return Example(where=ex.where, messages=({"role": "system", "content": text}, *turns), reference=ex.reference,
                   label=ex.label, demonstrations=ex.demonstrations, references=ex.references)


def retrieval_prompts(index: NearestIndex, examples: Sequence[Example], vectors: np.ndarray, k: int,
                      exclude: Sequence[int | Sequence[int] | None] | None = None) -> list[Example]:
    """Each example with its ``k`` nearest indexed examples as demonstrations (nearest last)."""
    nearest, _ = index.search(vectors, k, exclude)
    return [with_demonstrations(ex, [index.examples[j] for j in reversed(row)]) for ex, row in zip(examples, nearest,
                                                                                                    strict=True)]
