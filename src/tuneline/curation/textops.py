"""Text operations for data curation: normalization, duplicate finding, quality signals, decontamination.

Every function here is pure and works on plain strings; a row is identified by its index in the
sequence passed in. The functions are written for throughput (hundreds of thousands of rows per
call): cheap checks skip work on text that needs none, and near-duplicate detection hashes word
shingles with numpy/pyarrow and computes MinHash signatures and LSH buckets in Rust (``rensa``).

numpy, pyarrow and rensa are imported only by :func:`near_duplicates`, so importing this module
stays cheap.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "NgramIndex",
    "alpha_ratio",
    "dedup_key",
    "exact_duplicates",
    "near_duplicates",
    "near_duplicates_paired",
    "normalize_text",
    "repetition_ratio",
]

UNICODE_FORMS = ("NFC", "NFKC", "none")

# Whitespace other than "\n", as str.split() sees it (includes \t, \v, \f, \x1c-\x1f, NBSP, ...).
_HSPACE_TO_COLLAPSE = re.compile(r"[^\S\n]{2,}|[^\S \n]")
_BLANK_LINES = re.compile(r"\n{3,}")

# Zero-width (non-)joiners are format characters (Cf) but carry meaning: they shape Persian and
# Indic words and hold emoji sequences together, so removing them would change the text.
_KEEP_FORMAT = frozenset("\u200c\u200d")


@cache
def _control_pattern(keep_whitespace: bool) -> re.Pattern[str]:
    """Characters of category Cc/Cf to delete, except \\n and \\t (and ZWNJ/ZWJ).

    With ``keep_whitespace`` the control characters that are whitespace (\\r, \\v, \\f,
    \\x1c-\\x1f, \\x85) are kept too, so the whitespace step can turn them into spaces or newlines
    instead of gluing the words around them together.
    """
    keep = set("\n\t") | _KEEP_FORMAT
    # Cc and Cf live in the BMP, plane 1 and plane 14 only.
    candidates = (*range(0x20000), *range(0xE0000, 0xE1000))
    cps = [
        cp
        for cp in candidates
        if unicodedata.category(chr(cp)) in ("Cc", "Cf")
        and chr(cp) not in keep
        and not (keep_whitespace and chr(cp).isspace())
    ]
    ranges: list[str] = []
    start = prev = cps[0]
    for cp in [*cps[1:], -2]:
        if cp != prev + 1:
            ranges.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
            start = cp
        prev = cp
    return re.compile("[" + "".join(ranges) + "]+")


def normalize_text(
    text: str, unicode: str = "NFC", whitespace: bool = True, control_chars: bool = True
) -> str:
    """Return ``text`` cleaned for training and comparison.

    - ``control_chars``: delete control and format characters (Unicode Cc/Cf: NUL, zero-width
      space, BOM, bidi controls, soft hyphen, ...) except newline and tab, and except the
      zero-width joiner/non-joiner, which are part of how some scripts and emoji are written.
    - ``unicode``: ``"NFC"`` composes characters (e + combining acute -> é), ``"NFKC"`` also folds
      compatibility forms (full-width letters, ligatures, NBSP), ``"none"`` leaves them.
    - ``whitespace``: \\r\\n and \\r become \\n; runs of other whitespace become one space; spaces at
      the end of a line go; at most one blank line in a row; leading/trailing whitespace goes.
    """
    if unicode not in UNICODE_FORMS:
        raise ValueError(f"unicode must be one of {', '.join(UNICODE_FORMS)}, not {unicode!r}")
    # isprintable() is False for every Cc/Cf character (and for \n, \t, non-ASCII spaces), so a
    # True answer proves there is nothing to delete.
    printable = text.isprintable()
    if control_chars and not printable:
        text = _control_pattern(whitespace).sub("", text)
        printable = text.isprintable()
    # ASCII text is invariant under NFC and NFKC.
    if unicode != "none" and not text.isascii():
        form: Literal["NFC", "NFKC"] = "NFKC" if unicode == "NFKC" else "NFC"
        if not unicodedata.is_normalized(form, text):
            text = unicodedata.normalize(form, text)
            printable = text.isprintable()
    if not whitespace:
        return text
    if printable:  # the only whitespace is " ": nothing to do unless spaces repeat, lead or trail
        if "  " not in text and not text.startswith(" ") and not text.endswith(" "):
            return text
        return " ".join(text.split())
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" not in text:
        return " ".join(text.split())
    text = _HSPACE_TO_COLLAPSE.sub(" ", text)
    if " \n" in text:
        text = text.replace(" \n", "\n")
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _single_spaced(text: str) -> bool:
    """True when ``text`` is printable (so its only whitespace is " ") and has no space at its
    ends or next to another: ``" ".join(text.split()) == text``, quickly."""
    return text.isprintable() and "  " not in text and not text.startswith(" ") and not text.endswith(" ")


def dedup_key(text: str) -> str:
    """The key under which two texts count as exact duplicates: casefolded, whitespace collapsed."""
    key = text.casefold()
    return key if _single_spaced(key) else " ".join(key.split())


def exact_duplicates(keys: Sequence[str]) -> list[int | None]:
    """For each row, the index of the first earlier row with the same key, else None."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        out.append(None if j == i else j)
    return out


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of the word n-grams (lowercased) that repeat an earlier n-gram of the same text.

    0.0 for texts of fewer than 10 words, where the measure means little.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    words = text.lower().split()
    total = len(words) - n + 1
    if len(words) < 10 or total <= 0:
        return 0.0
    repeats = len(words) - len(set(words))  # words that occurred before
    if n == 1:
        return repeats / total
    if repeats < n:  # the last occurrence of a repeated n-gram is n words that occurred before
        return 0.0
    grams = zip(*[words[i:] for i in range(n)], strict=False)
    return (total - len(set(grams))) / total


