"""Curation text operations: what a user sees after normalizing, deduplicating and decontaminating."""

from __future__ import annotations

import random

import pytest

from tuneline.curation.textops import (
    NgramIndex,
    alpha_ratio,
    dedup_key,
    exact_duplicates,
    near_duplicates,
    normalize_text,
    repetition_ratio,
)

WORDS = [
    "river",
    "stone",
    "lantern",
    "orchard",
    "copper",
    "violin",
    "meadow",
    "harbor",
    "pencil",
    "glacier",
    "thunder",
    "velvet",
    "basket",
    "mirror",
    "falcon",
    "pepper",
    "canyon",
    "marble",
    "saddle",
    "ribbon",
    "cactus",
    "anchor",
    "bamboo",
    "candle",
    "dolphin",
    "ember",
    "feather",
    "garnet",
    "hazel",
    "island",
    "jasmine",
    "kettle",
    "lemon",
    "maple",
    "nectar",
    "oyster",
    "parrot",
    "quartz",
    "raven",
    "sapphire",
    "tulip",
    "umbrella",
    "walnut",
    "yarrow",
    "zephyr",
    "acorn",
    "bronze",
    "cobalt",
]


def _sentence(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n)]


# --- normalize_text -------------------------------------------------------------------------


def test_nfc_composes_accents_and_nfkc_folds_compatibility_forms():
    assert normalize_text("Cafe\u0301") == "Caf\u00e9"
    assert normalize_text("Cafe\u0301", unicode="none") == "Cafe\u0301"
    assert normalize_text("\uff26\uff55\uff4c\uff4c \ufb01le", unicode="NFKC") == "Full file"
    assert normalize_text("\ufb01le") == "\ufb01le"  # NFC keeps the ligature
    with pytest.raises(ValueError, match="unicode"):
        normalize_text("x", unicode="NFD")


def test_whitespace_is_collapsed_lines_trimmed_and_blank_lines_limited():
    assert normalize_text("  Hello \t  world  ") == "Hello world"
    assert normalize_text("a  b \r\n\r\n\r\n\n  c\t \n \nd\re") == "a b\n\n c\n\nd\ne"
    assert normalize_text("one\u00a0\u00a0two") == "one two"  # no-break spaces count as spaces
    assert normalize_text("a\x0cb") == "a b"  # a form feed separates words, it does not glue them
    assert normalize_text("  a  b ", whitespace=False) == "  a  b "


def test_invisible_control_and_format_characters_are_removed_but_newline_and_tab_kept():
    assert normalize_text("zero\u200bwidth\x00 nul\ufeff\nnext line") == "zerowidth nul\nnext line"
    assert normalize_text("soft\u00adhyphen") == "softhyphen"
    assert normalize_text("a\tb\x00\nc", whitespace=False) == "a\tb\nc"
    assert normalize_text("a\x00b", control_chars=False) == "a\x00b"
    # joiners are part of the text: Persian spelling and emoji sequences keep them
    assert normalize_text("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") == (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    )
    assert normalize_text("\U0001f469\u200d\U0001f4bb") == "\U0001f469\u200d\U0001f4bb"


def test_normalization_is_idempotent_and_leaves_clean_text_alone():
    clean = "A plain sentence.\n\nA second paragraph."
    assert normalize_text(clean) == clean
    messy = " \ufeffX\u0301  y\t\r\n\r\n\r\n z\u200b "
    once = normalize_text(messy, unicode="NFKC")
    assert normalize_text(once, unicode="NFKC") == once


# --- exact duplicates -----------------------------------------------------------------------


def test_exact_duplicates_after_casefold_and_whitespace_point_at_first_occurrence():
    texts = [
        "Hello  World",
        "other",
        "hello world",
        "HELLO\nworld",
        "other",
        "Stra\u00dfe",
        "STRASSE",
    ]
    keys = [dedup_key(normalize_text(t)) for t in texts]
    assert exact_duplicates(keys) == [None, None, 0, 0, 1, None, 5]
    assert exact_duplicates([]) == []


# --- near duplicates ------------------------------------------------------------------------


