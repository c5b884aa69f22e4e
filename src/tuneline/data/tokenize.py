"""Render examples through the model's chat template and mask everything but the answers.

The loss covers exactly the assistant turns' tokens plus the end-of-turn token that closes each
of them (so the model learns to stop). System and user turns, the template's role headers and
anything after the end-of-turn token get label ``IGNORE_INDEX``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from operator import itemgetter
from typing import TYPE_CHECKING, cast

from tuneline.data.examples import Example, Message
from tuneline.errors import DataError, Problem

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted(specials, key=len, reverse=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template puts after an assistant answer (e.g. ``<|im_end|>``)."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER"}]
    full = render(tokenizer, probe)
    after = full[full.rindex("ANSWER") + len("ANSWER"):]
    for s in _special_strings(tokenizer):
        if after.lstrip().startswith(s):
            return s
    raise DataError(Problem(
        "the model's chat template does not close an assistant turn with a special token",
        field="model", hint="use a chat model whose template ends turns with an end-of-turn token"))


def segments(tokenizer: PreTrainedTokenizerBase, messages: list[Message], eot: str, context: int = 0) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) pieces, in order. The first
    ``context`` messages after the system prompt(s) (demonstrations) count as prompt, not answers."""
    full = render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    first_trained = sum(1 for m in messages if m["role"] == "system") + context
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(prefix) or prefix[:pos] != full[:pos]:
            raise DataError(Problem("chat template renders a conversation prefix differently from the whole",
                                    field="model", hint="this model's template is not supported for training"))
        start = len(prefix)
        end_content = full.index(m["content"], start) + len(m["content"])
        eot_at = full.index(eot, end_content)
        end = eot_at + len(eot)
        pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, seq_len: int, eot: str | None = None) -> Encoded:
    """Token ids and labels for one example. Raises if it has no answer tokens."""
    eot = eot or end_of_turn(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments(tokenizer, list(example.messages), eot, example.demonstrations):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if is_answer else [IGNORE_INDEX] * len(piece))
    # drop trailing non-answer tokens (the template's newline after the last end-of-turn)
    while labels and labels[-1] == IGNORE_INDEX:
        labels.pop()
        ids.pop()
    enc = Encoded(ids, labels, example.where)
    if enc.n_answer_tokens == 0:
        raise DataError(Problem("example has no answer tokens: the loss would be zero", where=example.where,
                                hint="check that the answer/label cell is not empty"))
    return enc


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of the prompt for generation (ends with the assistant header)."""
    text = render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lengths_over(tokenizer: PreTrainedTokenizerBase, examples: list[Example], limit: int, margin: int = 8) -> dict[int, int]:
    """{index: exact token count} of the examples longer than ``limit`` tokens once templated.

    Fast for large datasets. The template's own tokens are measured once per role sequence (a
    probe with the same roles). An example whose content bytes (+1 per message) plus those cannot
    reach the limit is skipped: a byte-level BPE token covers at least one byte, a SentencePiece
    one at least one byte or the word-start marker. The rest are estimated from their contents,
    each distinct content counted once (see :func:`_token_counts`); only estimates within
    ``margin`` of the limit, or over it, are encoded exactly with :func:`encode_example`, so the
    answer is exact."""
    if not examples:
        return {}
    eot = end_of_turn(tokenizer)
    overhead: dict[tuple[str, ...], int] = {}
    x = len(tokenizer("x", add_special_tokens=False)["input_ids"])
    candidates: list[tuple[int, int]] = []  # (index, template tokens) of the rows that might be too long
    role_of, content_of = itemgetter("role"), itemgetter("content")
    for i, ex in enumerate(examples):
        msgs = ex.messages
        roles = tuple(map(role_of, msgs))
        template = overhead.get(roles)
        if template is None:
            probe = Example("probe", tuple({"role": r, "content": "x"} for r in roles), "x")
            template = len(encode_example(tokenizer, probe, 1 << 30, eot).input_ids) - x * len(roles)
            overhead[roles] = template
        contents = "".join(map(content_of, msgs))
        n_bytes = len(contents) if contents.isascii() else len(contents.encode("utf-8"))
        if template + n_bytes + len(msgs) > limit:
            candidates.append((i, template))
    distinct = list(dict.fromkeys(m["content"] for i, _ in candidates for m in examples[i].messages))
    count = dict(zip(distinct, _token_counts(tokenizer, distinct), strict=True))
    over: dict[int, int] = {}
    for i, template in candidates:
        ex = examples[i]
        if template + sum(map(count.__getitem__, map(content_of, ex.messages))) >= limit - margin:
            n = len(encode_example(tokenizer, ex, 1 << 30, eot).input_ids)
            if n > limit:
                over[i] = n
    return over


# Texts whose count from words is compared with a full tokenization before the others are
# counted that way; with no more texts than this, every text is simply tokenized.
_CHECK_SAMPLE = 500


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens of each text without special tokens (the Rust batch path when there is one).

    Many texts are counted from their words (see :func:`_word_counts`), once that count was found
    equal to a full tokenization on a sample of them; otherwise each text is tokenized."""
    if not texts:
        return []
    backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers only
    fast = getattr(backend, "encode_batch_fast", None)
    if backend is None or fast is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def tokenized(batch: list[str]) -> list[int]:
        return [len(e.ids) for e in fast(batch, add_special_tokens=False)] if batch else []

    if len(texts) > _CHECK_SAMPLE:
        counts = _word_counts(backend, texts, tokenized)
        if counts is not None:
            return counts
    return tokenized(texts)


