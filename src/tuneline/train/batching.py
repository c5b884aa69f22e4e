"""Deterministic, length-grouped batches (less padding) and padded tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Required, TypedDict

from tuneline.data.tokenize import IGNORE_INDEX, Encoded

if TYPE_CHECKING:
    import torch


class Batch(TypedDict, total=False):
    """One micro-batch's tensors: padded (``attention_mask``, and ``prefix_len`` when a prefix is
    shared), packed (``position_ids`` restarting at 0 for every example, no ``attention_mask``), or
    packed after a shared prefix (``prefix_len``, ``position_ids`` and a 4D ``attention_mask``:
    :func:`collate_packed_after_prefix`)."""

    input_ids: Required[torch.Tensor]
    labels: Required[torch.Tensor]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_len: int
    folded: tuple[int, int]  # (prefix, row): the shared prefix is row's first tokens (folded_prefix)
    stem_states: torch.Tensor  # [rows, columns, hidden]: the states entering decoder layer stem_depth
    stem_depth: int


@dataclass(frozen=True)
class StemRows:
    """A micro-batch's examples' cached states at the top of the frozen layers (one ``[length,
    hidden]`` tensor per example, in the batch's order) and how many layers made them."""

    states: Sequence[torch.Tensor]
    depth: int

    def add_to(self, batch: Batch, rows: list[list[tuple[int, int, int, int]]]) -> None:
        """Put in ``batch`` ``stem_depth`` and ``stem_states`` shaped like its ``input_ids``: row ``r``
        holds, for each ``(example, column, start, stop)`` of ``rows[r]``, that example's states
        ``start:stop`` from ``column`` on (zeros elsewhere)."""
        first = self.states[0]
        out = first.new_zeros((*batch["input_ids"].shape, first.shape[-1]))
        for r, placed in enumerate(rows):
            for i, column, start, stop in placed:
                out[r, column : column + stop - start] = self.states[i][start:stop]
        batch["stem_states"], batch["stem_depth"] = out, self.depth


# Examples are shuffled, then sorted by length inside windows of this many batches, so batches
# hold similar lengths (little padding) while the order stays random across windows.
GROUP_WINDOW_BATCHES = 64

# Padded widths are rounded up to a multiple of this, so a run sees a few dozen distinct matrix
# shapes instead of one per batch width (oneDNN/cuBLAS pick and cache a kernel per shape).
PAD_MULTIPLE = 1


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  grouped: bool = True) -> list[list[int]]:
    """Index batches for one epoch. Same (seed, epoch) always gives the same batches.

    ``grouped``: batches of similar lengths (see :data:`GROUP_WINDOW_BATCHES`); else random
    batches, for packed rows, which pad nothing whatever the lengths."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * (GROUP_WINDOW_BATCHES if grouped else 1)
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


# Shortest common prefix worth computing once per batch instead of once per example.
MIN_SHARED_PREFIX = 4


def shared_prefix_len(examples: Sequence[Encoded]) -> int:
    """Tokens every example starts with that can be computed once for the whole batch (0: none).

    The prefix stops before the shortest example's last token and before the first position any
    example predicts (a label), so every target is still computed from the examples' own tokens.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    limit = min(len(e.input_ids) for e in examples) - 1
    for e in examples:
        answer_at = next((j for j, lab in enumerate(e.labels) if lab != IGNORE_INDEX and j > 0), len(e.labels))
        limit = min(limit, answer_at - 1)
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(examples: Sequence[Encoded], pad_id: int, multiple: int | None = None,
            share_prefix: bool = False, stem: StemRows | None = None) -> Batch:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    The width is the longest example rounded up to ``multiple`` (default :data:`PAD_MULTIPLE`).
    With ``share_prefix``, ``prefix_len`` says how many leading tokens all examples share (the
    rendered system prompt, typically): the loss computes them once and reuses their keys and
    values for every example. ``stem``: each example's cached states at the top of the frozen
    layers, laid out the same way (``stem_states``; :mod:`tuneline.train.stem`)."""
    import torch

    multiple = PAD_MULTIPLE if multiple is None else multiple
    width = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        attention[i, :k] = 1
    batch: Batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if share_prefix:
        batch["prefix_len"] = shared_prefix_len(examples)
    if stem is not None:
        stem.add_to(batch, [[(i, 0, 0, len(e.input_ids))] for i, e in enumerate(examples)])
    return batch


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group indices into rows of total length <= ``capacity`` (best-fit decreasing).

    Each index goes, longest first, into the open row it fills most tightly, or a new row. An
    example longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


# Rows packed after a shared prefix hold about this many tokens (or the longest example): each
# token attends over its whole row's mask, so wide rows cost attention, narrow ones tail padding.
# BANKING77 at batch 16 (bench/train_throughput.py's rows): 96 trained at 230 tokens/s, 48 at 225,
# seq_len (256) at 198-217.
PREFIX_PACK_ROW = 96


# A token's projections in a decoder layer cost about as much as attending over this many keys: the
# built-in model spends 7.1 MFLOP per token and layer on them against 2,304 FLOP per key, and its
# attention products run at about half the projections' speed on a CPU.
ATTENTION_KEYS_PER_TOKEN = 1536


def spread_rows(lengths: Sequence[int], n: int) -> list[list[int]]:
    """Indices in ``n`` rows of near-equal total length: longest first, each into the row holding
    the fewest tokens so far (ties: the first such row)."""
    rows: list[list[int]] = [[] for _ in range(n)]
    fill = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(n), key=lambda r: (fill[r], r))
        rows[r].append(i)
        fill[r] += lengths[i]
    return rows


def even_rows(lengths: Sequence[int], capacity: int, prefix: int) -> list[list[int]]:
    """Rows for examples of ``lengths`` own tokens packed after a ``prefix`` of shared ones, at most
    ``capacity`` wide (or the longest example): the row count whose widest row makes the least work.

    Rows are as wide as their widest, so padding is what uneven rows cost, and attention grows with
    the width (every token attends over the prefix and its row: :data:`ATTENTION_KEYS_PER_TOKEN`).
    Best-fit into rows of :data:`PREFIX_PACK_ROW` (the rule before) is one candidate; every row count
    spread evenly (:func:`spread_rows`) is another. On the demo's batches this computes 10% fewer
    tokens than best-fit alone (4% padding against 15%)."""
    limit = max(capacity, max(lengths))

    def cost(rows: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * width * (1 + (prefix + width) / ATTENTION_KEYS_PER_TOKEN)

    best = pack_rows(lengths, min(capacity, max(max(lengths), PREFIX_PACK_ROW)))
    for n in range(1, len(lengths) + 1):
        rows = spread_rows(lengths, n)
        if max(sum(lengths[i] for i in row) for row in rows) <= limit and cost(rows) < cost(best):
            best = rows
    return best


def collate_packed_after_prefix(examples: Sequence[Encoded], pad_id: int, capacity: int,
                                stem: StemRows | None = None, fold: bool = False) -> Batch:
    """The batch's shared prefix once, then every example's own tokens packed into rows of at most
    ``capacity`` tokens (or the longest example), as many as make the least work
    (:func:`even_rows`): no padding between examples, and the prefix computed once for all of them.

    ``input_ids`` and ``labels`` hold the prefix columns (``prefix_len`` of them; the loss computes
    them once from row 0) and then each row's packed tokens; ``position_ids`` count on from the
    prefix for each example's own tokens; ``attention_mask`` is a 4D boolean mask over the prefix and
    the row ``[rows, 1, width, prefix_len + width]``: every token sees the prefix and its own
    example's earlier tokens, never another example's. Without a shared prefix it is
    :func:`collate_packed`. ``stem``: as for :func:`collate`. ``fold``: the prefix packed into the
    rows instead (:func:`collate_folded`)."""
    import torch

    prefix = shared_prefix_len(examples)
    if not prefix:
        return collate_packed(examples, pad_id, capacity, stem)
    if fold:
        return collate_folded(examples, pad_id, capacity, prefix, stem)
    own = [len(e.input_ids) - prefix for e in examples]
    rows = even_rows(own, capacity, prefix)
    width = max(sum(own[i] for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, prefix + width), pad_id, dtype=torch.long)
    input_ids[:, :prefix] = torch.tensor(examples[0].input_ids[:prefix])
    labels = torch.full((n, prefix + width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.full((n, width), prefix, dtype=torch.long)
    mask = torch.zeros((n, 1, width, prefix + width), dtype=torch.bool)
    mask[:, :, :, :prefix] = True  # the shared prefix, for every token (tail padding included)
    diagonal = torch.arange(width)
    mask[:, 0, diagonal, prefix + diagonal] = True  # tail padding sees itself: no empty softmax row
    placed: list[list[tuple[int, int, int, int]]] = [[(0, 0, 0, prefix)]] + [[] for _ in rows[1:]]  # prefix: row 0's
    for r, row in enumerate(rows):
        off = prefix
        for i in row:
            e, k = examples[i], own[i]
            placed[r].append((i, off, prefix, prefix + k))
            input_ids[r, off : off + k] = torch.tensor(e.input_ids[prefix:])
            labels[r, off : off + k] = torch.tensor(e.labels[prefix:])
            position_ids[r, off - prefix : off - prefix + k] = torch.arange(prefix, prefix + k)
            block = torch.ones((k, k), dtype=torch.bool).tril()
            mask[r, 0, off - prefix : off - prefix + k, off : off + k] = block
            off += k
    batch: Batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
                    "prefix_len": prefix}
    if stem is not None:
        stem.add_to(batch, placed)
    return batch


def collate_folded(examples: Sequence[Encoded], pad_id: int, capacity: int, prefix: int,
                   stem: StemRows | None = None) -> Batch:
    """:func:`collate_packed_after_prefix`'s batch with the ``prefix`` tokens every example starts
    with packed like one more example, first in its row (``folded``: ``(prefix, row)``), for
    :mod:`tuneline.train.folded_prefix`: one forward computes the prefix and the rows together.

    ``input_ids``, ``labels`` and ``position_ids`` are ``[rows, width]`` with no prefix columns before
    them; ``attention_mask`` is ``[rows, 1, width, prefix + width]``, its first ``prefix`` columns
    the prefix's keys (which the attention takes from ``row``): every example's tokens (and a row's
    tail padding) see all of them, the prefix's own tokens see them causally and nothing else; the
    rest is each row's own columns, where the prefix's place in ``row`` is masked for every query."""
    import torch

    own = [len(e.input_ids) - prefix for e in examples]
    rows = even_rows([*own, prefix], capacity, prefix)
    at = next(r for r, row in enumerate(rows) if len(own) in row)  # the prefix goes first in its row
    rows[at] = [len(own)] + [i for i in rows[at] if i != len(own)]
    width = max(sum(own[i] if i < len(own) else prefix for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.full((n, width), prefix, dtype=torch.long)
    mask = torch.zeros((n, 1, width, prefix + width), dtype=torch.bool)
    mask[:, :, :, :prefix] = True  # the prefix, for every token (tail padding included)
    diagonal = torch.arange(width)
    mask[:, 0, diagonal, prefix + diagonal] = True  # tail padding sees itself: no empty softmax row
    input_ids[at, :prefix] = torch.tensor(examples[0].input_ids[:prefix])
    position_ids[at, :prefix] = torch.arange(prefix)
    mask[at, 0, :prefix, :prefix] = torch.ones((prefix, prefix), dtype=torch.bool).tril()
    mask[at, 0, :, prefix : 2 * prefix] = False  # its place in the row: the copy before the rows stands for it
    placed: list[list[tuple[int, int, int, int]]] = [[] for _ in rows]
    placed[at].append((0, 0, 0, prefix))
    for r, row in enumerate(rows):
        off = prefix if r == at else 0
        for i in row:
            if i == len(own):
                continue
            e, k = examples[i], own[i]
            placed[r].append((i, off, prefix, prefix + k))
            input_ids[r, off : off + k] = torch.tensor(e.input_ids[prefix:])
            labels[r, off : off + k] = torch.tensor(e.labels[prefix:])
            position_ids[r, off : off + k] = torch.arange(prefix, prefix + k)
            mask[r, 0, off : off + k, prefix + off : prefix + off + k] = torch.ones((k, k), dtype=torch.bool).tril()
            off += k
    batch: Batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
                    "folded": (prefix, at)}
    if stem is not None:
        stem.add_to(batch, placed)
    return batch


def collate_packed(examples: Sequence[Encoded], pad_id: int, capacity: int, stem: StemRows | None = None) -> Batch:
    """Examples packed into rows of at most ``capacity`` tokens: ``input_ids``, ``labels``, ``position_ids``.

    Position ids restart at 0 for each example (and for a row's tail padding), and there is no
    ``attention_mask``: from the restarts transformers builds a block-diagonal causal mask (or uses
    flash attention's varlen kernels), so no example attends to another. Each example's first label
    is masked, so no example is asked to predict the start of the next one.
    """
    import torch

    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    placed: list[list[tuple[int, int, int, int]]] = [[] for _ in rows]
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            e = examples[i]
            k = len(e.input_ids)
            placed[r].append((i, off, 0, k))
            input_ids[r, off : off + k] = torch.tensor(e.input_ids)
            labels[r, off + 1 : off + k] = torch.tensor(e.labels[1:])
            position_ids[r, off : off + k] = torch.arange(k)
            off += k
        position_ids[r, off:] = torch.arange(width - off)
    batch: Batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if stem is not None:
        stem.add_to(batch, placed)
    return batch
