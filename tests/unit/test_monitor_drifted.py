"""Drifted-input examples for the monitoring report: the current inputs farthest from the
reference, grouped so each kind of new traffic shows once."""

from __future__ import annotations

import numpy as np
import pytest

from tuneline.monitor.drifted import drifted_examples, nearest_distances


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_far_inputs_come_first_grouped_by_kind() -> None:
    rng = np.random.default_rng(0)
    d = 16
    centre_ref, centre_a, centre_b = np.eye(d)[0], np.eye(d)[1], np.eye(d)[2]
    ref = _unit(centre_ref + 0.1 * rng.normal(size=(200, d)))
    familiar = _unit(centre_ref + 0.1 * rng.normal(size=(50, d)))
    new_a = _unit(centre_a + 0.05 * rng.normal(size=(8, d)))
    new_b = _unit(centre_b + 0.05 * rng.normal(size=(6, d)))
    cur = np.vstack([familiar, new_a, new_b])
    texts = [f"familiar {i}" for i in range(50)] + [f"games {i}" for i in range(8)] + [f"weather {i}" for i in range(6)]
    groups = drifted_examples(ref, cur, texts, top=14, groups=2)
    assert sorted(g.size for g in groups) == [6, 8]
    kinds = [{t.split()[0] for t in g.examples} for g in groups]
    assert sorted(map(sorted, kinds)) == [["games"], ["weather"]]
    assert all(len(g.examples) == 5 for g in groups)
    assert groups[0].mean_distance >= groups[1].mean_distance > 0.5
    dist = nearest_distances(ref, cur)
    assert all(g.examples[0] == texts[g.indices[0]] and dist[g.indices[0]] >= dist[g.indices[-1]] for g in groups)


def test_small_windows_and_mismatches() -> None:
    ref = np.eye(4, dtype=np.float32)
    assert drifted_examples(ref, np.zeros((0, 4)), []) == []
    one = drifted_examples(ref, np.eye(4)[:1], ["only"], top=30, groups=5)
    assert len(one) == 1 and one[0].examples == ["only"] and one[0].mean_distance == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="2 embeddings for 1 texts"):
        drifted_examples(ref, np.eye(4)[:2], ["x"])