# Pre-tokenizer kinds whose cuts fall where :func:`_words` cuts, or inside words. The byte-level
# regex (GPT-2) starts a piece at a space followed by a letter, digit or symbol, and ends a run of
# whitespace before its last space when a word follows; SentencePiece's metaspace starts a piece
# at each space; the whitespace splitters cut at every space; digits and punctuation cut inside
# words. ``Split`` is taken on trust (the Llama 3 and Qwen patterns cut like GPT-2's) and left to
# the comparison on a sample. ``Sequence`` is read part by part.
_WORD_LOCAL_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Whitespace", "WhitespaceSplit",
                                        "BertPreTokenizer", "Split", "Digits", "Punctuation"})


def _cuts_before_spaces(pre_tokenizer: PreTokenizer) -> bool:
    """Whether ``pre_tokenizer`` is made of the kinds above, one of them cutting at spaces, so
    that a text's pieces are the pieces of its words (see :func:`_words`)."""
    try:
        state = json.loads(pre_tokenizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    parts = state.get("pretokenizers", []) if state.get("type") == "Sequence" else [state]

    def splits(part: Mapping[str, object]) -> bool:
        kind = part.get("type")
        if kind == "ByteLevel":
            return bool(part.get("use_regex", True))
        if kind == "Metaspace":
            return bool(part.get("split", True))
        return kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Split")

    return (bool(parts) and all(p.get("type") in _WORD_LOCAL_PRE_TOKENIZERS for p in parts)
            and any(splits(p) for p in parts))


# A space followed by a character that is not whitespace, not at the start of the text: where
# the pre-tokenizers above always start a new piece. (Python's whitespace includes Unicode's, so
# "not whitespace" here is never whitespace to a tokenizer.)
_WORD_START = re.compile(r"(?<=.)(?= \S)", re.DOTALL)


def _single_spaced(text: str) -> bool:
    """True when ``text`` is printable (so its only whitespace is " ") with no space at its ends or
    next to another: :func:`_words` then cuts at every space."""
    return text.isprintable() and "  " not in text and not text.startswith(" ") and not text.endswith(" ")


def _words(text: str) -> list[str]:
    """``text`` cut in front of each space that is followed by a character other than whitespace
    (not at its very start): the first part, then the others without that space (each stands for
    " " + word). ``" ".join(_words(text)) == text``."""
    if _single_spaced(text):
        return text.split(" ")
    first, *rest = _WORD_START.split(text)
    return [first, *(w[1:] for w in rest)]


class _WordTokens:
    """Tokens of words, each distinct one tokenized once, in batches: a first word as it is,
    a following word with the space before it."""

    def __init__(self, tokenized: Callable[[list[str]], list[int]]) -> None:
        self._tokenized = tokenized
        self.first: dict[str, int] = {}
        self.rest: dict[str, int] = {}

    def add(self, firsts: Iterable[str], rests: Iterable[str]) -> None:
        new_firsts = [w for w in set(firsts) if w not in self.first]
        new_rests = [w for w in set(rests) if w not in self.rest]
        n = self._tokenized(new_firsts + [" " + w for w in new_rests])
        self.first.update(zip(new_firsts, n[: len(new_firsts)], strict=True))
        self.rest.update(zip(new_rests, n[len(new_firsts):], strict=True))


# Texts split into words by Arrow at a time: bounds its temporary arrays.
_ARROW_CHUNK = 50_000


def _single_spaced_counts(texts: list[str], tokens: _WordTokens) -> list[int]:
    """Token counts of single-spaced texts summed over their words, the words found by Arrow
    (cut at every space, as :func:`_words` would) and summed with numpy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    out: list[int] = []
    for start in range(0, len(texts), _ARROW_CHUNK):
        words = pc.split_pattern(pa.array(texts[start : start + _ARROW_CHUNK], pa.large_string()), pattern=" ")
        offsets = words.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        encoded = pc.dictionary_encode(pc.list_flatten(words))
        vocab: list[str] = encoded.dictionary.to_pylist()
        index = encoded.indices.to_numpy().astype(np.int64)
        is_first = np.zeros(index.size, bool)
        is_first[offsets[:-1]] = True  # every text has a first word (maybe "")
        first_ids = np.flatnonzero(np.bincount(index[is_first], minlength=len(vocab)))
        rest_ids = np.flatnonzero(np.bincount(index[~is_first], minlength=len(vocab)))
        tokens.add((vocab[i] for i in first_ids.tolist()), (vocab[i] for i in rest_ids.tolist()))
        first_n = np.fromiter((tokens.first.get(w, 0) for w in vocab), np.int64, len(vocab))
        rest_n = np.fromiter((tokens.rest.get(w, 0) for w in vocab), np.int64, len(vocab))
        per_word = np.where(is_first, first_n[index], rest_n[index])
        total = np.zeros(index.size + 1, np.int64)
        np.cumsum(per_word, out=total[1:])
        out.extend((total[offsets[1:]] - total[offsets[:-1]]).tolist())
    return out


def _word_counts(backend: Tokenizer, texts: list[str], tokenized: Callable[[list[str]], list[int]]) -> list[int] | None:
    """Token counts of ``texts`` summed over their words, or None where that does not apply.

    A Rust tokenizer encodes a text by normalizing it, splitting off its added tokens, cutting the
    rest into pre-tokens and running the model on each pre-token by itself (BPE never merges
    across them). Without a normalizer, for a text holding no added token, and with a
    pre-tokenizer that cuts at every space between two words (the byte-level regex of GPT-2 and
    Llama 3 style tokenizers, SentencePiece's metaspace, whitespace splitters), the count is the
    sum over the text's words (see :func:`_words`) of the count of each word (with the space
    before it) tokenized alone; each distinct word is tokenized once. Texts holding an added
    token are tokenized whole. Before the sums are returned they are compared with full
    tokenizations of a sample of the texts: one difference and None is returned, so the caller
    tokenizes every text."""
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if getattr(backend, "normalizer", None) is not None or pre_tokenizer is None:
        return None
    if not _cuts_before_spaces(pre_tokenizer):
        return None
    specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.content}, key=len,
                      reverse=True)
    holds_special = re.compile("|".join(map(re.escape, specials))).search if specials else None
    whole: list[int] = []  # texts holding an added token
    simple: list[int] = []  # single-spaced texts: the common case, cut into words by Arrow
    other: list[int] = []
    for i, text in enumerate(texts):
        if holds_special is not None and holds_special(text):
            whole.append(i)
        else:
            (simple if _single_spaced(text) else other).append(i)
    tokens = _WordTokens(tokenized)
    counts = [0] * len(texts)
    for i, n in zip(simple, _single_spaced_counts([texts[i] for i in simple], tokens), strict=True):
        counts[i] = n
    parts = [_words(texts[i]) for i in other]
    tokens.add((p[0] for p in parts), chain.from_iterable(islice(p, 1, None) for p in parts))
    for i, p in zip(other, parts, strict=True):
        counts[i] = tokens.first[p[0]] + sum(map(tokens.rest.__getitem__, islice(p, 1, None)))
    step = max(1, len(texts) // _CHECK_SAMPLE)
    skip = set(whole)
    sample = [i for i in range(0, len(texts), step) if i not in skip][:_CHECK_SAMPLE]
    if [counts[i] for i in sample] != tokenized([texts[i] for i in sample]):
        return None
    for i, n in zip(whole, tokenized([texts[i] for i in whole]), strict=True):
        counts[i] = n
    return counts