def test_near_duplicate_with_one_word_changed_points_at_earlier_row():
    rng = random.Random(7)
    base = _sentence(rng, 30)
    edited = list(base)
    edited[15] = "completely-different"  # word-3-gram Jaccard 25/31 = 0.81
    texts = [
        " ".join(_sentence(rng, 30)),
        " ".join(base),
        " ".join(_sentence(rng, 25)),
        " ".join(edited).upper(),  # case does not matter
        " ".join(_sentence(rng, 30)),
    ]
    result = near_duplicates(texts, threshold=0.8)
    assert result == [None, None, None, 1, None]
    assert near_duplicates(texts, threshold=0.8) == result  # deterministic
    assert near_duplicates(texts, threshold=0.9) == [None] * 5  # 0.81 is below 0.9
    assert near_duplicates(texts, num_perm=64, seed=3)[3] == 1


def test_near_duplicates_respects_skip_and_matches_only_kept_rows():
    rng = random.Random(11)
    base = _sentence(rng, 30)
    first_edit = list(base)
    first_edit[10] = "changed-once"
    second_edit = list(first_edit)
    second_edit[20] = "changed-twice"  # 0.81 to first_edit, 0.65 to base
    texts = [" ".join(base), " ".join(first_edit), " ".join(second_edit)]
    # second_edit resembles first_edit, but first_edit is dropped (a near duplicate of base) and
    # second_edit is too far from base: it is kept
    assert near_duplicates(texts) == [None, 0, None]
    # rows in skip are neither matched nor matched against
    assert near_duplicates(texts, skip=[True, False, False]) == [None, None, 1]
    assert near_duplicates(texts, skip=[False, True, False]) == [None, None, None]
    with pytest.raises(ValueError, match="skip"):
        near_duplicates(texts, skip=[False])


def test_near_duplicates_short_empty_and_invalid_inputs():
    assert near_duplicates(["hello world", "Hello   WORLD", "hello there"]) == [None, 0, None]
    assert near_duplicates(["", "   ", ""]) == [None, None, None]
    assert near_duplicates(["only one row"]) == [None]
    assert near_duplicates([]) == []
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a", "b"], threshold=0.0)


def test_near_duplicates_finds_planted_edits_in_a_larger_set_and_nothing_else():
    rng = random.Random(0)
    texts = [" ".join(_sentence(rng, rng.randint(15, 40))) for _ in range(3000)]
    planted = {}
    for i, j in zip(range(3000, 3060), rng.sample(range(3000), 60), strict=True):
        words = texts[j].split()
        if len(words) < 30:
            words = _sentence(rng, 35)
            texts[j] = " ".join(words)
        words[-1] = "edited"  # 3-gram Jaccard >= 0.93
        texts.append(" ".join(words))
        planted[i] = j
    result = near_duplicates(texts)
    assert {i: j for i, j in enumerate(result) if j is not None} == planted