_ASCII_WHITESPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())


def alpha_ratio(text: str) -> float:
    """Letters / characters that are not whitespace; 1.0 when there are none."""
    if text.isascii():
        raw = text.encode("ascii")
        others = raw.translate(None, _ASCII_LETTERS)  # usually short: digits, punctuation, spaces
        letters = len(raw) - len(others)
        non_space = letters + len(others.translate(None, _ASCII_WHITESPACE))
    else:
        chars = "".join(text.split())
        non_space = len(chars)
        letters = sum(map(str.isalpha, chars))
    return letters / non_space if non_space else 1.0


# ---------------------------------------------------------------------------------------------
# Near duplicates: word shingles -> MinHash (rensa) -> LSH bands -> exact Jaccard on candidates
# ---------------------------------------------------------------------------------------------

# How likely a pair at exactly the threshold must be to share at least one LSH band.
_BAND_RECALL_AT_THRESHOLD = 0.995


def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for LSH: the longest band (fewest chance candidates) that still makes
    a pair whose Jaccard equals ``threshold`` a candidate with probability >= 0.995. Rows per band
    divides ``num_perm`` so every signature value is used."""
    best = 1
    for r in range(1, num_perm + 1):
        if num_perm % r:
            continue
        if 1.0 - (1.0 - threshold**r) ** (num_perm // r) >= _BAND_RECALL_AT_THRESHOLD:
            best = r
    return num_perm // best, best


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finalizer, in place: spreads the bits of each value (uint64 arithmetic wraps)."""
    import numpy as np

    shifted = np.empty_like(x)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= np.right_shift(x, np.uint64(30), out=shifted)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= np.right_shift(x, np.uint64(27), out=shifted)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= np.right_shift(x, np.uint64(31), out=shifted)
    return x


def _split_words(
    texts: Sequence[str],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[str]]:
    """The lowercased whitespace-separated words of each text: row offsets into the words, each
    word's index among the distinct words, and the distinct words in order of first appearance.
    Arrow does the work, with the GIL released for most of it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    arr: Any = pa.array(texts, type=pa.large_string())
    if pc.all(pc.string_is_ascii(arr)).as_py():
        words = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(pc.ascii_lower(arr)))
    else:
        words = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(arr)))
    offsets = words.offsets.to_numpy().astype(np.int64)
    encoded = pc.dictionary_encode(pc.list_flatten(words))
    # the dictionary lists the words in order of first appearance
    return offsets - offsets[0], encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


def _word_ids(
    split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[str]], vocab: dict[str, int]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The words of a chunk of texts (from :func:`_split_words`) as integer ids, plus row offsets
    into them. ``vocab`` numbers words in order of first appearance across calls, so ids are
    consistent between chunks and deterministic. Every text must contain at least one word.
    """
    import numpy as np

    offsets, indices, chunk_words = split
    to_global = np.fromiter(
        (vocab.setdefault(w, len(vocab)) for w in chunk_words), np.uint64, len(chunk_words)
    )
    return to_global[indices], offsets


