"""Classification decoding constrained to the label set."""

from __future__ import annotations

import torch

from tuneline.data.examples import Example
from tuneline.eval.generate import LabelTrie, generate


def _prompt(text: str) -> Example:
    return Example("test.csv:2", ({"role": "system", "content": "Classify."}, {"role": "user", "content": text},
                                  {"role": "assistant", "content": "?"}), "?")


def test_trie_allows_exactly_each_labels_tokens_then_the_end(tokenizer):
    labels = ["card_arrival", "card_linking", "exchange_rate"]
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    trie = LabelTrie(tokenizer, labels, _prompt("hi"), end)
    # walking the trie greedily by the first allowed token spells a label; every label is reachable
    first = trie.allowed([])
    assert len(first) == 2  # "card..." and "exchange..." start differently
    for label in labels:
        ids = tokenizer.encode(label, add_special_tokens=False)
        seq: list[int] = []
        for t in ids:
            assert t in trie.allowed(seq), (label, seq)
            seq.append(t)
        assert trie.allowed(seq) == [end]  # the label is complete: only end-of-turn may follow
    assert trie.allowed([first[0], 999_999]) == [end]  # off the trie: stop


def test_constrained_generation_answers_only_labels(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # random weights: free text is garbage
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]
    examples = [_prompt(t) for t in ("where is my card", "I lost my card", "what rate do you use", "top up failed", "hm")]
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    trie = LabelTrie(tokenizer, labels, examples[0], end)
    free, _ = generate(model, tokenizer, examples, batch_size=2, max_new_tokens=trie.max_len,
                       autocast=torch.autocast("cpu", enabled=False), show_progress=False)
    constrained, _ = generate(model, tokenizer, examples, batch_size=2, max_new_tokens=trie.max_len,
                              autocast=torch.autocast("cpu", enabled=False), show_progress=False, labels=trie)
    assert not set(free) <= set(labels)
    assert set(constrained) <= set(labels) and len(constrained) == len(examples)
