"""API keys: their scopes (which models and aliases a key reaches), SHA-256 digests, and the keys
file or ``$TUNELINE_API_KEYS`` they are read from."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneline.errors import Problem, TunelineError

KEYS_ENV = "TUNELINE_API_KEYS"


@dataclass
class Key:
    """An API key's scope. ``models``: ``"*"`` (everything), ``NAME`` (every version of NAME),
    ``NAME@ALIAS`` (only that alias; ``NAME@production`` also allows plain ``NAME``) or ``NAME@3``.
    ``sha256``: the key's hex digest, for a keys file that does not hold the key itself.
    ``metrics``: may read ``/metrics`` (so may a ``"*"`` key)."""

    name: str
    models: set[str]
    sha256: str | None = None
    metrics: bool = False

    def allows(self, ref: str) -> bool:
        if "*" in self.models or ref in self.models:
            return True
        name, _, which = ref.partition("@")
        for allowed in self.models:
            a_name, _, a_which = allowed.partition("@")
            if a_name == name and (not a_which or a_which == (which or "production")):
                return True
        return False

    def allows_name(self, name: str) -> bool:
        """Whether any reference to model ``name`` is within scope (for listing)."""
        return "*" in self.models or any(m.partition("@")[0] == name for m in self.models)

    @property
    def reads_metrics(self) -> bool:
        return self.metrics or "*" in self.models


def key_fingerprints(keys: list[Key] | None) -> dict[str, str]:
    """Key name -> a short fingerprint of the key's digest and scope, for the audit trail: it changes
    when a key or its scope changes, and reveals neither the key nor its digest."""
    out = {}
    for k in keys or []:
        scope = json.dumps({"sha256": k.sha256, "models": sorted(k.models), "metrics": k.metrics}, sort_keys=True)
        out[k.name] = hashlib.sha256(f"tuneline-key-audit:{scope}".encode()).hexdigest()[:16]
    return out


def key_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Key names added, removed and changed (key or scope) between two :func:`key_fingerprints`;
    empty when nothing changed."""
    changes = {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
               "changed": sorted(n for n in set(before) & set(after) if before[n] != after[n])}
    return {k: v for k, v in changes.items() if v}


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _yaml_error(exc: Exception) -> str:
    """Where a YAML error is and what it is, without the text of the line (which may hold a key)."""
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", None) or "the file is not valid YAML or JSON")
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", problem)  # a quoted character or alias may be a key's
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_keys(path: str | Path | None) -> list[Key] | None:
    """API keys from a file (JSON or YAML) or, without one, from ``$TUNELINE_API_KEYS``
    (``key=model1,model2;key2=*``). None when neither is set.

    The file: ``keys: [{name, key: sk-... | sha256: HEX, models: [...], metrics: true|false}]``.
    ``sha256`` is the hex SHA-256 of the key (``printf %s sk-... | sha256sum``), so the file need not
    hold the key itself. ``models``: ``"*"``, ``NAME`` (every version), ``NAME@production`` (only
    that alias; also plain ``NAME``), ``NAME@candidate`` or ``NAME@3``. ``metrics: true`` lets the
    key read ``/metrics`` (a ``"*"`` key always may)."""
    if path is not None:
        p = Path(path)
        hint = "a YAML or JSON file: keys: [{name: team-a, sha256: <hex of the key>, models: ['support@production']}]"
        try:
            text = p.read_text()
        except OSError as exc:
            raise TunelineError(Problem(f"cannot read API keys: {exc.strerror or exc}", where=str(p), hint=hint)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # never the message itself: it quotes the offending line, which may be a key
            raise TunelineError(Problem(f"the API keys file is not valid YAML: {_yaml_error(exc)}", where=str(p),
                                        hint=hint)) from None
        entries = data.get("keys", []) if isinstance(data, dict) else []
        if not isinstance(entries, list):
            raise TunelineError(Problem("`keys` must be a list", where=str(p), field="keys", hint=hint))
        keys: list[Key] = []
        for i, entry in enumerate(entries):
            keys.append(_key_entry(entry, i, str(p)))
        if not keys:
            raise TunelineError(Problem("no keys in the file", where=str(p), hint="list them under `keys:`"))
        digests = [k.sha256 for k in keys]
        for i, d in enumerate(digests):
            if d in digests[:i]:
                raise TunelineError(Problem(f"entry {i} has the same key as entry {digests.index(d)}",
                                            where=str(p), field=f"keys.{i}", hint="each key once, with one scope"))
        return keys
    env = os.environ.get(KEYS_ENV, "").strip()
    if not env:
        return None
    out = []
    for i, part in enumerate(p for p in env.split(";") if p.strip()):
        token, _, models = part.partition("=")
        if not token.strip() or not models.strip():
            raise TunelineError(Problem(f"{KEYS_ENV} entry {i} is not key=model1,model2", field=KEYS_ENV))
        out.append(Key(f"env{i}", {m.strip() for m in models.split(",") if m.strip()}, hash_key(token.strip())))
    return out


def _key_entry(entry: object, i: int, where: str) -> Key:
    field = f"keys.{i}"
    if not isinstance(entry, dict):
        raise TunelineError(Problem(f"entry {i} is not a mapping", where=where, field=field))
    token, digest = entry.get("key"), entry.get("sha256")
    if (token is None) == (digest is None):
        raise TunelineError(Problem(f"entry {i} needs exactly one of `key` and `sha256`", where=where, field=field,
                                    hint="sha256: the hex SHA-256 of the key, so the file does not hold the key"))
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise TunelineError(Problem(f"entry {i}: `key` must be a non-empty string", where=where, field=f"{field}.key"))
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip())):
        raise TunelineError(Problem(f"entry {i}: `sha256` must be 64 hex digits", where=where, field=f"{field}.sha256",
                                    hint="printf %s 'sk-...' | sha256sum"))
    models = entry.get("models") or []
    metrics = entry.get("metrics", False)
    if not isinstance(metrics, bool):
        raise TunelineError(Problem(f"entry {i}: `metrics` must be true or false", where=where, field=f"{field}.metrics"))
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise TunelineError(Problem(f"entry {i}: `models` must be a list of model names", where=where,
                                    field=f"{field}.models", hint="e.g. ['*'], ['support'], ['support@production']"))
    if not models and not metrics:
        raise TunelineError(Problem(f"entry {i} needs `models` (or `metrics: true` for a scraping key)",
                                    where=where, field=f"{field}.models"))
    sha = hash_key(token.strip()) if isinstance(token, str) else str(digest).strip().lower()
    return Key(str(entry.get("name") or f"key{i}"), {m.strip() for m in models}, sha, metrics)
