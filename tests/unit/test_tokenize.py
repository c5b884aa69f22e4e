"""Label masks on real tokenized examples: loss on answers + end-of-turn token only."""

from __future__ import annotations

import pytest

from tuneline.data.examples import Example
from tuneline.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt, end_of_turn
from tuneline.errors import DataError


def _answer_text(tokenizer, enc) -> str:
    return tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def test_classification_mask_covers_label_and_end_of_turn(tokenizer):
    ex = Example("f.csv:2", (
        {"role": "system", "content": "Classify the message."},
        {"role": "user", "content": "Where is my new card?"},
        {"role": "assistant", "content": "card_arrival"},
    ), "card_arrival", "card_arrival")
    enc = encode_example(tokenizer, ex, seq_len=256)
    assert _answer_text(tokenizer, enc) == "card_arrival<|im_end|>"
    # the answer is one contiguous block at the end, and the sequence ends with end-of-turn
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert all(lab != IGNORE_INDEX for lab in enc.labels[first:])
    assert enc.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # labels equal input ids where unmasked (the shift happens in the loss)
    assert enc.labels[first:] == enc.input_ids[first:]
    # segment-wise tokenization equals tokenizing the whole rendered text
    full = tokenizer.apply_chat_template(list(ex.messages), tokenize=False)
    assert tokenizer(full, add_special_tokens=False)["input_ids"][: len(enc.input_ids)] == enc.input_ids
    # the prompt used for generation is exactly the masked prefix
    assert encode_prompt(tokenizer, ex) == enc.input_ids[:first]


def test_chat_mask_covers_every_assistant_turn(tokenizer):
    ex = Example("c.jsonl:1", (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Block my card"},
        {"role": "assistant", "content": "Your card is blocked."},
    ), "Your card is blocked.")
    enc = encode_example(tokenizer, ex, seq_len=256)
    assert _answer_text(tokenizer, enc) == "Hello! How can I help?<|im_end|>Your card is blocked.<|im_end|>"
    assert "Block my card" not in _answer_text(tokenizer, enc)


def test_example_without_answer_tokens_is_an_error(tokenizer):
    ex = Example("c.jsonl:7", ({"role": "user", "content": "only a question"},), "")
    with pytest.raises(DataError) as exc:
        encode_example(tokenizer, ex, seq_len=256)
    assert exc.value.problems[0].where == "c.jsonl:7"
    assert "no answer tokens" in str(exc.value)


def test_end_of_turn_token(tokenizer):
    assert end_of_turn(tokenizer) == "<|im_end|>"


def test_fast_length_check_finds_exactly_the_examples_over_the_limit(tokenizer):
    from helpers import banking_rows

    from tuneline.data.tokenize import lengths_over

    rows = banking_rows(["card_arrival", "exchange_rate", "top_up_failed", "cash_withdrawal_charge"], 15)
    examples = [Example(f"t.csv:{i}", (
        *([{"role": "system", "content": "Classify."}] if i % 2 else []),  # two role sequences
        {"role": "user", "content": ("  " if i % 5 == 0 else "") + r["text"]},  # leading spaces: a merge edge
        {"role": "assistant", "content": r["category"]}), r["category"], r["category"]) for i, r in enumerate(rows)]
    exact = [len(encode_example(tokenizer, ex, 1 << 30).input_ids) for ex in examples]
    for limit in sorted(set(exact))[::3]:  # limits all through the range of real lengths
        got = lengths_over(tokenizer, examples, limit)
        assert got == {i: n for i, n in enumerate(exact) if n > limit}, limit


def _tricky_texts(n: int) -> list[str]:
    """Texts mixing words, numbers, punctuation, contractions, runs of spaces, other whitespace,
    non-ASCII letters and emoji, and now and then a special token."""
    import random

    rng = random.Random(0)
    pieces = ["a", "Hello", "don't", "'s", "card_arrival", " ", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "12",
              "2024-01-15", "3.5", "!", "...", "(x)", "\u00e9t\u00e9", "\u00a0", "\u3000", "\u65e5\u672c", "\U0001f600",
              "\x1c", "\u2028", "_", "-", "'", "<|im_end|>", "<|im_start|>"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def _tokenized(backend):
    def count(batch: list[str]) -> list[int]:
        return [len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False)]

    return count


def test_counting_tokens_by_words_equals_tokenizing_each_text(tokenizer):
    from tuneline.data.tokenize import _token_counts, _word_counts, _words

    texts = _tricky_texts(3000)
    for text in texts:
        assert " ".join(_words(text)) == text
    backend = tokenizer.backend_tokenizer
    exact = _tokenized(backend)(texts)
    assert _word_counts(backend, texts, _tokenized(backend)) == exact
    assert _token_counts(tokenizer, texts) == exact


def test_counting_by_words_is_refused_where_it_would_not_be_exact(tokenizer):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    from tuneline.data.tokenize import _word_counts

    texts = _tricky_texts(800)
    lowercased = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    lowercased.normalizer = normalizers.Lowercase()
    one_piece = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    one_piece.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for backend in (lowercased, one_piece):
        assert _word_counts(backend, texts, _tokenized(backend)) is None
    # a space glued to the word before it: allowed by kind, caught by the comparison on a sample
    glued = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    glued.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="merged_with_previous"), pre_tokenizers.ByteLevel(use_regex=False)])
    assert _word_counts(glued, texts, _tokenized(glued)) is None


def test_fast_length_check_is_exact_on_many_rows(tokenizer):
    """Over 500 distinct contents: counted by words, then checked exactly near the limit."""
    from tuneline.data.tokenize import lengths_over

    texts = [t for t in _tricky_texts(1500) if t.strip()]
    examples = [Example(f"t.jsonl:{i}", ({"role": "user", "content": t}, {"role": "assistant", "content": "ok"}),
                        "ok") for i, t in enumerate(texts)]
    exact = [len(encode_example(tokenizer, ex, 1 << 30).input_ids) for ex in examples]
    for limit in (20, 30, 45):
        assert lengths_over(tokenizer, examples, limit) == {i: n for i, n in enumerate(exact) if n > limit}, limit