# Rows tokenized and shingled at a time: bounds the temporary arrays (~0.5 KB per row).
_CHUNK_ROWS = 50_000
# Chunks split into words ahead, in worker threads, while the current one is numbered and hashed.
_SPLIT_AHEAD = 2


def _row_shingles(
    texts: Sequence[str], k: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Shingle hashes of all rows, flattened, plus row offsets (see :func:`_shingle_hashes`).

    The rows go in chunks; while one chunk's words are numbered and hashed, the next chunks are
    split into words in other threads (Arrow and numpy release the GIL, so a second core helps).
    """

    import numpy as np
    import pyarrow as pa

    chunks = [texts[start : start + _CHUNK_ROWS] for start in range(0, len(texts), _CHUNK_ROWS)]
    vocab: dict[str, int] = {}
    parts: list[npt.NDArray[np.uint64]] = []
    counts: list[npt.NDArray[np.int64]] = []
    with ThreadPoolExecutor(max_workers=_SPLIT_AHEAD) as pool:
        ahead = deque(pool.submit(_split_words, chunk) for chunk in chunks[:_SPLIT_AHEAD])
        for i in range(len(chunks)):
            split = ahead.popleft().result()
            if i + _SPLIT_AHEAD < len(chunks):
                ahead.append(pool.submit(_split_words, chunks[i + _SPLIT_AHEAD]))
            ids, word_offsets = _word_ids(split, vocab)
            del split
            hashes, offsets = _shingle_hashes(ids, word_offsets, k)
            parts.append(hashes)
            counts.append(np.diff(offsets))
    pa.default_memory_pool().release_unused()  # arrow's allocator would keep the chunks' memory
    all_offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.concatenate(counts), out=all_offsets[1:])
    return np.concatenate(parts), all_offsets


# Per-position multipliers for shingle hashing (fixed, so results are reproducible).
_SHINGLE_MULTIPLIERS = (
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0xD6E8FEB86659FD93,
    0xFF51AFD7ED558CCD,
    0xC4CEB9FE1A85EC53,
    0x27D4EB2F165667C5,
    0x85EBCA77C2B2AE63,
)
_LENGTH_MULTIPLIER = 0xA0761D6478BD642F


def _shingle_hashes(
    ids: npt.NDArray[np.uint64], offsets: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """64-bit hashes of each row's word k-grams (a row of fewer than k words is one shingle of all
    its words), flattened, plus row offsets into them. Rows must have >= 1 word."""
    import numpy as np

    m = ids.size
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    ends = offsets[1:]
    padded = np.zeros(m + k, np.uint64)
    np.add(ids, np.uint64(1), out=padded[:m])
    mults = [
        np.uint64(_SHINGLE_MULTIPLIERS[t % len(_SHINGLE_MULTIPLIERS)] + 2 * (t // 8))
        for t in range(k)
    ]
    acc = padded[:m] * mults[0]
    term = np.empty_like(acc)
    short = lengths < k
    short_starts = starts[short]
    short_lengths = lengths[short]
    short_vals = np.zeros(short_starts.size, np.uint64)
    for t in range(k):
        if t:
            acc += np.multiply(padded[t : t + m], mults[t], out=term)
        sel = short_lengths == t + 1
        if sel.any():
            short_vals[sel] = acc[short_starts[sel]]
    del padded, term
    # A k-gram starts at every position at least k words before the end of its row: not at the
    # last k - 1 positions of a row (a short row's only shingle starts at its first word).
    valid = np.ones(m, bool)
    for t in range(1, k):
        valid[ends[lengths >= t] - t] = False
    # Each shingle's hash is tagged with its length in words: k, or a short row's length.
    tag = np.uint64((k * _LENGTH_MULTIPLIER) % 2**64)
    if short_starts.size:
        valid[short_starts] = True
        short_vals += short_lengths.astype(np.uint64) * np.uint64(_LENGTH_MULTIPLIER)
        short_vals -= tag  # added back to every shingle below
        acc[short_starts] = short_vals
    hashes = acc[valid]
    hashes += tag
    counts = np.where(short, 1, lengths - k + 1)
    sh_offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(counts, out=sh_offsets[1:])
    return _mix64(hashes), sh_offsets


def _gather_rows(
    values: npt.NDArray[np.uint64], offsets: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The segments ``rows`` of a flat ragged array, as a new flat array and offsets."""
    import numpy as np

    counts = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(rows.size + 1, np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    index = np.repeat(offsets[rows] - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return values[index], new_offsets


def near_duplicates(
    texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    seed: int = 0,
    skip: Sequence[bool] | None = None,
    groups: Sequence[int] | None = None,
    accept: Callable[[int, int], bool] | None = None,
) -> list[int | None]:
    """For each row, the index of an earlier kept row whose word-shingle Jaccard similarity is
    >= ``threshold``, else None.

    Shingles are runs of ``shingle`` consecutive lowercased words; a text with fewer words is one
    shingle of all of them. A row is *kept* when it is not skipped, has words, and is not itself a
    near duplicate; only kept rows are matched against, so a chain of edits points at its first
    kept version. Where several kept rows qualify, the most similar one (then the earliest) wins.

    MinHash signatures (``num_perm`` values, ``seed``) and LSH banding propose candidate pairs;
    each candidate is then checked with the exact Jaccard similarity of the two shingle sets, so
    every match reported is real (no false positives). A pair at or above the threshold is missed
    only if LSH does not propose it; the bands are chosen so that happens with probability < 0.5%
    at exactly the threshold, and far less above it. Results are deterministic.

    Rows marked in ``skip`` (e.g. exact duplicates already found) and rows without words are
    neither matched nor indexed; their result is None.

    With ``groups`` (an integer per row) only rows of the same group are compared: the LSH
    buckets are per group, so a large set of similar texts spread over many groups costs no
    comparisons between groups. With ``accept``, a match must also pass ``accept(row, earlier)``
    (called on original row indices, only for pairs at or above the threshold).
    """
    n = len(texts)
    _check_near_arguments(n, threshold, num_perm, shingle, seed, skip, groups)
    result: list[int | None] = [None] * n
    # Rows taking part: not skipped, with at least one word.
    active = [
        i
        for i, t in enumerate(texts)
        if not (skip is not None and skip[i]) and t and not t.isspace()
    ]
    if len(active) < 2:
        return result

    import numpy as np
    import rensa  # type: ignore[import-untyped]

    hashes, offsets = _row_shingles([texts[i] for i in active], shingle)

    # 1. Rensa signs every row and flags the rows sharing an LSH band with any other row. Most rows
    #    share none: they are kept without further work.
    num_bands, band_rows = _lsh_bands(threshold, num_perm)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        hashes, offsets.astype(np.uint64), num_perm, seed
    )
    lsh = rensa.RMinHashLSH(threshold, num_perm, num_bands)
    flags = lsh.query_duplicate_flags_matrix_one_shot(matrix)
    del matrix, lsh
    flagged = np.flatnonzero(np.asarray(flags, dtype=bool))
    if flagged.size == 0:
        return result

    # 2. Band keys of the flagged rows only (same signatures, same bands), then one pass in row
    #    order: candidates are the kept rows sharing a band; keep the best exact-Jaccard match.
    sub_hashes, sub_offsets = _gather_rows(hashes, offsets, flagged)
    salt = np.zeros(flagged.size, np.uint64)
    if groups is not None:  # a bucket per (group, band key)
        active_groups = np.asarray([groups[i] for i in active], np.int64)[flagged]
        salt = _mix64(active_groups.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    buckets = _shared_buckets(sub_hashes, sub_offsets, _Banding(num_perm, seed, num_bands, band_rows), salt)

    flagged_rows: list[int] = flagged.tolist()

    def row(pos: int) -> int:
        return active[flagged_rows[pos]]

    ok = None if accept is None else (lambda pos, cand: accept(row(pos), row(cand)))
    for pos, best in _match_in_row_order(sub_hashes.tolist(), sub_offsets.tolist(), buckets, threshold, ok):
        result[row(pos)] = row(best)
    return result


def _check_near_arguments(
    n: int, threshold: float, num_perm: int, shingle: int, seed: int,
    skip: Sequence[bool] | None, groups: Sequence[int] | None,
) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, not {num_perm}")
    if shingle < 1:
        raise ValueError(f"shingle must be >= 1, not {shingle}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), not {seed}")
    if skip is not None and len(skip) != n:
        raise ValueError(f"skip has {len(skip)} entries for {n} texts")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} texts")


@dataclass(frozen=True)
class _Banding:
    """MinHash signature size and seed, and the LSH bands over it."""

    num_perm: int
    seed: int
    num_bands: int
    band_rows: int


@dataclass(frozen=True)
class _Buckets:
    """The LSH buckets that more than one row falls in, numbered densely: row ``pos``'s are
    ``row_buckets[row_bounds[pos] : row_bounds[pos + 1]]``."""

    row_buckets: list[int]
    row_bounds: list[int]
    count: int


def _shared_buckets(
    sub_hashes: npt.NDArray[np.uint64], sub_offsets: npt.NDArray[np.int64], banding: _Banding,
    salt: npt.NDArray[np.uint64],
) -> _Buckets:
    """Sign the rows again, key each (row, band) by its band of the signature (``salt`` per row
    puts rows of different groups in different buckets), and keep the keys another row shares."""
    import numpy as np
    import rensa

    rows = sub_offsets.size - 1
    num_perm, num_bands, band_rows = banding.num_perm, banding.num_bands, banding.band_rows
    sub_matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        sub_hashes, sub_offsets.astype(np.uint64), num_perm, banding.seed
    )
    signatures = np.fromiter(
        chain.from_iterable(sub_matrix.to_rows()), np.uint64, rows * num_perm
    ).reshape(rows, num_perm)
    del sub_matrix
    keys = np.zeros((rows, num_bands), np.uint64)
    for b in range(num_bands):
        key = np.full(rows, b + 1, np.uint64) ^ salt
        for col in range(b * band_rows, (b + 1) * band_rows):
            key = _mix64(key ^ signatures[:, col])
        keys[:, b] = key
    del signatures
    # Only the (row, band) keys another flagged row shares matter; number those buckets densely.
    _, bucket_of, bucket_sizes = np.unique(keys.ravel(), return_inverse=True, return_counts=True)
    shared = bucket_sizes[bucket_of] > 1
    row_buckets: list[int] = bucket_of[shared].tolist()
    row_bounds: list[int] = np.concatenate(
        [[0], np.cumsum(shared.reshape(rows, num_bands).sum(axis=1))]
    ).tolist()
    return _Buckets(row_buckets, row_bounds, int(bucket_sizes.size))


