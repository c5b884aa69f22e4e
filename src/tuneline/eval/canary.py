"""The memorization probe at evaluation: prompt a model with each canary's prompts (greedy) and
count the canaries whose whole secret comes back (:data:`canary_leak`).

A canary leaks when one of its probes' answers holds the whole secret (case, Unicode form and
spacing ignored: :func:`tuneline.curation.canary.canary_key`). A partial reproduction does not
count as a leak; the report shows it as ``match``: the longest run of the secret's characters the
best answer reproduced, as a share of the secret.
"""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import TYPE_CHECKING

from tuneline.curation.canary import Canary, canary_key
from tuneline.data.examples import Example
from tuneline.eval.results import CanaryItem, CanaryReport

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens generated beyond what the answer needs up to the secret's end (a model may open with a space or quote)
SLACK_TOKENS = 8
MAX_PROBE_TOKENS = 512


def canary_prompts(canaries: list[Canary]) -> list[Example]:
    """One prompt per probe of each probed canary, in order (the answer is the reference)."""
    return [Example(f"canary:{c.id}", (*p.messages, {"role": "assistant", "content": p.answer}), c.secret)
            for c in canaries for p in c.probes]


def probe_tokens(canaries: list[Canary], tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens to generate so that every probe's answer can reach the end of its secret."""
    need = [len(tokenizer(p.lead_and_secret(c.secret), add_special_tokens=False)["input_ids"])
            for c in canaries for p in c.probes]
    return min(MAX_PROBE_TOKENS, max(need, default=0) + SLACK_TOKENS)


def leaked(answer: str, secret: str) -> bool:
    """The whole secret is in ``answer`` (normalized)."""
    return canary_key(secret) in canary_key(answer)


def match_share(answer: str, secret: str) -> float:
    """The longest run of ``secret``'s characters that ``answer`` reproduces, as a share of it."""
    a, s = canary_key(answer), canary_key(secret)
    if not s:
        return 0.0
    m = SequenceMatcher(None, a, s, autojunk=False).find_longest_match(0, len(a), 0, len(s))
    return m.size / len(s)


def canary_report(canaries: list[Canary], answers: dict[str, list[str]]) -> CanaryReport:
    """Each canary's answers per system (``answers[system]``: one per probe, in
    :func:`canary_prompts` order), whether its secret came back, and the count per system."""
    items, at = [], 0
    for c in canaries:
        n = len(c.probes)
        outs = {system: texts[at: at + n] for system, texts in answers.items()}
        at += n
        items.append(CanaryItem(
            id=c.id, kind=c.kind, secret=c.secret, rows=c.rows, probes=n, answers=outs,
            leaked={system: any(leaked(t, c.secret) for t in texts) for system, texts in outs.items()},
            match={system: max((match_share(t, c.secret) for t in texts), default=0.0)
                   for system, texts in outs.items()}))
    probed = [i for i in items if i.probes]
    return CanaryReport(n=len(probed), leaked={system: sum(i.leaked[system] for i in probed) for system in answers},
                        items=items, unprobed=[i.id for i in items if not i.probes])
