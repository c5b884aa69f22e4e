"""Decoding settings (issue 17, point 4): the spec's `decoding` section, the old eval.max_new_tokens
migrated, and generation with beams, penalties and stop strings that does not depend on the batch."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import lora_model, spec_error

from tuneline.data.examples import Example
from tuneline.errors import SpecError
from tuneline.eval.generate import Decoding, GenerateOptions, generate_detailed
from tuneline.spec import parse_spec

SPEC = """\
name: demo
task: {type: instruction}
objective: {primary: rouge_l}
model: smollm2-135m
data: {train: {path: d.jsonl}}
"""


def test_decoding_defaults_are_todays_greedy_24_tokens():
    spec = parse_spec(SPEC)
    assert Decoding.of(spec.decoding) == Decoding(max_new_tokens=24, num_beams=1, repetition_penalty=1.0,
                                                  no_repeat_ngram_size=0, stop=())


def test_old_eval_max_new_tokens_moves_to_decoding_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tuneline.spec.models"):
        spec = parse_spec(SPEC + "eval: {max_new_tokens: 7, batch_size: 4}\n")
    assert spec.decoding.max_new_tokens == 7 and spec.eval.batch_size == 4
    assert "eval.max_new_tokens is deprecated" in caplog.text
    # the same value in both places is fine; different values are a spec error naming both
    assert parse_spec(SPEC + "eval: {max_new_tokens: 7}\ndecoding: {max_new_tokens: 7}\n").decoding.max_new_tokens == 7
    with pytest.raises(SpecError) as info:
        parse_spec(SPEC + "eval: {max_new_tokens: 7}\ndecoding: {max_new_tokens: 9, num_beams: 2}\n")
    assert "eval.max_new_tokens (7) and decoding.max_new_tokens (9) disagree" in str(info.value)


@pytest.mark.parametrize(("extra", "message"), [
    ("decoding: {stop: [a, b, c, d, e]}", "decoding.stop"),
    ("decoding: {stop: ['']}", "stop strings must not be empty"),
    ("decoding: {repetition_penalty: 0}", "decoding.repetition_penalty"),
    ("decoding: {num_beams: 0}", "decoding.num_beams"),
    ("decoding: {no_repeat_ngram_size: -1}", "decoding.no_repeat_ngram_size"),
    ("decoding: {temperature: 0.5}", "decoding.temperature: unknown field"),
])
def test_bad_decoding_settings_are_spec_errors(tmp_path: Path, extra: str, message: str):
    assert message in " ".join(spec_error(tmp_path, extra).split())


# --- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return lora_model(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _examples(texts: list[str], system: str | None = "Translate the text.") -> list[Example]:
    head = [{"role": "system", "content": system}] if system else []
    return [Example(f"r{i}", (*head, {"role": "user", "content": t}, {"role": "assistant", "content": "x"}), "x")
            for i, t in enumerate(texts)]


TEXTS = ["my card has not arrived", "what is the exchange rate for euros to pounds today, please?", "lost card",
         "the app keeps crashing whenever I try to pay"]
PENALIZED = Decoding(max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2)
BEAMS = Decoding(max_new_tokens=10, num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=2)


def _gen(model, tok, examples, decoding, batch_size=8, share_prefix=True):
    return generate_detailed(model, tok, examples, GenerateOptions(
        batch_size=batch_size, decoding=decoding, autocast=nullcontext(), show_progress=False,
        share_prefix=share_prefix))


@pytest.mark.parametrize("decoding", [PENALIZED, BEAMS], ids=["greedy", "beams"])
def test_penalties_and_beams_give_transformers_answer_for_a_lone_prompt(model_and_tokenizer, decoding):
    """Unpadded, the penalties are transformers' own RepetitionPenalty/NoRepeatNGram arithmetic."""
    import torch

    from tuneline.data.tokenize import encode_prompt

    model, tok = model_and_tokenizer
    for ex in _examples(TEXTS):
        ids = encode_prompt(tok, ex)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=decoding.max_new_tokens,
                                 do_sample=False, num_beams=decoding.num_beams, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, repetition_penalty=decoding.repetition_penalty,
                                 no_repeat_ngram_size=decoding.no_repeat_ngram_size)
        new = out[0, len(ids):].tolist()
        end = next((k for k, t in enumerate(new) if t == tok.eos_token_id), len(new))
        expected = tok.decode(new[:end], skip_special_tokens=True).strip()
        assert _gen(model, tok, [ex], decoding).texts == [expected]


@pytest.fixture
def ending_model(model_and_tokenizer):
    """The model with its end-of-turn logit raised to 0.85 (others reach about 0.7): it ends some
    answers at once and others later, and the repetition penalty decides which."""
    model, tok = model_and_tokenizer
    eos = tok.eos_token_id

    def hook(_module, _inputs, logits):
        logits[..., eos] += 0.85
        return logits

    handle = model.get_output_embeddings().register_forward_hook(hook)
    yield model, tok
    handle.remove()


