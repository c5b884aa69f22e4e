"""Render examples through the model's chat template and mask everything but the answers.

The loss covers exactly the assistant turns' tokens plus the end-of-turn token that closes each
of them (so the model learns to stop). System and user turns, the template's role headers and
anything after the end-of-turn token get label ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneline.data.examples import Example, Message
from tuneline.errors import DataError, Problem

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_strings(tokenizer: Any) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted(specials, key=len, reverse=True)


def end_of_turn(tokenizer: Any) -> str:
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


def segments(tokenizer: Any, messages: list[Message], eot: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) pieces, in order."""
    full = render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
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


def encode_example(tokenizer: Any, example: Example, seq_len: int, eot: str | None = None) -> Encoded:
    """Token ids and labels for one example. Raises if it has no answer tokens."""
    eot = eot or end_of_turn(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments(tokenizer, list(example.messages), eot):
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


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the prompt for generation (ends with the assistant header)."""
    text = render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lengths_over(tokenizer: Any, examples: list[Example], limit: int, margin: int = 8) -> dict[int, int]:
    """{index: exact token count} of the examples longer than ``limit`` tokens once templated.

    Fast for large datasets. The template's own tokens are measured once per role sequence (a
    probe with the same roles). An example whose content bytes (+1 per message) plus those cannot
    reach the limit is skipped: a byte-level BPE token covers at least one byte, a SentencePiece
    one at least one byte or the word-start marker. The rest are estimated from their contents,
    each distinct content tokenized once in one batch call of the Rust tokenizer; only estimates
    within ``margin`` of the limit, or over it, are encoded exactly with :func:`encode_example`,
    so the answer is exact."""
    if not examples:
        return {}
    eot = end_of_turn(tokenizer)
    overhead: dict[tuple[str, ...], int] = {}
    x = len(tokenizer("x", add_special_tokens=False)["input_ids"])
    candidates: list[int] = []
    for i, ex in enumerate(examples):
        roles = tuple(m["role"] for m in ex.messages)
        if roles not in overhead:
            probe = Example("probe", tuple({"role": r, "content": "x"} for r in roles), "x")
            overhead[roles] = len(encode_example(tokenizer, probe, 1 << 30, eot).input_ids) - x * len(roles)
        bound = overhead[roles] + sum(len(m["content"].encode("utf-8")) + 1 for m in ex.messages)
        if bound > limit:
            candidates.append(i)
    contents = list(dict.fromkeys(m["content"] for i in candidates for m in examples[i].messages))
    count = dict(zip(contents, _token_counts(tokenizer, contents), strict=True))
    over: dict[int, int] = {}
    for i in candidates:
        ex = examples[i]
        roles = tuple(m["role"] for m in ex.messages)
        if overhead[roles] + sum(count[m["content"]] for m in ex.messages) >= limit - margin:
            n = len(encode_example(tokenizer, ex, 1 << 30, eot).input_ids)
            if n > limit:
                over[i] = n
    return over


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens of each text without special tokens (the Rust batch path when there is one)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return [len(e.ids) for e in fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
