"""Registry: every trained adapter is a version of its use case's model in MLflow's model registry.

A version carries the tags that make it traceable (dataset version, spec hash, code version,
base model and its file hash, evaluation metrics, gate results). Two aliases say what it is for:
``candidate`` (the latest trained version) and ``production`` (what serves traffic).
``production`` moves only to a version whose gates passed, unless forced with a reason; every
move is appended to the model's alias history (who, when, why), which ``rollback`` walks back
and ``lineage`` prints.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tuneline.errors import Problem, TunelineError

HISTORY_TAG = "tuneline.alias_history"
ALIASES = ("candidate", "production")


class RegistryError(TunelineError):
    """A registry operation cannot be done (unknown model or version, gates failed, nothing to roll back)."""


@dataclass
class VersionInfo:
    name: str
    version: int
    run_id: str | None
    source: str
    created: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def gates_passed(self) -> bool | None:
        value = self.tags.get("tuneline.gates_passed")
        return None if value is None else value == "true"

    @property
    def metrics(self) -> dict[str, float]:
        return {k.removeprefix("metric."): float(v) for k, v in self.tags.items() if k.startswith("metric.")}


def _client(uri: str) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def register_version(uri: str, name: str, run_id: str, source: str, tags: dict[str, str]) -> int:
    """A new version of model ``name`` from a run's adapter artifact; it becomes the ``candidate``."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"tuneline use case {name}: LoRA adapters of its runs")
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    version = int(mv.version)
    _move_alias(client, name, "candidate", version, action="register", reason="trained", forced=False)
    return version


def get_version(uri: str, name: str, version: int | str) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        known = [v.version for v in _versions(client, name)]
        raise RegistryError(Problem(
            f"model {name!r} has no version {version}",
            hint=f"versions: {sorted(known, key=int) or 'none'}; list them with `tuneline models {name}`")) from exc
    return _info(client, name, mv)


def resolve(uri: str, ref: str) -> VersionInfo:
    """``NAME`` (its production version), ``NAME@candidate``, ``NAME@production`` or ``NAME@3``."""
    from mlflow.exceptions import MlflowException

    name, _, which = ref.partition("@")
    which = which or "production"
    if which.isdigit():
        return get_version(uri, name, int(which))
    client = _client(uri)
    try:
        mv = client.get_model_version_by_alias(name, which)
    except MlflowException as exc:
        raise RegistryError(Problem(f"model {name!r} has no {which!r} version",
                                    hint=f"see `tuneline models {name}`; promote one with `tuneline promote`")) from exc
    return _info(client, name, mv)


def list_versions(uri: str, name: str | None = None) -> list[VersionInfo]:
    """Every version of ``name`` (or of every registered model), newest first."""
    client = _client(uri)
    names = [name] if name else [m.name for m in client.search_registered_models()]
    out: list[VersionInfo] = []
    for n in names:
        out.extend(_info(client, n, mv) for mv in _versions(client, n))
    return sorted(out, key=lambda v: (v.name, -v.version))


def history(uri: str, name: str) -> list[dict[str, Any]]:
    """Every alias move of ``name``, oldest first: action, alias, version, when, who, reason, forced."""
    from mlflow.exceptions import MlflowException

    try:
        rm = _client(uri).get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(Problem(f"no registered model {name!r}",
                                    hint="models are registered by `tuneline run`; list them with `tuneline models`")) from exc
    return json.loads(rm.tags.get(HISTORY_TAG, "[]"))


def promote(uri: str, name: str, version: int, *, force: bool = False, reason: str | None = None) -> VersionInfo:
    """Move ``production`` to ``version`` if its gates passed; ``force`` (with a reason) overrides."""
    info = get_version(uri, name, version)
    if force and not reason:
        raise RegistryError(Problem("--force needs --reason \"...\": the reason is recorded with the promotion"))
    if info.gates_passed is not True and not force:
        failed = info.tags.get("tuneline.gates_failed", "")
        state = "were not evaluated" if info.gates_passed is None else f"failed ({failed})" if failed else "failed"
        raise RegistryError(Problem(
            f"version {version} of {name!r} cannot be promoted: its gates {state}",
            hint="train a better version, or override with --force --reason \"why\" (recorded in the history)"))
    _move_alias(_client(uri), name, "production", version, action="promote",
                reason=reason or "gates passed", forced=force and info.gates_passed is not True)
    return get_version(uri, name, version)


def rollback(uri: str, name: str, reason: str | None = None) -> tuple[int, int]:
    """Move ``production`` back to the version that held it before the current one; returns (from, to)."""
    events = history(uri, name)
    stack: list[int] = []  # production versions in the order they took over; rollback pops
    for e in events:
        if e["alias"] != "production":
            continue
        if e["action"] == "rollback":
            stack.pop()
        else:
            stack.append(e["version"])
    if len(stack) < 2:
        raise RegistryError(Problem(f"{name!r} has no earlier production version to roll back to",
                                    hint=f"history: `tuneline lineage {name} VERSION`; promote a version instead"))
    current, previous = stack[-1], stack[-2]
    _move_alias(_client(uri), name, "production", previous, action="rollback",
                reason=reason or f"rolled back from version {current}", forced=False)
    return current, previous


