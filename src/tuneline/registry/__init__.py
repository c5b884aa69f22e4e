"""Registry: every trained adapter is a version of its use case's model in MLflow's model registry.

A version carries the tags that make it traceable (dataset version, spec hash, code version,
base model and its file hash, evaluation metrics, gate results). Two aliases say what it is for:
``candidate`` (the latest trained version) and ``production`` (what serves traffic).

Gate results belong to the spec they were computed under: a version's gate state
(:data:`GATE_STATES`: passed, failed, not gated, not evaluated) is the one measured under the
spec it was trained with (``tuneline.spec_sha256``). Re-evaluating it under the same spec may
update it; a re-evaluation under another spec is recorded beside it, keyed by that spec's hash
(``tuneline.reeval.<sha256>.*``), shown by ``models`` and ``lineage``, and never counts for
promotion. ``production`` moves only to a version whose gates passed, unless forced with a reason
(a spec without thresholds is "not gated" and needs the same override).

Every alias move is an event of the model's alias history (who, when, why, forced or not), which
``rollback`` walks back and ``lineage`` prints. Each event is its own registered-model tag
(``tuneline.history.<nanoseconds>.<random>``: time-ordered, and two writers cannot collide), so the
history grows without bound; the single JSON tag of older workspaces (``tuneline.alias_history``)
is still read, as the oldest events. An alias move and its event are written under an
inter-process file lock (next to a SQLite or file store; for a remote tracking server, in
``~/.cache/tuneline/registry-locks``, which serializes the moves made from one machine only:
events from several machines are still never lost, but two rollbacks started at the same moment
on two machines could both undo the same promotion).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from tuneline.artifacts import ADAPTER_SHA_TAG, file_lock, replace_dir
from tuneline.audit import RESULT_REFUSED, AuditTrail
from tuneline.errors import Problem, TunelineError
from tuneline.tracking import quiet_downloads

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

    from tuneline.eval.results import EvalSuite

HISTORY_TAG = "tuneline.alias_history"  # legacy: the whole history as one JSON list (read, never written)
HISTORY_PREFIX = "tuneline.history."  # one registered-model tag per alias move
REEVAL_PREFIX = "tuneline.reeval."  # version tags of re-evaluations under another spec: PREFIX<sha256>.<what>
ALIASES = ("candidate", "production")

GATE_PASSED = "passed"
GATE_FAILED = "failed"
GATE_NOT_GATED = "not gated"  # the spec has no thresholds: nothing vouches for the version
GATE_NOT_EVALUATED = "not evaluated"
GATE_STATES = (GATE_PASSED, GATE_FAILED, GATE_NOT_GATED, GATE_NOT_EVALUATED)
MAX_REASON_CHARS = 2000
# beside a dataset version's manifest: which request ids its harvested training rows came from
# (written by tuneline.monitor.harvest and tuneline.pipeline.retrain, read by lineage)
FEEDBACK_LINKS = "requests.json"
# version tags of erasures (`tuneline data forget`) that removed rows from the version's dataset:
# PREFIX<erasure id> -> the dataset version and when it was marked (JSON)
ERASURE_PREFIX = "tuneline.erasure."


class RegistryError(TunelineError):
    """A registry operation cannot be done (unknown model or version, gates failed, nothing to roll back)."""


class Reevaluation(TypedDict):
    """A version's re-evaluation under another spec than its own (recorded, never counted for promotion)."""

    spec_sha256: str
    gate_state: str
    gates_failed: str
    at: str
    metrics: dict[str, float]


class AliasEvent(TypedDict):
    """One alias move of a model's history, as stored (JSON) in a registered-model tag."""

    action: str  # register, promote, rollback
    alias: str
    version: int
    at: str
    by: str
    reason: str
    forced: bool
    gates: NotRequired[str]  # the version's gate state then (absent in events recorded before gate states)