def _match_in_row_order(
    all_shingles: list[int], bounds: list[int], buckets: _Buckets, threshold: float,
    accept: Callable[[int, int], bool] | None,
) -> Iterator[tuple[int, int]]:
    """(row, the earlier kept row it is a near duplicate of), in row order; a row without one is
    kept, and later rows sharing its buckets are compared with it."""
    shingle_sets: dict[int, frozenset[int]] = {}

    def shingles_of(pos: int) -> frozenset[int]:
        found = shingle_sets.get(pos)
        if found is None:
            found = frozenset(all_shingles[bounds[pos] : bounds[pos + 1]])
            shingle_sets[pos] = found
        return found

    row_buckets, row_bounds = buckets.row_buckets, buckets.row_bounds
    kept_in: list[list[int] | None] = [None] * buckets.count  # kept rows of each bucket
    for pos in range(len(bounds) - 1):
        my_buckets = row_buckets[row_bounds[pos] : row_bounds[pos + 1]]
        candidates: set[int] = set()
        for bucket in my_buckets:
            members = kept_in[bucket]
            if members is not None:
                candidates.update(members)
        best = _most_similar(pos, candidates, shingles_of, threshold, accept) if candidates else -1
        if best >= 0:
            yield pos, best
            continue
        for bucket in my_buckets:
            members = kept_in[bucket]
            if members is None:
                kept_in[bucket] = [pos]
            else:
                members.append(pos)


