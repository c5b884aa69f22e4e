"""Forgetting probe: a small general-ability set the base model answers right.

Fine-tuning on a narrow task can make a model forget what it knew. The probe asks the tuned model
short general questions (capitals, arithmetic, basic science, common knowledge, simple language
tasks) that the base model answers right, and reports how many it still gets.

The set ships as ``assets/general_probe.jsonl``: one JSON object per line, ``{"question": ...,
"answers": [...]}`` (the first answer is the reference; the others are accepted aliases), after a
first line ``{"_about": ...}`` that records how and when the set was selected.

How it was selected (2026-11-28): 95 candidate questions were written by hand for this project
(none taken from a benchmark). The built-in base model (SmolLM2-135M-Instruct, the Q4_1 GGUF
converted by ``tuneline pull``) answered each on CPU with :func:`tuneline.eval.generate.generate`
(greedy, 24 new tokens, no system prompt), scored by :func:`probe_correct`. 59 were right both
with bf16 weights under bf16 autocast (the LoRA evaluation path on a CPU with fast bf16) and in
fp32, at batch 32; the 36 others were dropped (e.g. it named New York as the US capital and 32
as 15 + 27). bf16 answers change with the batch (its matmuls round differently per batch shape):
the 59 were answered again in bf16 at batch 4, 8, 16, 32 and 64 and in fp32 at 8 and 32, and the
5 wrong in any run were dropped (among them "What is the capital of France?", which bf16 at some
batch sizes answers in French). Of the 54 left, 11 were left out: an odd question, an answer that
also named K2 as Everest, "right" as the opposite of "left" (ambiguous), and 8 to balance the
categories (fewer capitals). 43 ship; on that CPU the base model answered all 43 right in bf16
at batch 1, 4, 8, 16, 32 and 64 and in fp32 at 8 and 32. So a drop after tuning is forgetting,
not questions too hard (or too fragile) to begin with.

Scoring (:func:`probe_correct`): answers are compared as words, case- and punctuation-insensitive
(accents folded): an accepted answer is right when its words appear consecutively in the model's
answer ("Paris" is found in "The capital is Paris." but not in "Parisian"). Numbers compare as
numbers ("1,000" = "1000", "7.0" = "7"); "4" and "four" are different words, so a question
accepts both only when both are listed. A model answer that names the right word inside a wrong
statement ("not Paris") still counts: the probe is a coarse forgetting signal, not a grader.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

from tuneline.data.examples import Example

ASSET = "general_probe.jsonl"

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")


@dataclass(frozen=True)
class ProbeQuestion:
    question: str
    answers: tuple[str, ...]  # answers[0] is the reference; the rest are accepted aliases

    @property
    def reference(self) -> str:
        return self.answers[0]


def load_probe() -> list[ProbeQuestion]:
    """The shipped probe questions, in file order."""
    text = resources.files("tuneline.eval").joinpath("assets", ASSET).read_text(encoding="utf-8")
    return parse_probe(text)


def parse_probe(text: str) -> list[ProbeQuestion]:
    """Questions from JSONL ``text``; the ``{"_about": ...}`` header line (if any) is skipped."""
    out: list[ProbeQuestion] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "_about" in rec:
            continue
        answers = rec.get("answers")
        if not isinstance(rec.get("question"), str) or not isinstance(answers, list) or not answers:
            raise ValueError(f"{ASSET}:{n}: expected {{'question': str, 'answers': [str, ...]}}")
        out.append(ProbeQuestion(rec["question"], tuple(str(a) for a in answers)))
    return out


def probe_examples(questions: list[ProbeQuestion]) -> list[Example]:
    """One :class:`Example` per question: the question as the only user turn (no system prompt),
    the reference as the assistant turn; ``where`` is ``general_probe.jsonl#<index>``."""
    return [
        Example(f"{ASSET}#{i}", ({"role": "user", "content": q.question},
                                  {"role": "assistant", "content": q.reference}), q.reference)
        for i, q in enumerate(questions)
    ]


def normalize_words(text: str) -> list[str]:
    """``text`` as lower-case words and canonical numbers, punctuation and accents dropped."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).casefold()
    return [_number(t) if t[0].isdigit() else t for t in _TOKEN.findall(folded)]


def _number(token: str) -> str:
    """``1,000`` -> ``1000``; ``7.50`` -> ``7.5``; ``7.0`` -> ``7``; ``3.14`` stays."""
    t = token
    if "," in t and re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
        t = t.replace(",", "")
    if re.fullmatch(r"\d+\.\d+", t):
        whole, frac = t.split(".")
        frac = frac.rstrip("0")
        t = f"{whole}.{frac}" if frac else whole
    if re.fullmatch(r"\d+", t):
        t = str(int(t))
    return t


def probe_correct(answer: str, q: ProbeQuestion) -> bool:
    """True when one of ``q.answers`` appears as whole consecutive words in ``answer``."""
    words = normalize_words(answer)
    for accepted in q.answers:
        want = normalize_words(accepted)
        if want and any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1)):
            return True
    return False