# a period a version held an alias (``until`` None: it still does); "from" is a keyword, hence this form
AliasPeriod = TypedDict("AliasPeriod", {"alias": str, "from": str, "until": str | None, "how": str, "by": str,
                                        "reason": str, "forced": bool, "gates": str | None})


class LineageSource(TypedDict):
    split: str
    path: str
    sha256: str
    rows_used: str


class LineageDataset(TypedDict):
    id: str | None
    counts: object  # the manifest's, shown as they are
    dropped: object
    steps: list[str]
    manifest: str | None


class LineageRun(TypedDict):
    id: str | None
    params: dict[str, str]
    code: str | None
    spec_sha256: str | None
    base_model: str | None
    base_model_fingerprint: str | None
    libraries: dict[str, str]


class LineageEval(TypedDict):
    gate_state: str
    gates_passed: bool | None
    gates_failed: str | None
    spec_sha256: str | None
    metrics: dict[str, float]
    report: str | None
    reevaluations: list[Reevaluation]


class LineageFeedback(TypedDict):
    """The logged requests whose feedback became training rows of the version's dataset."""

    rows: int  # training rows that came from feedback
    request_ids: list[str]
    harvests: list[str]  # the harvest dataset versions the rows came through
    links: str  # the file listing row -> request ids


class Lineage(TypedDict):
    """The chain behind a version (:func:`lineage`)."""

    model: str
    version: int
    aliases: list[str]
    source: str
    sources: list[LineageSource]
    dataset: LineageDataset
    run: LineageRun
    eval: LineageEval
    aliases_held: list[AliasPeriod]
    feedback: LineageFeedback | None  # None: no training row came from feedback


EXPORT_SOURCE_TAG = "tuneline.export.source"  # on a version `tuneline export --format mlflow` registered


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
    def exported_from(self) -> str | None:
        """``NAME/VERSION`` when this version is a `tuneline export --format mlflow` of that version (an
        MLflow model for MLflow's own serving, not an adapter `tuneline serve` loads); else None."""
        return self.tags.get(EXPORT_SOURCE_TAG)

    @property
    def gate_state(self) -> str:
        """passed / failed / not gated / not evaluated, under the spec this version was trained with."""
        state = self.tags.get("tuneline.gate_state")
        if state is not None:
            under = self.tags.get("tuneline.gates_spec_sha256")
            if state not in GATE_STATES or (under is not None and under != self.tags.get("tuneline.spec_sha256")):
                return GATE_NOT_EVALUATED
            return state
        legacy = self.tags.get("tuneline.gates_passed")  # versions registered before gate_state existed
        return GATE_NOT_EVALUATED if legacy is None else GATE_PASSED if legacy == "true" else GATE_FAILED

    @property
    def gates_passed(self) -> bool | None:
        """True: passed; False: failed; None: not gated or not evaluated."""
        return {GATE_PASSED: True, GATE_FAILED: False}.get(self.gate_state)

    @property
    def gates_failed(self) -> str:
        return self.tags.get("tuneline.gates_failed", "") if self.gate_state == GATE_FAILED else ""

    @property
    def metrics(self) -> dict[str, float]:
        return {k.removeprefix("metric."): float(v) for k, v in self.tags.items() if k.startswith("metric.")}

    @property
    def reevaluations(self) -> list[Reevaluation]:
        """Re-evaluations under other specs than this version's own: recorded, never counted for promotion."""
        found: dict[str, Reevaluation] = {}
        for key, value in self.tags.items():
            if not key.startswith(REEVAL_PREFIX):
                continue
            sha, _, what = key.removeprefix(REEVAL_PREFIX).partition(".")
            entry = found.setdefault(sha, {"spec_sha256": sha, "gate_state": GATE_NOT_EVALUATED, "gates_failed": "",
                                           "at": "", "metrics": {}})
            if what.startswith("metric."):
                entry["metrics"][what.removeprefix("metric.")] = float(value)
            elif what == "gate_state":
                entry["gate_state"] = value
            elif what == "gates_failed":
                entry["gates_failed"] = value
            elif what == "at":
                entry["at"] = value
        return sorted(found.values(), key=lambda e: e["at"])

    @property
    def erasures(self) -> list[str]:
        """The erasure requests that removed rows this version was trained on (it still carries
        them until it is retrained), oldest first."""
        return sorted(k.removeprefix(ERASURE_PREFIX) for k in self.tags if k.startswith(ERASURE_PREFIX))

    def describe_gates(self) -> str:
        """The gate state in words, e.g. ``failed (accuracy >= 0.9)``."""
        failed = self.gates_failed
        return f"{self.gate_state} ({failed})" if failed else self.gate_state