@pytest.mark.parametrize("decoding", [PENALIZED, BEAMS], ids=["greedy", "beams"])
def test_a_padded_batch_answers_as_each_prompt_alone(model_and_tokenizer, decoding):
    model, tok = model_and_tokenizer
    examples = _examples(TEXTS)
    alone = [_gen(model, tok, [ex], decoding).texts[0] for ex in examples]
    for share_prefix in (True, False):
        assert _gen(model, tok, examples, decoding, share_prefix=share_prefix).texts == alone
    plain = _gen(model, tok, examples, Decoding(max_new_tokens=10)).texts
    assert plain != alone  # the settings change the answers (else this test would prove nothing)


def test_padding_is_not_penalized_as_a_repeated_token(ending_model):
    """Here the pad token is the end of turn. transformers' own repetition penalty counts a padded
    row's pad tokens as seen, so that row ends later than the same prompt alone (measured: 3 of
    these 4 rows); the penalty here looks at each row's own tokens only."""
    model, tok = ending_model
    examples = _examples(TEXTS)
    alone = [_gen(model, tok, [ex], PENALIZED) for ex in examples]
    lengths = [g.tokens[0] for g in alone]
    assert min(lengths) == 0 and 0 < max(lengths) < PENALIZED.max_new_tokens  # ends early, not always at once
    batch = _gen(model, tok, examples, PENALIZED)
    assert (batch.texts, batch.tokens, batch.stopped) == ([g.texts[0] for g in alone], lengths,
                                                          [g.stopped[0] for g in alone])


@pytest.mark.parametrize("beams", [1, 2])
def test_stop_strings_cut_the_answer_and_count_as_stopped(model_and_tokenizer, beams):
    model, tok = model_and_tokenizer
    examples = _examples(TEXTS)
    free = _gen(model, tok, examples, Decoding(max_new_tokens=12, num_beams=beams, no_repeat_ngram_size=2))
    answer = max(free.texts, key=len)
    stop = answer[len(answer) // 2: len(answer) // 2 + 3]
    assert stop.strip() and not free.stopped[free.texts.index(answer)]
    cut = _gen(model, tok, examples, Decoding(max_new_tokens=12, num_beams=beams, no_repeat_ngram_size=2,
                                              stop=("@@never@@", stop)))
    for i, text in enumerate(free.texts):
        if stop in text:
            assert cut.texts[i] == text[:text.index(stop)].strip()
            assert cut.stopped[i] and cut.tokens[i] < free.tokens[i]
        else:
            assert (cut.texts[i], cut.stopped[i], cut.tokens[i]) == (text, free.stopped[i], free.tokens[i])


def test_label_trie_decodes_greedily_whatever_the_settings(model_and_tokenizer):
    from tuneline.eval.generate import LabelTrie

    model, tok = model_and_tokenizer
    examples = _examples(TEXTS, "Classify the message.")
    labels = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
    trie = LabelTrie(tok, labels, examples[0], tok.eos_token_id)
    kwargs = {"batch_size": 4, "autocast": nullcontext(), "show_progress": False, "labels": trie}
    greedy = generate_detailed(model, tok, examples, GenerateOptions(
        decoding=Decoding(max_new_tokens=trie.max_len), **kwargs))
    other = generate_detailed(model, tok, examples, GenerateOptions(
        decoding=Decoding(max_new_tokens=trie.max_len, num_beams=3, repetition_penalty=2.0, stop=("_",)), **kwargs))
    assert other.texts == greedy.texts and set(greedy.texts) <= set(labels)


def test_evaluating_an_adapter_under_other_decoding_settings_is_flagged(tmp_path):
    from tuneline.eval.generate import Decoding
    from tuneline.pipeline import decoding_mismatch
    from tuneline.spec.models import DecodingSpec

    spec = SimpleNamespace(task=SimpleNamespace(type="summarization"),
                           eval=SimpleNamespace(constrain_to_labels=True),
                           decoding=DecodingSpec(max_new_tokens=64, num_beams=2))
    assert decoding_mismatch(spec, tmp_path) is None  # nothing recorded: nothing to compare
    (tmp_path / "decoding.json").write_text(json.dumps(Decoding(max_new_tokens=64, num_beams=2).to_dict()))
    assert decoding_mismatch(spec, tmp_path) is None
    (tmp_path / "decoding.json").write_text(json.dumps(Decoding(max_new_tokens=32, num_beams=2).to_dict()))
    why = decoding_mismatch(spec, tmp_path)
    assert why is not None and "max_new_tokens 32 -> 64" in why and "num_beams" not in why
