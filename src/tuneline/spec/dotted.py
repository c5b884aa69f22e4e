"""Dotted paths into a spec section (``lora.r`` in ``train``): how a search trial sets the
parameters it picked."""

from __future__ import annotations


def set_path(d: dict[str, object], path: str, value: object) -> dict[str, object]:
    """A copy of nested dict ``d`` with ``path`` (``lora.r``) set to ``value``; KeyError for an unknown path.

    A comma-separated string set on ``target_modules`` becomes the list of module names."""
    head, _, rest = path.partition(".")
    if head not in d:
        raise KeyError(path)
    out = dict(d)
    if rest:
        inner = out[head]
        if not isinstance(inner, dict):
            raise KeyError(path)
        out[head] = set_path(inner, rest, value)
    else:
        if head == "target_modules" and isinstance(value, str) and value != "all-linear":
            value = [m.strip() for m in value.split(",") if m.strip()]
        out[head] = value
    return out