def _client(uri: str) -> MlflowClient:
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


def lock_path(uri: str) -> Path:
    """The file locked while an alias moves: beside a SQLite database or inside a file store; for a
    remote tracking server, one per server URI in the user's cache (it serializes this machine only)."""
    bare = uri.split("?", 1)[0]
    if bare.startswith("sqlite:///") and bare != "sqlite:///:memory:":
        db = Path(bare.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".registry.lock")
    if bare.startswith("file:") or (":" not in bare and not bare.startswith("databricks")):  # a plain folder
        folder = Path(bare.removeprefix("file://").removeprefix("file:"))
        return folder / ".tuneline-registry.lock"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "tuneline" / "registry-locks" / f"{digest}.lock"


@contextmanager
def _locked(uri: str) -> Iterator[None]:
    """Hold the registry lock of ``uri`` (an exclusive ``flock``; it is released when the process dies)."""
    with file_lock(lock_path(uri)):
        yield


def register_version(uri: str, name: str, run_id: str, source: str, tags: dict[str, str]) -> int:
    """A new version of model ``name`` from a run's adapter artifact; it becomes the ``candidate``."""
    from mlflow.exceptions import MlflowException

    with _locked(uri):
        client = _client(uri)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description=f"tuneline use case {name}: LoRA adapters of its runs")
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        version = int(mv.version)
        _move_alias(client, name, "candidate", version, AliasMove(
            action="register", reason="trained", forced=False, gates=_info(client, name, mv).gate_state))
    return version


def get_version(uri: str, name: str, version: int | str) -> VersionInfo:
    return _get_version(_client(uri), name, version)


def _get_version(client: MlflowClient, name: str, version: int | str, rm: RegisteredModel | None = None) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        known = [v.version for v in _versions(client, name)]
        raise RegistryError(Problem(
            f"model {name!r} has no version {version}",
            hint=f"versions: {sorted(known, key=int) or 'none'}; list them with `tuneline models {name}`")) from exc
    return _info(client, name, mv, rm)


def download_adapter(uri: str, info: VersionInfo, cache: Path | None = None) -> Path:
    """The version's adapter folder on this machine, downloaded from the tracking store ``uri``
    names (a team's tracking server serves its artifact store: the URI is all a machine needs).

    With ``cache``: kept there in a folder named by the tree hash recorded at registration and
    reused from there, across processes, until :func:`evict_download` removes it (a folder is put
    in place only once complete). Verifying the files is the caller's (they may be checked while
    loaded); without a recorded hash nothing is cached."""
    import mlflow

    sha = info.tags.get(ADAPTER_SHA_TAG)
    if cache is None or not sha:
        with quiet_downloads():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, tracking_uri=uri))
    target = cache / sha
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        with quiet_downloads():
            got = mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(tmp), tracking_uri=uri)
        replace_dir(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def evict_download(cache: Path, info: VersionInfo) -> None:
    """Forget a cached download of the version (its files failed verification): the next
    :func:`download_adapter` fetches it again."""
    sha = info.tags.get(ADAPTER_SHA_TAG)
    if sha:
        shutil.rmtree(cache / sha, ignore_errors=True)


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
        rm = client.get_registered_model(n)
        out.extend(_info(client, n, mv, rm) for mv in _versions(client, n))
    return sorted(out, key=lambda v: (v.name, -v.version))


def history(uri: str, name: str) -> list[AliasEvent]:
    """Every alias move of ``name``, oldest first: action, alias, version, when, who, reason, forced
    (and, for moves recorded since gate states exist, ``gates``: the version's gate state then)."""
    return _events(_registered(_client(uri), name).tags)


def _registered(client: MlflowClient, name: str) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(Problem(f"no registered model {name!r}",
                                    hint="models are registered by `tuneline run`; list them with `tuneline models`")) from exc


def _events(tags: dict[str, str]) -> list[AliasEvent]:
    """The legacy single-tag history (oldest), then one event per history tag in key (time) order."""
    events: list[AliasEvent] = json.loads(tags.get(HISTORY_TAG, "[]"))
    events.extend(json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_PREFIX)))
    return events