def _most_similar(
    pos: int, candidates: set[int], shingles_of: Callable[[int], frozenset[int]], threshold: float,
    accept: Callable[[int, int], bool] | None,
) -> int:
    """The candidate with the highest exact Jaccard similarity >= ``threshold`` (the earliest among
    equals) that ``accept`` allows, else -1."""
    best, best_sim = -1, -1.0
    mine = shingles_of(pos)
    for cand in sorted(candidates):
        theirs = shingles_of(cand)
        inter = len(mine & theirs)
        sim = inter / (len(mine) + len(theirs) - inter)
        if sim >= threshold and sim > best_sim and (accept is None or accept(pos, cand)):
            best, best_sim = cand, sim
    return best


def _word_shingles(text: str, k: int) -> frozenset[tuple[str, ...]]:
    """The word k-grams of ``text`` (lowercased) as :func:`near_duplicates` sees them: a text of
    fewer than k words is one shingle of all its words."""
    words = text.lower().split()
    if len(words) < k:
        return frozenset([tuple(words)])
    return frozenset(zip(*[words[i:] for i in range(k)], strict=False))


def near_duplicates_paired(
    inputs: Sequence[str],
    answers: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    seed: int = 0,
    skip: Sequence[bool] | None = None,
) -> list[int | None]:
    """Near duplicates over (input, answer) pairs: for each row, the index of an earlier kept row
    whose input is the same (:func:`dedup_key`) or a near duplicate *and* whose answer is a near
    duplicate (word-shingle Jaccard >= ``threshold`` for each), else None. Different answers to
    one input are not duplicates unless the answers themselves are near duplicates.

    Inputs are first grouped: each distinct input joins the group of the earlier distinct input
    it is a near duplicate of (:func:`near_duplicates` over the distinct inputs). Answers are then
    compared by MinHash LSH within a group only, and every candidate's inputs are checked exactly,
    so many rows sharing one input cost no more than their answers' LSH buckets, and many rows
    sharing one answer (but not their input) cost nothing.
    """
    if len(answers) != len(inputs):
        raise ValueError(f"{len(answers)} answers for {len(inputs)} inputs")
    row_input: list[int] = []  # the index of each row's distinct input
    first: dict[str, int] = {}
    distinct: list[str] = []
    for text in inputs:
        d = first.setdefault(dedup_key(text), len(first))
        if d == len(distinct):
            distinct.append(text)
        row_input.append(d)
    near_input = near_duplicates(distinct, threshold, num_perm, shingle, seed)
    # a near-duplicate input points at a kept one (whose own entry is None): the group's centre
    group: list[int] = [d if (centre := near_input[d]) is None else centre for d in range(len(distinct))]
    cache: dict[int, frozenset[tuple[str, ...]]] = {}

    def shingles(d: int) -> frozenset[tuple[str, ...]]:
        found = cache.get(d)
        if found is None:
            found = cache[d] = _word_shingles(distinct[d], shingle)
        return found

    def inputs_near(i: int, j: int) -> bool:
        a, b = row_input[i], row_input[j]
        if a == b:
            return True
        sa, sb = shingles(a), shingles(b)
        inter = len(sa & sb)
        return inter / (len(sa) + len(sb) - inter) >= threshold

    return near_duplicates(answers, threshold, num_perm, shingle, seed, skip=skip,
                           groups=[group[d] for d in row_input], accept=inputs_near)