def _move_alias(client: Any, name: str, alias: str, version: int, *, action: str, reason: str, forced: bool) -> None:
    client.set_registered_model_alias(name, alias, str(version))
    rm = client.get_registered_model(name)
    events = json.loads(rm.tags.get(HISTORY_TAG, "[]"))
    events.append({"action": action, "alias": alias, "version": version, "at": _now(), "by": _user(),
                   "reason": reason, "forced": forced})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(events))


def _versions(client: Any, name: str) -> list[Any]:
    return list(client.search_model_versions(f"name='{name}'"))


def _info(client: Any, name: str, mv: Any) -> VersionInfo:
    aliases = [a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(mv.version)]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mv.creation_timestamp / 1000))
    return VersionInfo(name, int(mv.version), mv.run_id, mv.source, created, sorted(aliases), dict(mv.tags))


def version_tags(*, spec_sha256: str, dataset_version: str | None, code_version: str, base_model: str,
                 base_fingerprint: str, suite: Any = None) -> dict[str, str]:
    """The tags a registered version carries (``suite``: its :class:`~tuneline.eval.EvalSuite`)."""
    tags = {"tuneline.spec_sha256": spec_sha256, "tuneline.code_version": code_version,
            "tuneline.base_model": base_model, "tuneline.base_model_fingerprint": base_fingerprint}
    if dataset_version:
        tags["tuneline.dataset_version"] = dataset_version
    if suite is not None:
        tags.update(eval_tags(suite))
    return tags


def eval_tags(suite: Any) -> dict[str, str]:
    """Gate results and the candidate's metrics on the main evaluation set, as version tags."""
    tags = {"tuneline.gates_passed": str(suite.passed).lower(),
            "tuneline.gates_failed": "; ".join(g.expr for g in suite.gates if not g.passed),
            "tuneline.eval_report": "eval/report.json"}
    cand = suite.main_set().system("candidate") if suite.sets else None
    if cand is not None:
        tags.update({f"metric.{k}": f"{v.value:.6g}" for k, v in cand.metrics.items()})
    return tags


def update_eval_tags(uri: str, run_id: str, suite: Any) -> list[int]:
    """After a re-evaluation: the versions registered from ``run_id`` get the new gate results."""
    client = _client(uri)
    updated = []
    for rm in client.search_registered_models():
        for mv in _versions(client, rm.name):
            if mv.run_id == run_id:
                for k, v in eval_tags(suite).items():
                    client.set_model_version_tag(rm.name, mv.version, k, v)
                updated.append(int(mv.version))
    return updated


def lineage(uri: str, datasets_dir: Any, name: str, version: int) -> dict[str, Any]:
    """The chain behind a version: source files -> dataset version -> curation -> training run ->
    evaluation -> the aliases it held and when."""
    from pathlib import Path

    info = get_version(uri, name, version)
    client = _client(uri)
    run = client.get_run(info.run_id) if info.run_id else None
    tags = dict(run.data.tags) if run else {}
    params = dict(run.data.params) if run else {}
    sources = []
    for split in ("train", "eval", "test", "validation"):
        if f"tuneline.data.{split}.path" in tags:
            sources.append({"split": split, "path": tags[f"tuneline.data.{split}.path"],
                            "sha256": tags.get(f"tuneline.data.{split}.sha256", ""),
                            "rows_used": tags.get(f"tuneline.data.{split}.rows_used", "")})
    ds_id = info.tags.get("tuneline.dataset_version") or tags.get("tuneline.dataset_version")
    manifest = None
    if ds_id:
        path = Path(datasets_dir) / ds_id / "manifest.json"
        manifest = json.loads(path.read_text()) if path.is_file() else None
    train_keys = ("train.method", "train.lr", "train.epochs", "train.max_steps", "train.batch_size", "train.seed",
                  "train.lora.r", "train.lora.alpha", "model")
    events = history(uri, name)
    held: list[dict[str, Any]] = []  # periods this version held an alias: from, until (None: still)
    open_: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["alias"] in open_ and e["version"] != version:
            open_.pop(e["alias"])["until"] = e["at"]
        elif e["version"] == version and e["alias"] not in open_:
            period = {"alias": e["alias"], "from": e["at"], "until": None, "how": e["action"], "by": e["by"],
                      "reason": e["reason"], "forced": e["forced"]}
            held.append(period)
            open_[e["alias"]] = period
    return {
        "model": name, "version": version, "aliases": info.aliases, "source": info.source,
        "sources": sources,
        "dataset": {"id": ds_id, "counts": (manifest or {}).get("counts"),
                    "dropped": (manifest or {}).get("dropped_by_reason"),
                    "steps": [s["name"] for s in (manifest or {}).get("steps", [])],
                    "manifest": str(Path(datasets_dir) / ds_id / "manifest.json") if ds_id else None},
        "run": {"id": info.run_id, "params": {k: params[k] for k in train_keys if k in params},
                "code": tags.get("mlflow.source.git.commit") or info.tags.get("tuneline.code_version"),
                "spec_sha256": info.tags.get("tuneline.spec_sha256"),
                "base_model": info.tags.get("tuneline.base_model"),
                "base_model_fingerprint": info.tags.get("tuneline.base_model_fingerprint"),
                "libraries": {k.removeprefix("tuneline.version."): v for k, v in tags.items()
                              if k.startswith("tuneline.version.")}},
        "eval": {"gates_passed": info.gates_passed, "gates_failed": info.tags.get("tuneline.gates_failed") or None,
                 "metrics": info.metrics, "report": f"runs:/{info.run_id}/eval/report.json" if info.run_id else None},
        "aliases_held": held,
    }