def promote(uri: str, name: str, version: int, *, force: bool = False, reason: str | None = None,
            trail: AuditTrail | None = None) -> VersionInfo:
    """Move ``production`` to ``version`` if its gates passed under its own spec; ``force`` (with a
    reason) overrides failed, not gated and not evaluated alike. With a ``trail``, the promotion (or
    its refusal) is an audit entry."""
    if force and not (reason or "").strip():
        raise RegistryError(Problem("--force needs --reason \"...\": the reason is recorded with the promotion",
                                    field="--reason"))
    with _locked(uri):
        client = _client(uri)
        rm = _registered(client, name)
        info = _get_version(client, name, version, rm)
        state = info.gate_state
        if state != GATE_PASSED and not force:
            why = {GATE_FAILED: "its gates failed" + (f" ({info.gates_failed})" if info.gates_failed else ""),
                   GATE_NOT_GATED: "it is not gated (its spec has no objective.thresholds)",
                   GATE_NOT_EVALUATED: "its gates were not evaluated"}[state]
            others = [f"{r['spec_sha256'][:12]}: {r['gate_state']}" for r in info.reevaluations]
            note = (f"; re-evaluations under other specs ({', '.join(others)}) do not count" if others else "")
            if trail is not None:
                trail.append("promote", subject=f"model:{name}/{version}", inputs=_version_refs(info),
                             result=RESULT_REFUSED, details={"gates": state, "reason": reason or ""})
            raise RegistryError(Problem(
                f"version {version} of {name!r} cannot be promoted: {why}{note}",
                hint="train a version whose spec's gates pass, or override with --force --reason \"why\" "
                     "(recorded in the history)"))
        before = rm.aliases.get("production")
        forced = force and state != GATE_PASSED
        _move_alias(client, name, "production", version, AliasMove(
            action="promote", reason=reason or "gates passed", forced=forced, gates=state), tags=rm.tags)
    if trail is not None:
        trail.append("promote", subject=f"model:{name}/{version}", inputs=_version_refs(info),
                     outputs={"production": f"{name}/{version}"},
                     details={"gates": state, "forced": forced, "reason": reason or "gates passed",
                              "previous": f"{name}/{before}" if before else None})
    if "production" not in info.aliases:
        info.aliases = sorted([*info.aliases, "production"])
    return info


def rollback(uri: str, name: str, reason: str | None = None, *, trail: AuditTrail | None = None) -> tuple[int, int]:
    """Move ``production`` back to the version that held it before the current one; returns (from, to).
    With a ``trail``, the rollback is an audit entry."""
    with _locked(uri):  # the history read and the move it decides are one step
        client = _client(uri)
        rm = _registered(client, name)
        stack: list[int] = []  # production versions in the order they took over; rollback pops
        for e in _events(rm.tags):
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
        _move_alias(client, name, "production", previous, AliasMove(
            action="rollback", reason=reason or f"rolled back from version {current}", forced=False,
            gates=_get_version(client, name, previous, rm).gate_state), tags=rm.tags)
    if trail is not None:
        trail.append("rollback", subject=f"model:{name}", inputs={"model": f"{name}/{current}"},
                     outputs={"production": f"{name}/{previous}"},
                     details={"reason": reason or f"rolled back from version {current}"})
    return current, previous