# ---------------------------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------------------------


class NgramIndex:
    """Word n-grams of evaluation texts, for checking training texts against them.

    Words are whitespace-separated and casefolded (as in :func:`dedup_key`). N-grams are stored as
    Python hashes of word tuples: compact and fast, valid for the life of this process.
    """

    def __init__(self, texts: Iterable[str], n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, not {n}")
        self.n = n
        self._keys: set[str] = set()
        self._grams: set[int] = set()
        for text in texts:
            key = dedup_key(text)
            self._keys.add(key)
            words = key.split()
            if len(words) >= n:
                self._grams.update(map(hash, zip(*[words[i:] for i in range(n)], strict=False)))

    def __len__(self) -> int:
        """Number of distinct evaluation texts (by :func:`dedup_key`)."""
        return len(self._keys)

    def exact(self, text: str) -> bool:
        """True when ``text`` equals an evaluation text up to case and whitespace."""
        return dedup_key(text) in self._keys

    def overlap(self, text: str) -> float:
        """Share of the word n-grams of ``text`` found in any evaluation text; 0.0 when ``text``
        has fewer than n words."""
        words = text.casefold().split()
        total = len(words) - self.n + 1
        if total <= 0:
            return 0.0
        grams = zip(*[words[i:] for i in range(self.n)], strict=False)
        return sum(map(self._grams.__contains__, map(hash, grams))) / total
