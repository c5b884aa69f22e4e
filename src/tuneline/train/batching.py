"""Deterministic, length-grouped batches (less padding) and padded tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tuneline.data.tokenize import IGNORE_INDEX, Encoded

# Examples are shuffled, then sorted by length inside windows of this many batches, so batches
# hold similar lengths (little padding) while the order stays random across windows.
GROUP_WINDOW_BATCHES = 64


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch. Same (seed, epoch) always gives the same batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * GROUP_WINDOW_BATCHES
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