def _version_refs(info: VersionInfo) -> dict[str, str]:
    """A version's ids for an audit entry: NAME/VERSION, its run and adapter hash."""
    refs = {"model": f"{info.name}/{info.version}"}
    if info.run_id:
        refs["run"] = info.run_id
    if sha := info.tags.get(ADAPTER_SHA_TAG):
        refs["adapter"] = sha
    return refs


@dataclass(frozen=True)
class AliasMove:
    """One event of an alias's history: what moved it (register, promote, rollback), why, whether
    ``--force`` overrode failed gates, and the version's gate state."""

    action: str
    reason: str
    forced: bool
    gates: str


def _move_alias(client: MlflowClient, name: str, alias: str, version: int, move: AliasMove,
                tags: dict[str, str] | None = None) -> None:
    """Record the move as a new history event, then move the alias. The caller holds the lock (and may
    pass the registered model's ``tags`` it read under it)."""
    if len(move.reason) > MAX_REASON_CHARS:
        raise RegistryError(Problem(f"the reason is {len(move.reason)} characters long", field="--reason",
                                    hint=f"keep it under {MAX_REASON_CHARS}; link to a ticket for the details"))
    tags = client.get_registered_model(name).tags if tags is None else tags
    stamps = [k.removeprefix(HISTORY_PREFIX).split(".")[0] for k in tags if k.startswith(HISTORY_PREFIX)]
    # strictly after the newest event, even if this machine's clock is behind the one that wrote it
    ns = max([time.time_ns(), *(int(t) + 1 for t in stamps if t.isdigit())])
    key = f"{HISTORY_PREFIX}{ns:020d}.{secrets.token_hex(4)}"
    event: AliasEvent = {"action": move.action, "alias": alias, "version": version, "at": _now(), "by": _user(),
             "reason": move.reason, "forced": move.forced, "gates": move.gates}
    client.set_registered_model_tag(name, key, json.dumps(event))
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except BaseException:
        with suppress(Exception):  # the alias did not move, so the event must not say it did; report the first error
            client.delete_registered_model_tag(name, key)
        raise


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return list(client.search_model_versions(f"name='{name}'"))


def _info(client: MlflowClient, name: str, mv: ModelVersion, rm: RegisteredModel | None = None) -> VersionInfo:
    rm = rm or client.get_registered_model(name)
    aliases = [a for a, v in rm.aliases.items() if str(v) == str(mv.version)]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mv.creation_timestamp / 1000))
    # MLflow types the source as optional, but creating a version requires one
    return VersionInfo(name, int(mv.version), mv.run_id, mv.source or "", created, sorted(aliases), dict(mv.tags))


def version_tags(*, spec_sha256: str, dataset_version: str | None, code_version: str, base_model: str,
                 base_fingerprint: str, suite: EvalSuite | None = None) -> dict[str, str]:
    """The tags a registered version carries (``suite``: its :class:`~tuneline.eval.EvalSuite`)."""
    tags = {"tuneline.spec_sha256": spec_sha256, "tuneline.code_version": code_version,
            "tuneline.base_model": base_model, "tuneline.base_model_fingerprint": base_fingerprint}
    if dataset_version:
        tags["tuneline.dataset_version"] = dataset_version
    if suite is not None:
        tags.update(eval_tags(suite, spec_sha256))
    return tags


def gate_state_of(suite: EvalSuite) -> str:
    """passed / failed, or not gated when the spec defines no thresholds."""
    if not suite.gates:
        return GATE_NOT_GATED
    return GATE_PASSED if suite.passed else GATE_FAILED