def _reference_shingle_hashes(ids: list[list[int]], k: int) -> list[list[int]]:
    """The shingle hash of :func:`_shingle_hashes` written out for one shingle at a time."""
    from tuneline.curation.textops import _LENGTH_MULTIPLIER, _SHINGLE_MULTIPLIERS

    mask = 2**64 - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def shingle(words: list[int]) -> int:
        acc = sum((w + 1) * (_SHINGLE_MULTIPLIERS[t % 8] + 2 * (t // 8)) for t, w in enumerate(words))
        return mix((acc + len(words) * _LENGTH_MULTIPLIER) & mask)

    return [[shingle(row)] if len(row) < k else [shingle(row[i : i + k]) for i in range(len(row) - k + 1)]
            for row in ids]


def test_shingle_hashes_follow_their_definition():
    import numpy as np

    from tuneline.curation.textops import _shingle_hashes

    rng = random.Random(5)
    for k in (1, 2, 3, 4, 9):
        rows = [[rng.randrange(2**40) for _ in range(rng.randint(1, 12))] for _ in range(50)]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        flat = np.array([w for r in rows for w in r], np.uint64)
        hashes, sh_offsets = _shingle_hashes(flat, offsets, k)
        got = [hashes[a:b].tolist() for a, b in zip(sh_offsets[:-1], sh_offsets[1:], strict=True)]
        assert got == _reference_shingle_hashes(rows, k)


def test_near_duplicates_is_the_same_whatever_the_chunking(monkeypatch: pytest.MonkeyPatch):
    """Rows are split into words in chunks, the next ones in worker threads: the word numbering
    and so the result do not depend on it."""
    import tuneline.curation.textops as textops

    rng = random.Random(4)
    texts = [" ".join(_sentence(rng, rng.randint(3, 30))) for _ in range(400)]
    texts += [t.replace(t.split()[-1], "edited", 1).upper() for t in texts[:150:3]]
    texts += ["", "   ", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u00e0 la carte"]  # a chunk that is not ASCII
    skip = [i % 17 == 0 for i in range(len(texts))]
    whole = near_duplicates(texts, skip=skip)
    assert sum(r is not None for r in whole) > 20
    for rows in (1, 7, 64):
        monkeypatch.setattr(textops, "_CHUNK_ROWS", rows)
        assert near_duplicates(texts, skip=skip) == whole


# --- quality signals ------------------------------------------------------------------------


def test_repetition_ratio_flags_repeated_text():
    assert repetition_ratio("buy now " * 20) > 0.9
    prose = (
        "The committee met on Tuesday to review the budget, and after a long discussion it "
        "agreed to fund the new library wing while postponing repairs to the old gymnasium."
    )
    assert repetition_ratio(prose) < 0.05
    assert repetition_ratio("buy now buy now buy now") == 0.0  # under 10 words: no judgement
    assert repetition_ratio("a b c d e f g h i j", n=1) == 0.0


def test_alpha_ratio_is_low_for_numbers_and_symbols():
    assert alpha_ratio("1234 5678 ----") == 0.0
    assert alpha_ratio("Hello world") == 1.0
    assert alpha_ratio("Gr\u00f6\u00dfe 12") == pytest.approx(5 / 7)
    assert alpha_ratio("   ") == 1.0


def _random_texts(seed: int, n: int) -> list[str]:
    """Short texts mixing words, repeated words and every kind of whitespace, control and
    non-ASCII character the fast paths must leave to the general ones."""
    rng = random.Random(seed)
    pieces = ["a", "B", "the", "my", "12", ".", " ", " ", "  ", "\n", "\t", "\r\n", "\x0b", "\x1c", "\x85",
              "\u00a0", "\u3000", "\u2028", "\u200b", "\u200d", "\x00", "\ufeff", "e\u0301", "\u00df",
              "\u0130", "\ufb01", "\uff21", "\u03a3", "\u65e5"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def test_text_signals_equal_their_definitions_on_all_kinds_of_text():
    """The quick paths (clean single-spaced text, ASCII, no repeated words) give exactly what
    the plain definitions give."""
    for text in _random_texts(3, 20_000):
        assert dedup_key(text) == " ".join(text.casefold().split())
        chars = "".join(text.split())
        assert alpha_ratio(text) == (sum(map(str.isalpha, chars)) / len(chars) if chars else 1.0)
        words = text.lower().split()
        for n in (1, 2, 3):
            total = len(words) - n + 1
            grams = list(zip(*[words[i:] for i in range(n)], strict=False))
            expected = 0.0 if len(words) < 10 or total <= 0 else (total - len(set(grams))) / total
            assert repetition_ratio(text, n) == expected
        for form in ("NFC", "NFKC", "none"):
            once = normalize_text(text, form)
            if "\n" not in once and "\r" not in text:
                assert once == " ".join(once.split())  # single spaces, nothing at the ends
    words = [f"w{i % 7}" for i in range(40)]  # words repeat, 3-grams repeat
    assert repetition_ratio(" ".join(words)) == (38 - 7) / 38


# --- decontamination ------------------------------------------------------------------------


def test_ngram_index_exact_match_and_overlap():
    eval_texts = [
        "What is the capital of France? The capital of France is Paris, a city on the Seine.",
        "Translate to German: the cat sits on the warm mat near the open window today.",
    ]
    index = NgramIndex(eval_texts, n=8)
    assert len(index) == 2
    assert index.exact(
        "  what is THE capital of france?\nthe capital of france is paris, a city on the seine. "
    )
    assert not index.exact("What is the capital of Spain?")
    contained = "The capital of France is Paris, a city on the Seine."
    assert index.overlap(contained) == 1.0
    assert index.overlap(contained.upper()) == 1.0
    half = "the cat sits on the warm mat near the open window today. I like dogs more than cats anyway honestly"
    assert 0.2 < index.overlap(half) < 0.8
    assert (
        index.overlap(
            "Bananas are a good source of potassium and grow in tropical climates worldwide."
        )
        == 0.0
    )
    assert index.overlap("the capital of France") == 0.0  # shorter than n words
    with pytest.raises(ValueError):
        NgramIndex([], n=0)
