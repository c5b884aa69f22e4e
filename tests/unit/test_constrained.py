"""Classification decoding constrained to the label set."""

from __future__ import annotations

import torch

from tuneline.data.examples import Example
from tuneline.data.tokenize import encode_prompt
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


def test_completion_is_the_rest_of_the_only_label_left(tokenizer):
    labels = ["card_arrival", "card_linking", "exchange_rate"]
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    trie = LabelTrie(tokenizer, labels, _prompt("hi"), end)
    full = {label: _walk(trie, tokenizer, label) for label in labels}
    assert trie.completion([]) is None  # three labels still possible
    for path in full.values():
        assert trie.completion(path) == []  # complete
        # the shortest prefix that decides the label completes to exactly the label's tokens
        k = next(k for k in range(len(path) + 1) if trie.completion(path[:k]) is not None)
        assert path[:k] + trie.completion(path[:k]) == path
        pad = [end] * 3  # what a row that stopped early carries afterwards
        assert trie.decided(path[:k] + pad) == path
    assert trie.completion([999_999]) is None and trie.decided([999_999]) == [999_999]  # off the trie


def _walk(trie: LabelTrie, tokenizer, label: str) -> list[int]:
    """The answer tokens of ``label`` (label tokens + end of turn) as the trie spells them."""
    seq: list[int] = []
    for t in tokenizer.encode(label, add_special_tokens=False):
        seq.append(t)
    while (nxt := trie.next.get(tuple(seq))) and len(nxt) == 1:
        seq.append(next(iter(nxt)))
    return seq


def test_shared_prefix_and_early_stop_change_no_answer(tiny_model_dir, tokenizer):
    """The prompt prefix run once per batch (padding after it) and rows stopped once their label is
    decided give the same answers as plain left-padded decoding of every prompt."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # larger random weights than the init: answers then depend on the prompt
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    labels = ["card_arrival", "card_linking", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]
    texts = ["where is my card", "I lost my card yesterday on the bus", "what rate", "top up failed again and again",
             "hm", "link my card please", "x"]
    examples = [_prompt(t) for t in texts]
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    trie = LabelTrie(tokenizer, labels, examples[0], end)
    off = torch.autocast("cpu", enabled=False)
    for trie_or_none, new in ((trie, trie.max_len), (None, 6)):
        # the reference: each prompt alone (no padding, no shared prefix), decoded to the end
        reference = []
        for ex in examples:
            ids = torch.tensor([encode_prompt(tokenizer, ex)])
            allowed = (lambda _r, seq, n=ids.shape[1]: trie.allowed(seq[n:].tolist())) if trie_or_none else None
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                                 prefix_allowed_tokens_fn=allowed)
            reference.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        assert len(set(reference)) > 1  # the answers differ between prompts: the comparison means something
        for share in (False, True):
            answers, _ = generate(model, tokenizer, examples, batch_size=3, max_new_tokens=new, autocast=off,
                                  show_progress=False, labels=trie_or_none, share_prefix=share)
            assert answers == reference, (share, trie_or_none is not None)


def test_label_scoring_gives_decodings_answers_row_for_row(tiny_model_dir, tokenizer):
    """``score_labels`` (one pass over the prompts, then one token a level for the rows still
    undecided) against ``generate``'s constrained decoding, in float64 so only summation order
    differs: the same answer, stop flag and length on every row; with and without the shared prefix,
    with passes cut by length, and with a token limit that cuts labels short."""
    from transformers import AutoModelForCausalLM

    from tuneline.eval.generate import GenerateOptions, generate_detailed

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    labels = ["card_arrival", "card_linking", "card_payment_fee_charged", "card_payment_wrong_exchange_rate",
              "lost_or_stolen_card", "exchange_rate", "exchange_charge", "top_up_failed", "top_up_reverted"]
    words = ["where", "is", "my", "card", "lost", "it", "rate", "top", "up", "failed", "again", "please", "link",
             "the", "fee", "charged", "twice"]
    examples = [_prompt(" ".join(words[(3 * i) % len(words):][: 1 + (7 * i) % 13] or ["x"])) for i in range(40)]
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    trie = LabelTrie(tokenizer, labels, examples[0], end)
    off = torch.autocast("cpu", enabled=False)
    for share, batch, new in ((True, 16, trie.max_len), (False, 7, trie.max_len), (True, 40, 2)):
        got, want = (generate_detailed(model, tokenizer, examples, GenerateOptions(
            batch_size=batch, autocast=off, max_new_tokens=new, show_progress=False, labels=trie,
            share_prefix=share, label_scoring=scoring)) for scoring in (True, False))
        assert got.texts == want.texts and got.stopped == want.stopped and got.tokens == want.tokens, (share, batch, new)
        if new == trie.max_len:
            assert len(set(want.texts)) >= 3 and set(want.texts) <= set(labels)
            assert {t for t in want.texts if t.startswith("card_")} and all(want.stopped)
        else:  # two tokens leave some rows' labels undecided: those answers are cut, as decoding cuts them
            assert not all(want.stopped)