def eval_tags(suite: EvalSuite, spec_sha256: str) -> dict[str, str]:
    """Gate results (with the hash of the spec they were computed under) and the candidate's metrics
    on the main evaluation set, as version tags."""
    state = gate_state_of(suite)
    tags = {"tuneline.gate_state": state, "tuneline.gates_spec_sha256": spec_sha256,
            "tuneline.gates_passed": str(state == GATE_PASSED).lower(),
            "tuneline.gates_failed": "; ".join(g.expr for g in suite.gates if not g.passed),
            "tuneline.eval_report": "eval/report.json"}
    tags.update({f"metric.{k}": v for k, v in _metrics(suite).items()})
    return tags


def _metrics(suite: EvalSuite) -> dict[str, str]:
    cand = suite.main_set().system("candidate") if suite.sets else None
    return {k: f"{v.value:.6g}" for k, v in cand.metrics.items()} if cand is not None else {}


def update_eval_tags(uri: str, run_id: str, suite: EvalSuite, spec_sha256: str) -> list[tuple[int, bool]]:
    """After a re-evaluation under the spec ``spec_sha256``: each version registered from ``run_id``,
    with whether its gate results were updated (True: the spec it was trained with) or the
    re-evaluation was recorded beside them under that spec's hash (False: another spec; it does not
    count for promotion)."""
    client = _client(uri)
    done: list[tuple[int, bool]] = []
    for rm in client.search_registered_models():
        for mv in _versions(client, rm.name):
            if mv.run_id != run_id:
                continue
            same = dict(mv.tags).get("tuneline.spec_sha256") == spec_sha256
            if same:
                tags = eval_tags(suite, spec_sha256)
            else:
                prefix = f"{REEVAL_PREFIX}{spec_sha256}."
                tags = {f"{prefix}gate_state": gate_state_of(suite), f"{prefix}at": _now(),
                        f"{prefix}gates_failed": "; ".join(g.expr for g in suite.gates if not g.passed)}
                tags.update({f"{prefix}metric.{k}": v for k, v in _metrics(suite).items()})
            for k, v in tags.items():
                client.set_model_version_tag(rm.name, mv.version, k, v)
            done.append((int(mv.version), same))
    return done


def trained_on(uri: str, dataset_versions: Collection[str]) -> list[VersionInfo]:
    """Every registered version (of every model) trained on one of ``dataset_versions``."""
    wanted = set(dataset_versions)
    if not wanted:
        return []
    return [v for v in list_versions(uri) if v.tags.get("tuneline.dataset_version") in wanted]


def mark_erasure(uri: str, dataset_versions: Collection[str], erasure_id: str) -> list[VersionInfo]:
    """Tag each version trained on one of ``dataset_versions`` with the erasure that removed rows
    from its data (``tuneline.erasure.<id>``); returns them."""
    client = _client(uri)
    marked = trained_on(uri, dataset_versions)
    for v in marked:
        value = json.dumps({"dataset_version": v.tags["tuneline.dataset_version"], "at": _now()})
        client.set_model_version_tag(v.name, str(v.version), ERASURE_PREFIX + erasure_id, value)
        v.tags[ERASURE_PREFIX + erasure_id] = value
    return marked


