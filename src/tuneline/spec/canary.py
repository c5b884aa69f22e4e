"""The memorization probe's settings: ``eval.canaries``.

Curation plants ``count`` synthetic canaries (a random prompt with a random secret as its answer),
each repeated ``repeat`` times, into the training rows only; the user may also declare strings
they planted in their own training answers (``strings``, ``file``). Evaluation prompts the base
and the tuned model with each canary's prompt and counts the canaries whose secret comes back:
the gate quantity ``canary_leak`` (see :mod:`tuneline.curation.canary` and
:mod:`tuneline.eval.canary`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A declared canary shorter than this could come back by chance (a word, a number): refused
MIN_DECLARED_CHARS = 8


class CanarySpec(BaseModel):
    """Canaries planted in (or declared in) the training data and probed at evaluation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    count: int = Field(default=4, ge=0, le=100,
                       description="Synthetic canaries curation plants in the training split (0: only declared ones).")
    repeat: int = Field(default=8, ge=1, le=1000,
                        description="Training rows per synthetic canary (more repeats: more memorization).")
    words: int = Field(default=6, ge=3, le=16,
                       description="Words in each synthetic secret (drawn from 256 words: 8 bits each).")
    seed: int = Field(default=0, description="Seed of the prompts and secrets (with the spec name).")
    strings: list[str] = Field(
        default_factory=list, max_length=100,
        description="Strings you planted in your own training answers; each is probed with the prompts of the "
                    f"training rows whose answer holds it (at least {MIN_DECLARED_CHARS} characters).")
    file: str | None = Field(
        default=None, min_length=1,
        description="A text file of such strings, one per line (relative to the spec file; blank lines and "
                    "lines starting with # skipped).")
    max_probes: int = Field(default=3, ge=1, le=20,
                            description="Declared strings: at most this many training rows' prompts each.")

    @field_validator("strings")
    @classmethod
    def _long_enough(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            if len(s.strip()) < MIN_DECLARED_CHARS:
                raise ValueError(f"strings[{i}] ({s!r}) is shorter than {MIN_DECLARED_CHARS} characters: a "
                                 "canary that short could come back by chance; plant a longer, unlikely string")
        if len(set(v)) < len(v):
            raise ValueError("strings has duplicates")
        return v

    @model_validator(mode="after")
    def _something_to_probe(self) -> CanarySpec:
        if self.count == 0 and not self.strings and self.file is None:
            raise ValueError("count is 0 and no strings or file are declared: nothing to probe; set count > 0 "
                             "or declare the strings you planted, or remove eval.canaries")
        return self
