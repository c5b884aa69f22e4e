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
