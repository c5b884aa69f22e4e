"""Perturbed inputs for robustness checks: the same request, written a little differently.

Users type fast, shout, paste with stray spaces and wrap their request in pleasantries; a tuned
model should answer such a request as it answers the clean one. Each perturbation here keeps the
meaning of the text and changes only its surface:

- ``typos``: in about 12% of the words longer than 3 letters (at least one when there is such a
  word), swap two neighbouring letters, drop a letter or double one; the word count is kept.
- ``casing``: the whole text in UPPER case, lower case or Title Case (one picked per call).
- ``whitespace``: leading and trailing spaces, extra spaces between some words, and a tab.
- ``paraphrase``: the text wrapped in one of several polite templates ("Quick question: ...").

Every result is a pure function of ``(text, kind, seed)``: the random choices come from a
generator seeded with all three (string seeding of :class:`random.Random` does not depend on
Python's hash randomization), so a row's perturbed text is the same in every run and process,
and different rows get different choices even with the same ``seed``.
"""

from __future__ import annotations

import dataclasses
import random
import re

from tuneline.data.examples import Example

PERTURBATIONS = ("typos", "casing", "whitespace", "paraphrase")

TYPO_RATE = 0.12  # share of eligible words (more than 3 letters) given one typo

TEMPLATES = (
    "Hi, {text} Thanks!",
    "Quick question: {text}",
    "{text} Can you help?",
    "I need help. {text}",
    "Hello! {text}",
    "{text} Thanks in advance.",
    "Could you help me with this? {text}",
    "Hey there, {text}",
)

_WORD = re.compile(r"\S+")
_LETTERS = re.compile(r"[^\W\d_]+")


def _rng(text: str, kind: str, seed: int) -> random.Random:
    return random.Random(f"{kind}\x00{seed}\x00{text}")


def perturb(text: str, kind: str, seed: int) -> str:
    """``text`` perturbed by ``kind`` (one of :data:`PERTURBATIONS`), deterministic in all three.

    Raises ValueError for an unknown ``kind``.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; valid kinds: {', '.join(PERTURBATIONS)}")
    rng = _rng(text, kind, seed)
    if kind == "typos":
        return _typos(text, rng)
    if kind == "casing":
        return _casing(text, rng)
    if kind == "whitespace":
        return _whitespace(text, rng)
    return rng.choice(TEMPLATES).format(text=text)


def perturb_example(ex: Example, kind: str, seed: int) -> Example:
    """``ex`` with the content of its last user message perturbed; the system prompt, earlier
    turns, the answer, ``reference``, ``label`` and ``where`` are kept as they are.

    Raises ValueError for an unknown ``kind`` or an example without a user message.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; valid kinds: {', '.join(PERTURBATIONS)}")
    last = next((i for i in range(len(ex.messages) - 1, -1, -1) if ex.messages[i].get("role") == "user"), None)
    if last is None:
        raise ValueError(f"{ex.where}: no user message to perturb")
    messages = list(ex.messages)
    messages[last] = {**messages[last], "content": perturb(messages[last]["content"], kind, seed)}
    return dataclasses.replace(ex, messages=tuple(messages))


def _typos(text: str, rng: random.Random) -> str:
    words = list(_WORD.finditer(text))
    # the longest run of letters in each word longer than 3 letters (punctuation is left alone)
    eligible: list[tuple[int, re.Match[str]]] = []
    for i, w in enumerate(words):
        runs = list(_LETTERS.finditer(w.group()))
        if runs and sum(len(r.group()) for r in runs) > 3:
            eligible.append((i, max(runs, key=lambda r: len(r.group()))))
    if not eligible:
        return text
    k = max(1, round(TYPO_RATE * len(eligible)))
    chosen = dict(rng.sample(eligible, k))
    out: list[str] = []
    pos = 0
    for i, w in enumerate(words):
        out.append(text[pos:w.start()])
        word = w.group()
        if i in chosen:
            run = chosen[i]
            word = word[:run.start()] + _typo(run.group(), rng) + word[run.end():]
        out.append(word)
        pos = w.end()
    out.append(text[pos:])
    return "".join(out)


def _typo(letters: str, rng: random.Random) -> str:
    """One swap of two different neighbouring letters, drop of a letter, or doubled letter.

    Always changes ``letters`` and keeps it one word (a run of letters never becomes empty)."""
    swaps = [j for j in range(len(letters) - 1) if letters[j] != letters[j + 1]]
    ops = ["drop", "double"] + (["swap"] if swaps else [])
    op = rng.choice(ops)
    if op == "swap":
        j = rng.choice(swaps)
        return letters[:j] + letters[j + 1] + letters[j] + letters[j + 2:]
    j = rng.randrange(len(letters))
    if op == "drop" and len(letters) > 1:
        return letters[:j] + letters[j + 1:]
    return letters[:j] + letters[j] + letters[j:]


def _title(text: str) -> str:
    """First letter of each word upper case, the rest lower ("don't" stays "Don't")."""
    return _WORD.sub(lambda m: m.group()[:1].upper() + m.group()[1:].lower(), text)


def _casing(text: str, rng: random.Random) -> str:
    styles = [str.upper, str.lower, _title]
    start = rng.randrange(len(styles))
    for k in range(len(styles)):  # the picked style, or the next one that changes the text
        out = styles[(start + k) % len(styles)](text)
        if out != text:
            return out
    return text  # no cased letters


def _whitespace(text: str, rng: random.Random) -> str:
    parts = re.split(r"(\s+)", text.strip())
    gaps = list(range(1, len(parts), 2))  # odd indices are the whitespace between words
    if gaps:
        widened = [g for g in gaps if rng.random() < 0.5] or [rng.choice(gaps)]
        for g in widened:
            parts[g] += " " * rng.randint(1, 3)
        tab = rng.choice(gaps)
        parts[tab] = "\t" + parts[tab] if rng.random() < 0.5 else parts[tab] + "\t"
        lead = " " * rng.randint(1, 3)
    else:
        lead = " " * rng.randint(1, 3) + "\t"
    return lead + "".join(parts) + " " * rng.randint(1, 3)
