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