def lineage(uri: str, datasets_dir: Path, name: str, version: int) -> Lineage:
    """The chain behind a version: source files -> dataset version -> curation -> training run ->
    evaluation -> the aliases it held and when."""
    info = get_version(uri, name, version)
    client = _client(uri)
    run = client.get_run(info.run_id) if info.run_id else None
    tags = dict(run.data.tags) if run else {}
    params = dict(run.data.params) if run else {}
    sources: list[LineageSource] = []
    for split in ("train", "eval", "test", "validation"):
        if f"tuneline.data.{split}.path" in tags:
            sources.append({"split": split, "path": tags[f"tuneline.data.{split}.path"],
                            "sha256": tags.get(f"tuneline.data.{split}.sha256", ""),
                            "rows_used": tags.get(f"tuneline.data.{split}.rows_used", "")})
    ds_id = info.tags.get("tuneline.dataset_version") or tags.get("tuneline.dataset_version")
    manifest, manifest_at = None, None
    if ds_id:
        manifest, manifest_at = _manifest(uri, Path(datasets_dir) / ds_id / "manifest.json", info.run_id)
    train_keys = ("train.method", "train.lr", "train.epochs", "train.max_steps", "train.batch_size", "train.seed",
                  "train.lora.r", "train.lora.alpha", "model")
    events = history(uri, name)
    held: list[AliasPeriod] = []  # periods this version held an alias: from, until (None: still)
    open_: dict[str, AliasPeriod] = {}
    for e in events:
        if e["alias"] in open_ and e["version"] != version:
            open_.pop(e["alias"])["until"] = e["at"]
        elif e["version"] == version and e["alias"] not in open_:
            period: AliasPeriod = {"alias": e["alias"], "from": e["at"], "until": None, "how": e["action"], "by": e["by"],
                      "reason": e["reason"], "forced": e["forced"], "gates": e.get("gates")}
            held.append(period)
            open_[e["alias"]] = period
    return {
        "model": name, "version": version, "aliases": info.aliases, "source": info.source,
        "sources": sources,
        "dataset": {"id": ds_id, "counts": (manifest or {}).get("counts"),
                    "dropped": (manifest or {}).get("dropped_by_reason"),
                    "steps": [s["name"] for s in (manifest or {}).get("steps", [])],
                    "manifest": manifest_at},
        "run": {"id": info.run_id, "params": {k: params[k] for k in train_keys if k in params},
                "code": tags.get("mlflow.source.git.commit") or info.tags.get("tuneline.code_version"),
                "spec_sha256": info.tags.get("tuneline.spec_sha256"),
                "base_model": info.tags.get("tuneline.base_model"),
                "base_model_fingerprint": info.tags.get("tuneline.base_model_fingerprint"),
                "libraries": {k.removeprefix("tuneline.version."): v for k, v in tags.items()
                              if k.startswith("tuneline.version.")}},
        "eval": {"gate_state": info.gate_state, "gates_passed": info.gates_passed,
                 "gates_failed": info.gates_failed or None,
                 "spec_sha256": info.tags.get("tuneline.gates_spec_sha256") or info.tags.get("tuneline.spec_sha256"),
                 "metrics": info.metrics, "report": f"runs:/{info.run_id}/eval/report.json" if info.run_id else None,
                 "reevaluations": info.reevaluations},
        "aliases_held": held,
        "feedback": feedback_lineage(Path(datasets_dir), ds_id),
    }


def _manifest(uri: str, local: Path, run_id: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """A dataset version's manifest and where it was read: this machine's dataset folder, else the
    copy the training run logged (``dataset/manifest.json``: another machine trained the version)."""
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    if not run_id:
        return None, None
    import mlflow
    from mlflow.exceptions import MlflowException

    logged = f"runs:/{run_id}/dataset/manifest.json"
    with quiet_downloads(), tempfile.TemporaryDirectory(prefix="tuneline-lineage-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=logged, dst_path=tmp, tracking_uri=uri)
        except (MlflowException, OSError):  # a run that logged none (older, or its artifacts removed)
            return None, None
        return json.loads(Path(path).read_text()), logged


def feedback_lineage(datasets_dir: Path, dataset_version: str | None) -> LineageFeedback | None:
    """The request ids behind a dataset version's harvested rows (its :data:`FEEDBACK_LINKS`
    file), or None when none of its rows came from feedback."""
    if not dataset_version:
        return None
    path = datasets_dir / dataset_version / FEEDBACK_LINKS
    if not path.is_file():
        return None
    links = json.loads(path.read_text())
    return {"rows": len(links.get("rows", [])), "request_ids": list(links.get("request_ids", [])),
            "harvests": list(links.get("harvests", [])), "links": str(path)}
