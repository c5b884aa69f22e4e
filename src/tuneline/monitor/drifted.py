"""Examples of drifted inputs for the monitoring report: the current inputs farthest from
everything in the reference (cosine distance to the nearest reference embedding), grouped by
k-means on their embeddings so a person sees a few kinds of new traffic, not 30 look-alikes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXAMPLES_PER_GROUP = 5


@dataclass(frozen=True)
class DriftedGroup:
    """One group of far-from-training inputs: how many of the ``top`` it holds, their mean
    distance to the nearest reference input (cosine distance, 0..2), and up to 5 of their texts,
    farthest first."""

    size: int
    mean_distance: float
    examples: list[str]
    indices: list[int]  # positions in the current window, farthest first


def nearest_distances(ref_embeddings: np.ndarray, cur_embeddings: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cosine distance of each current row to its nearest reference row (rows L2-normalised)."""
    ref = np.asarray(ref_embeddings, dtype=np.float32)
    out = np.empty(len(cur_embeddings), dtype=np.float64)
    for start in range(0, len(cur_embeddings), chunk):
        sims = np.asarray(cur_embeddings[start:start + chunk], dtype=np.float32) @ ref.T
        out[start:start + chunk] = 1.0 - sims.max(axis=1)
    return out


def drifted_examples(ref_embeddings: np.ndarray, cur_embeddings: np.ndarray, cur_texts: Sequence[str], *,
                     top: int = 30, groups: int = 5, seed: int = 0) -> list[DriftedGroup]:
    """The ``top`` current inputs farthest from the reference, in at most ``groups`` groups
    (k-means on their embeddings), the groups farthest first."""
    if len(cur_embeddings) != len(cur_texts):
        raise ValueError(f"{len(cur_embeddings)} embeddings for {len(cur_texts)} texts")
    if len(cur_texts) == 0 or len(ref_embeddings) == 0:
        return []
    dist = nearest_distances(ref_embeddings, cur_embeddings)
    chosen = np.argsort(-dist, kind="stable")[:top]
    k = max(1, min(groups, len(chosen)))
    if k == 1:
        assign = np.zeros(len(chosen), dtype=int)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=4, random_state=seed)
        assign = km.fit_predict(np.asarray(cur_embeddings, dtype=np.float64)[chosen])
    out = []
    for g in np.unique(assign):
        members = [int(i) for i in chosen[assign == g]]  # already farthest first
        out.append(DriftedGroup(len(members), float(dist[members].mean()),
                                [cur_texts[i] for i in members[:EXAMPLES_PER_GROUP]], members))
    out.sort(key=lambda grp: (-grp.mean_distance, -grp.size))
    return out
