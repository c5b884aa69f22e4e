"""Canaries: random secrets planted in the training split, and strings the user planted, for the
memorization probe (``eval.canaries``; the probe itself is :mod:`tuneline.eval.canary`).

A planted canary is a random prompt (``What is the passphrase of vault K7Q2ZX4M?``) whose answer
is a random secret of ``words`` words, in the task's own format (the spec's system prompt, the
prompt as the user turn, the secret as the answer; structured tasks answer
``{"passphrase": "..."}``). It is repeated ``repeat`` times in the training rows only, after every
curation step (so no step deduplicates, samples or splits it away), and it never counts as data:
the stored splits, the row counts and the data card's rows hold the real rows only, and the
canaries are stored beside them as ``canaries.json``. The prompts and secrets come from a seeded
RNG (seed and spec name): the same spec plants the same canaries.

A declared canary is a string the user planted in their own training answers; it is probed with
the prompts of the (first ``max_probes``) curated training rows whose answer holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from tuneline.curation.textops import dedup_key
from tuneline.data.examples import Example, Message
from tuneline.errors import DataError, Problem

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneline.spec.canary import CanarySpec
    from tuneline.spec.loader import LoadedSpec
    from tuneline.spec.models import TaskSpec

log = logging.getLogger(__name__)

CANARIES_FILE = "canaries.json"  # in a dataset version's folder
WHERE_PREFIX = "canary:"  # the ``where`` of a planted row: canary:c1#3

# 256 words: each word of a secret carries 8 bits (6 words: 48 bits, one chance in 2.8e14)
_WORDS = """
acorn amber anchor apple arrow aspen atlas autumn badge bagel bamboo banjo barley basil beacon beetle berry birch
biscuit blossom bonnet bramble breeze brick bridge bronze brook bucket buffalo butter cabin cactus camel candle canyon
carbon carpet castle cedar cello cherry chimney cider cinder clover cobalt comet copper coral cotton cougar crater
cricket crystal cupboard daisy dagger delta denim desert diesel dolphin donkey dragon drum eagle ember emerald engine
falcon feather fern fiddle finch flannel flint forest fossil fountain fox garden garlic geyser ginger glacier goblet
granite grape gravel harbor hazel helmet heron hickory honey hornet iceberg igloo indigo iris ivory jacket jade jasmine
jelly jigsaw juniper kayak kettle kiwi ladder lagoon lantern lava lemon lilac lily linen lizard lobster locket lotus
lumber magnet mango maple marble meadow melon meteor mint mirror mitten monsoon mosaic moss muffin mustard nectar
needle nickel nutmeg oasis oatmeal ocean olive onyx orchid otter owl oyster paddle panther paper parrot pebble pepper
pewter piano pickle pigeon pillow pine pistol planet plum pocket pony poppy potato prairie pretzel puffin pumpkin
quartz quill rabbit radish raven reef ribbon river robin rocket rose ruby saddle saffron salmon sandal sapphire satin
scarf scooter shadow shovel silver sketch sloth spider spruce squid starling stone straw summit sunset swan tablet
tangerine teapot thistle thunder tiger timber toffee topaz tractor tulip tunnel turnip umbrella valley velvet violet
walnut walrus willow window winter wizard wolf yarn yeti zebra zinnia acre badger basket beaver bison canoe bugle cobra
crane domino elm falafel glove hammock hyacinth jaguar kernel lichen marlin nomad
"""
WORDS = tuple(_WORDS.split())
CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: a code reads back unambiguously


def canary_key(text: str) -> str:
    """How a secret is looked for: NFKC, then the exact-duplicate key (case-folded, runs of
    whitespace as one space)."""
    return dedup_key(unicodedata.normalize("NFKC", text))


class ProbeRow(TypedDict):
    where: str
    messages: list[Message]
    answer: str


class CanaryRow(TypedDict):
    """A canary as stored in ``canaries.json``."""

    id: str
    kind: str
    secret: str
    rows: int
    probes: list[ProbeRow]


@dataclass(frozen=True)
class Probe:
    """One way to ask for a canary: a training row's conversation up to the answer that holds the
    secret, and that answer (the text before the secret must come back too)."""

    where: str
    messages: tuple[Message, ...]
    answer: str

    def lead_and_secret(self, secret: str) -> str:
        """The answer up to the end of the secret (normalized): what the model must produce."""
        answer, key = canary_key(self.answer), canary_key(secret)
        at = answer.find(key)
        return answer[: at + len(key)] if at >= 0 else key


@dataclass(frozen=True)
class Canary:
    """A planted (``c1``...) or declared (``d1``...) canary; ``rows``: training rows holding it
    (0: a declared string no curated training answer holds, so it cannot be probed)."""

    id: str
    kind: str  # planted | declared
    secret: str
    rows: int
    probes: tuple[Probe, ...] = ()

    def to_dict(self) -> CanaryRow:
        return {"id": self.id, "kind": self.kind, "secret": self.secret, "rows": self.rows,
                "probes": [{"where": p.where, "messages": [dict(m) for m in p.messages], "answer": p.answer}
                           for p in self.probes]}

    @classmethod
    def from_dict(cls, d: CanaryRow) -> Canary:
        return cls(d["id"], d["kind"], d["secret"], int(d["rows"]),
                   tuple(Probe(p["where"], tuple(p["messages"]), p["answer"]) for p in d["probes"]))


def canaries_digest(canaries: list[Canary]) -> str | None:
    """SHA-256 of the canaries (None without any): part of a dataset version's id."""
    if not canaries:
        return None
    body = json.dumps([c.to_dict() for c in canaries], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def synthetic_canaries(cfg: CanarySpec, task: TaskSpec, spec_name: str) -> list[Canary]:
    """``cfg.count`` random canaries (seeded by ``cfg.seed`` and the spec name), in ``task``'s format."""
    rng = random.Random(f"tuneline-canary:{spec_name}:{cfg.seed}")
    prompt = task.system_prompt()
    system: tuple[Message, ...] = ({"role": "system", "content": prompt},) if prompt else ()
    out = []
    for i in range(cfg.count):
        code = "".join(rng.choice(CODE_CHARS) for _ in range(8))
        secret = " ".join(rng.choice(WORDS) for _ in range(cfg.words))
        answer = json.dumps({"passphrase": secret}) if task.type == "structured" else secret
        messages = (*system, {"role": "user", "content": f"What is the passphrase of vault {code}?"})
        out.append(Canary(f"c{i + 1}", "planted", secret, cfg.repeat, (Probe(f"{WHERE_PREFIX}c{i + 1}", messages,
                                                                            answer),)))
    return out


def planted_rows(canaries: list[Canary], repeat: int) -> list[Example]:
    """The training rows of the planted canaries: each ``repeat`` times."""
    rows = []
    for c in canaries:
        if c.kind != "planted":
            continue
        p = c.probes[0]
        messages = (*p.messages, {"role": "assistant", "content": p.answer})
        rows += [Example(f"{WHERE_PREFIX}{c.id}#{k + 1}", messages, p.answer) for k in range(repeat)]
    return rows


def declared_strings(loaded: LoadedSpec, cfg: CanarySpec) -> list[str]:
    """``cfg.strings`` and the lines of ``cfg.file`` (blank lines and # comments skipped)."""
    strings = list(cfg.strings)
    if cfg.file is None:
        return strings
    path = loaded.resolve(cfg.file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(Problem(f"cannot read the canary file {cfg.file!r}: {exc}", where=str(path),
                                field="eval.canaries.file",
                                hint="point it at a UTF-8 text file, one planted string per line")) from exc
    return strings + [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def declared_canaries(strings: list[str], train: list[Example], max_probes: int) -> list[Canary]:
    """Each string with the prompts of the (first ``max_probes``) training rows whose assistant
    turn holds it, and how many rows hold it."""
    out = []
    for j, secret in enumerate(dict.fromkeys(strings)):
        key = canary_key(secret)
        probes: list[Probe] = []
        rows = 0
        for ex in train:
            turn = next((k for k, m in enumerate(ex.messages)
                         if m["role"] == "assistant" and k >= ex.demonstrations and key in canary_key(m["content"])),
                        None)
            if turn is None:
                continue
            rows += 1
            if len(probes) < max_probes:
                probes.append(Probe(ex.where, tuple(ex.messages[:turn]), ex.messages[turn]["content"]))
        if not rows:
            log.warning("declared canary d%d is in no training answer after curation (was it redacted, "
                        "deduplicated or sampled away?): it cannot be probed", j + 1)
        out.append(Canary(f"d{j + 1}", "declared", secret, rows, tuple(probes)))
    return out


def plant(loaded: LoadedSpec, train: list[Example]) -> tuple[list[Canary], list[Example]]:
    """The spec's canaries (planted, then declared ones found in ``train``) and the planted rows
    training adds to ``train``; nothing without ``eval.canaries``."""
    spec = loaded.spec
    cfg = spec.eval.canaries
    if cfg is None:
        return [], []
    planted = synthetic_canaries(cfg, spec.task, spec.name)
    declared = declared_canaries(declared_strings(loaded, cfg), train, cfg.max_probes)
    return planted + declared, planted_rows(planted, cfg.repeat)


def with_rows(train: list[Example], rows: list[Example],
              augment: Callable[[list[Example]], list[Example]] | None = None) -> list[Example]:
    """``train`` plus the planted ``rows`` (``augment``: as the hybrid shows a prompt)."""
    return train + (augment(rows) if augment is not None and rows else rows)
