"""Model cards: a Hugging Face ``README.md`` for every registered version, from recorded facts only.

The card is YAML metadata in the Hugging Face model-card format (``base_model``, ``library_name``,
``license``, ``datasets``, ``tags``, ``pipeline_tag``, ``model-index`` with the candidate's metrics
on the main evaluation set) and a body that says what the version is for, what it was trained on
and how, how it scored against the base and production models, which gates it passed, what it
was compared with, its known limitations and the audit entries behind it. Nothing is written that
tuneline did not record: a license the spec does not declare (``data.*.license``) reads "not declared".

:func:`gather` collects the facts of a version from the registry, its run, the dataset version and
the audit trail; :func:`render` writes the card and checks its metadata with ``huggingface_hub``'s
own parser (offline). The pipeline writes the card into the adapter folder after registration and
logs it beside the adapter (``adapter/README.md``); the adapter's hash leaves it out
(:data:`tuneline.artifacts.CARD_FILE`), and the version's tag :data:`CARD_SHA_TAG` holds its own hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.audit import AuditError, Entry, trail_of
from tuneline.errors import Problem, TunelineError
from tuneline.eval.results import EvalSuite, SetResult
from tuneline.models.sources import (
    BUILTIN_MODELS,
    SourceKind,
    declared_license,
    portable_model_name,
)
from tuneline.registry import (
    GATE_FAILED,
    GATE_NOT_EVALUATED,
    RegistryError,
    VersionInfo,
    get_version,
)
from tuneline.spec import parse_spec
from tuneline.spec.models import Spec

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData

    from tuneline.curation.version import Manifest
    from tuneline.workspace import Workspace

CARD_SHA_TAG = "tuneline.card_sha256"  # version tag: the SHA-256 of the card stored with it
BASE_MODEL_FILE = "base_model.json"  # in the adapter folder: the base's portable name and fingerprint
NOT_DECLARED = "not declared"
SMALL_EVAL = 100  # fewer evaluation items than this: the card names the set as small
# tuneline's task types as Hugging Face task ids (every tuneline model is a causal LM that answers by generating)
HF_TASKS = {"classification": "text-classification", "summarization": "summarization", "translation": "translation",
            "instruction": "text-generation", "chat": "text-generation", "structured": "text-generation"}
TRAIN_PARAMS = ("method", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lr", "lr_scheduler",
                "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "seq_len", "weight_decay",
                "seed", "precision", "packing")
# what each training method's result is called in the card's first line, and its Hugging Face tags
METHOD_NAMES = {"lora": "A LoRA adapter", "dora": "A DoRA adapter (weight-decomposed LoRA)",
                "rslora": "An rsLoRA adapter (rank-stabilized LoRA)", "ia3": "An IA3 adapter",
                "prefix": "A prefix-tuning adapter", "prompt": "A prompt-tuning adapter",
                "full": "A fully fine-tuned model"}
METHOD_TAGS = {"lora": ("lora",), "dora": ("lora", "dora"), "rslora": ("lora", "rslora"), "ia3": ("ia3",),
               "prefix": ("prefix-tuning",), "prompt": ("prompt-tuning",), "full": ("full-fine-tuning",)}
RUN_METRICS = ("steps", "epochs", "train_examples", "dropped_too_long", "train_tokens", "seconds",
               "tokens_per_second", "final_loss", "eval_loss", "trainable_params", "total_params")


@dataclass(frozen=True)
class DataFile:
    """One data source the version trained or was evaluated on, as recorded."""

    split: str
    path: str  # as the spec names it (relative to the spec file)
    sha256: str
    rows_used: str
    license: str = NOT_DECLARED


@dataclass
class CardFacts:
    """Everything a card says, as recorded for one version (:func:`gather`)."""

    info: VersionInfo
    spec: Spec | None
    params: dict[str, str]  # the run's logged parameters (the spec flattened, device, search.best.*)
    run_metrics: dict[str, float]
    sources: list[DataFile]
    manifest: Manifest | None
    suite: EvalSuite | None
    audit: list[Entry] | None  # None: the trail could not be read (``audit_note`` says why)
    audit_note: str = ""
    generated_note: str | None = None  # set when the card is made for a version registered without one
    libraries: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dataset_id(self) -> str | None:
        return self.info.tags.get("tuneline.dataset_version")

    @property
    def base_ref(self) -> str:
        return self.info.tags.get("tuneline.base_model") or self.params.get("model", "")

    @property
    def base_name(self) -> str:
        """The base model as another machine names it (a hub id, never this machine's path)."""
        return portable_model_name(self.base_ref, _base_kind(self))

    @property
    def method(self) -> str:
        return self.params.get("train.method", self.spec.train.method if self.spec else "lora")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def card_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- gathering ------------------------------------------------------------------------------------

def gather(uri: str, workspace: Workspace, name: str, version: int, *, suite: EvalSuite | None = None,
           spec: Spec | None = None) -> CardFacts:
    """The facts of ``name`` version ``version``: its registry tags, its run's parameters, tags and
    metrics, the dataset version's manifest, the evaluation (``suite``, else the run's
    ``eval/report.json``), the spec (``spec``, else the run's ``spec/tuneline.yaml``) and the audit
    entries that mention the run, the dataset version or the version."""
    from mlflow import MlflowClient

    info = get_version(uri, name, version)
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics: dict[str, float] = {}
    if info.run_id:
        run = MlflowClient(tracking_uri=uri).get_run(info.run_id)
        params, tags, metrics = dict(run.data.params), dict(run.data.tags), dict(run.data.metrics)
        spec = spec or _run_spec(info.run_id)
        suite = suite or _run_suite(info.run_id)
    audit, note = _audit_entries(workspace, info)
    return CardFacts(
        info=info, spec=spec, params=params,
        run_metrics={k: v for k, v in metrics.items() if k in RUN_METRICS},
        sources=_sources(tags, spec, suite), manifest=_manifest(workspace, info), suite=suite, audit=audit, audit_note=note,
        libraries={k.removeprefix("tuneline.version."): v for k, v in sorted(tags.items())
                   if k.startswith("tuneline.version.")})


def _run_spec(run_id: str) -> Spec | None:
    """The spec the run logged (None when it is missing or no longer parses)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/spec/tuneline.yaml")
        return parse_spec(text, where=f"runs:/{run_id}/spec/tuneline.yaml")
    except (MlflowException, OSError, TunelineError):
        return None


def _run_suite(run_id: str) -> EvalSuite | None:
    """The run's evaluation (None when it was not evaluated)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return EvalSuite.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/eval/report.json"))
    except (MlflowException, OSError, KeyError, TypeError, ValueError):
        return None


def _sources(tags: dict[str, str], spec: Spec | None, suite: EvalSuite | None) -> list[DataFile]:
    """The run's data files, then the golden sets (with the hash they were evaluated at)."""
    out = []
    for split in ("train", "eval", "test", "validation"):
        if f"tuneline.data.{split}.sha256" in tags:
            source = getattr(spec.data, split, None) if spec else None
            declared = getattr(source, "license", None)
            out.append(DataFile(split, tags.get(f"tuneline.data.{split}.path", ""), tags[f"tuneline.data.{split}.sha256"],
                                tags.get(f"tuneline.data.{split}.rows_used", ""), declared or NOT_DECLARED))
    scored = {s.name: s for s in suite.sets if s.kind == "golden"} if suite else {}
    for golden in spec.eval.golden if spec else []:
        found = scored.get(golden.name)
        out.append(DataFile(f"golden {golden.name}", golden.path, found.sha256 or "" if found else "",
                            str(found.n) if found else "", golden.license or NOT_DECLARED))
    return out


def _manifest(workspace: Workspace, info: VersionInfo) -> Manifest | None:
    ds = info.tags.get("tuneline.dataset_version")
    path = workspace.datasets_dir / ds / "manifest.json" if ds else None
    if path is None or not path.is_file():
        return None
    manifest: Manifest = json.loads(path.read_text())
    return manifest


def _audit_entries(workspace: Workspace, info: VersionInfo) -> tuple[list[Entry] | None, str]:
    """The audit entries about the version's run, dataset version and the version itself."""
    ds = info.tags.get("tuneline.dataset_version")
    refs = [r for r in (info.run_id, ds, f"dataset:{ds}" if ds else None, f"{info.name}/{info.version}",
                        f"model:{info.name}/{info.version}") if r]
    try:
        trail = trail_of(workspace)
    except AuditError as exc:
        return None, f"the audit trail could not be read: {exc}"
    try:
        return trail.entries(refs=refs), ""
    except Exception as exc:  # noqa: BLE001  # the store's own errors (SQLAlchemy): the card says so, the run goes on
        return None, f"the audit trail could not be read: {type(exc).__name__}"
    finally:
        trail.close()


# --- rendering ------------------------------------------------------------------------------------

def render(facts: CardFacts) -> str:
    """The card: YAML metadata checked with huggingface_hub's parser, then the Markdown body."""
    text = f"---\n{metadata(facts).to_yaml()}\n---\n\n{body(facts)}"
    validate(text)
    return text


def metadata(facts: CardFacts) -> ModelCardData:
    """The card's metadata (``model-index`` through huggingface_hub's ``EvalResult``)."""
    from huggingface_hub import ModelCardData

    info, base = facts.info, facts.base_name
    hub_base = _is_hub_id(facts)
    task = facts.spec.task.type if facts.spec else facts.params.get("task.type", "")
    lic = declared_license(facts.base_ref)
    adapter = facts.method != "full"
    tags = ["tuneline", task, *METHOD_TAGS.get(facts.method, (facts.method,))]
    if hub_base:
        tags.append(f"base_model:{'adapter' if adapter else 'finetune'}:{base}")
    return ModelCardData(
        base_model=base if hub_base else None,
        library_name="peft" if adapter else "transformers",
        license=lic or "other", license_name=None if lic else "not-declared",
        datasets=[facts.dataset_id] if facts.dataset_id else None,
        tags=[t for t in tags if t], pipeline_tag="text-generation",
        model_name=f"{info.name} version {info.version}",
        eval_results=_eval_results(facts, task) or None,
        tuneline=_provenance(facts),
    )


def _is_hub_id(facts: CardFacts) -> bool:
    """Whether the base is named by a Hugging Face id (a built-in's, or a hub source's)."""
    kind = _base_kind(facts)
    builtin = BUILTIN_MODELS.get(facts.base_ref)
    return kind == "hub" or (kind == "builtin" and builtin is not None and builtin.hub_id is not None)


def _base_kind(facts: CardFacts) -> SourceKind:
    """The base's source kind, as its recorded fingerprint says (sha256: a file, dir: a folder, hub: an id)."""
    fingerprint = facts.info.tags.get("tuneline.base_model_fingerprint", "")
    if fingerprint.startswith("hub:"):
        return "hub"
    if fingerprint.startswith("dir:"):
        return "local"
    return "builtin" if facts.base_ref in BUILTIN_MODELS else "gguf"


def _provenance(facts: CardFacts) -> dict[str, object]:
    """tuneline's own metadata key: what identifies the version and what it came from."""
    tags = facts.info.tags
    out = {"model": facts.name, "version": facts.info.version, "run_id": facts.info.run_id,
           "dataset_version": facts.dataset_id, "spec_sha256": tags.get("tuneline.spec_sha256"),
           "adapter_sha256": tags.get("tuneline.adapter_sha256"), "base_model": facts.base_name,
           "base_model_fingerprint": tags.get("tuneline.base_model_fingerprint"),
           "gate_state": facts.info.gate_state, "code_version": tags.get("tuneline.code_version")}
    return {k: v for k, v in out.items() if v is not None}


def _eval_results(facts: CardFacts, task: str) -> list[EvalResult]:
    """One model-index result per metric of the candidate on the main evaluation set."""
    from huggingface_hub import EvalResult

    main = _main(facts.suite)
    cand = main.system("candidate") if main else None
    if main is None or cand is None:
        return []
    dataset = facts.dataset_id or f"{facts.name}-{main.name}"
    return [EvalResult(task_type=HF_TASKS.get(task, "text-generation"), task_name=task, dataset_type=dataset,
                       dataset_name=dataset, dataset_split=main.name, metric_type=metric,
                       metric_value=float(f"{est.value:.6g}"), metric_name=metric)
            for metric, est in cand.metrics.items()]


def _main(suite: EvalSuite | None) -> SetResult | None:
    return suite.main_set() if suite is not None and suite.sets else None


def validate(text: str) -> None:
    """Parse the card as Hugging Face model-card metadata (offline); raise if it is not valid."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    try:
        card = ModelCard(text)
        index = card.data.to_dict().get("model-index")
        if index is not None:
            model_index_to_eval_results(index)
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(Problem(f"the model card's metadata is not valid Hugging Face model-card metadata: {exc}",
                                    hint="this is a bug in tuneline's card writer; please report it")) from exc


def body(facts: CardFacts) -> str:
    """The Markdown body, one section per kind of fact."""
    info = facts.info
    head = [f"# {info.name} version {info.version}", "",
            f"{METHOD_NAMES.get(facts.method, f'A {facts.method} model')} trained and registered by "
            f"tuneline (registered {info.created}). Everything below is generated from what tuneline recorded "
            "for this version; nothing is filled in by hand."]
    if facts.generated_note:
        head += ["", f"> {facts.generated_note}"]
    sections = [_intended_use(facts), _base_model(facts), _data(facts), _recipe(facts), _evaluation(facts),
                _gates(facts), _baselines(facts), _forgetting_robustness(facts), _limitations(facts),
                _audit(facts), _provenance_section(facts)]
    return "\n".join(head) + "\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _intended_use(facts: CardFacts) -> str:
    spec = facts.spec
    if spec is None:
        return "## Intended use\n\nThe spec of this version's run was not found: its task is not known to the card."
    lines = ["## Intended use", "",
             f"- Use case: `{spec.name}`, task **{spec.task.type}**; intended for the task its spec defines and "
             "evaluated only on the data listed below."]
    if (prompt := spec.task.system_prompt()) is not None:
        lines.append(f"- Instruction (system prompt): {prompt!r}")
    if spec.task.type == "classification":
        labels = spec.task.labels or (facts.manifest["labels"] if facts.manifest else None) or []
        lines.append(f"- Labels ({len(labels)}): {', '.join(f'`{x}`' for x in labels) or NOT_DECLARED}")
    lines.append(f"- Objective: primary metric `{spec.objective.primary}`"
                 + (f"; thresholds {', '.join(f'`{t}`' for t in spec.objective.thresholds)}"
                    if spec.objective.thresholds else "; no thresholds (not gated)"))
    return "\n".join(lines)


def _base_model(facts: CardFacts) -> str:
    ref, kind = facts.base_ref, _base_kind(facts)
    named = {"builtin": f"tuneline's built-in `{ref}`", "hub": "a Hugging Face id",
             "local": "a model folder", "gguf": "a GGUF file"}[kind]
    if kind in ("local", "gguf") and Path(ref).expanduser().is_absolute():
        named += " (named by its last path part; the training machine's path is not shown)"
    fingerprint = facts.info.tags.get("tuneline.base_model_fingerprint", "not recorded")
    return "\n".join(["## Base model", "",
                      f"- Name: `{facts.base_name}`, from {named}",
                      f"- License: {declared_license(ref) or NOT_DECLARED}",
                      f"- Weights fingerprint: `{fingerprint}` (sha256: the model file; dir: its config and "
                      "weight files; hub: the id only)"])


def _data(facts: CardFacts) -> str:
    lines = ["## Training and evaluation data", ""]
    rows = [[s.split, f"`{s.path}`", f"`{s.sha256}`" if s.sha256 else "-", s.rows_used or "-", s.license]
            for s in facts.sources]
    lines.append(_table(["split", "file (as the spec names it)", "sha256", "rows used", "license"], rows)
                 if rows else "No data source was recorded for this version's run.")
    if any(s.license == NOT_DECLARED for s in facts.sources):
        lines += ["", "The spec does not declare the data's licenses: check them before sharing this model."]
    lines.append("")
    m = facts.manifest
    if facts.dataset_id is None:
        lines.append("Curation was off: the rows were used as read.")
    elif m is None:
        lines.append(f"Dataset version `{facts.dataset_id}` (its manifest is not in this workspace).")
    else:
        counts = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items() if v) or "none"
        dropped = ", ".join(f"{k} {v:,}" for k, v in m["dropped_by_reason"].items()) or "none"
        pii = ", ".join(f"{k} {v:,}" for k, v in m["pii_found"].items()) or "none"
        lines += [f"Curated dataset version `{facts.dataset_id}`:", "",
                  f"- Rows per split: {counts}",
                  f"- Curation steps: {' -> '.join(s['name'] for s in m.get('steps', [])) or 'none'}",
                  f"- Rows dropped ({m.get('rejected', 0):,}), by reason: {dropped}",
                  f"- PII found (per the curation's PII policy): {pii}",
                  f"- Conflicting answers for one input: {m.get('conflict_groups', 0):,} groups"]
    return "\n".join(lines)


def _recipe(facts: CardFacts) -> str:
    p, m = facts.params, facts.run_metrics
    if not p:
        return "## Training recipe\n\nThe run's parameters were not found."
    asked = [[f"train.{k}", p[f"train.{k}"]] for k in TRAIN_PARAMS if p.get(f"train.{k}") not in (None, "None")]
    searched = [[f"search chose {k.removeprefix('search.best.')}", v] for k, v in sorted(p.items())
                if k.startswith("search.best.")]
    compute = [[f"computed with: {k}", p[k]] for k in ("device", "precision") if k in p]
    trained = [[f"trained: {k}", _num(m[k])] for k in RUN_METRICS if k in m]
    return "## Training recipe\n\n" + _table(["setting", "value"], asked + searched + compute + trained)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def _evaluation(facts: CardFacts) -> str:
    suite = facts.suite
    if suite is None or not suite.sets:
        return "## Evaluation\n\nThis version was not evaluated."
    parts = ["## Evaluation", "",
             f"Primary metric `{suite.primary}`; values with their 95% bootstrap intervals, every system scored "
             "on the same items with the same prompts."]
    for s in suite.sets:
        found = [r for r in (s.system(x) for x in ("candidate", "base", "production")) if r is not None]
        systems = [r.name for r in found]
        metrics = list(dict.fromkeys(k for r in found for k in r.metrics))
        rows = [[k, *(_est(s, x, k) for x in systems)] for k in metrics]
        parts += ["", f"### {s.name} ({s.kind}, {s.n} items" + (f", golden version {s.version}" if s.version else "")
                  + ")", "", _table(["metric", *systems], rows)]
        comps = [[f"{c.a} - {c.b}", c.metric, c.diff.fmt(), f"{c.p_value:.3g}", c.test,
                  "yes" if c.significant else "no"] for c in s.comparisons]
        if comps:
            parts += ["", _table(["paired comparison", "metric", "difference [95% CI]", "p", "test",
                                  "significant"], comps)]
    return "\n".join(parts)


def _est(s: SetResult, system: str, metric: str) -> str:
    res = s.system(system)
    est = res.metrics.get(metric) if res else None
    return est.fmt() if est is not None else "-"


def _gates(facts: CardFacts) -> str:
    info, suite = facts.info, facts.suite
    lines = ["## Gates", "", f"State: **{info.describe_gates()}** (under the spec this version was trained with)."]
    if suite is not None and suite.gates:
        rows = [[f"`{g.expr}`", "-" if g.observed is None else f"{g.observed:.4g}", f"{g.threshold:g}",
                 "passed" if g.passed else "FAILED", "-" if g.margin is None else f"{g.margin:+.4g}", g.note or ""]
                for g in suite.gates]
        lines += ["", _table(["gate", "observed", "threshold", "result", "margin", "note"], rows)]
    for r in info.reevaluations:
        lines.append(f"- Re-evaluated {r['at']} under another spec ({r['spec_sha256'][:12]}): {r['gate_state']}; "
                     "not counted for promotion.")
    return "\n".join(lines)


def _baselines(facts: CardFacts) -> str:
    b = (facts.suite.baselines if facts.suite else None) or None
    if not b:
        return "## Baseline comparison\n\nThe cheaper options (prompting, few-shot, retrieval, embeddings) were not measured."
    rows = []
    for o in b.get("options", []):
        est = o.get("metrics", {}).get(b.get("metric", ""))
        vs = o.get("vs_best")
        rows.append([o["name"], o.get("description", ""), o.get("skipped") and f"skipped: {o['skipped']}"
                     or (_fmt_est(est) if est else "-"), _fmt_est(vs) if vs else "-"])
    lines = ["## Baseline comparison", "",
             f"Measured on {b.get('set')} ({b.get('n')} items), metric `{b.get('metric')}`.", "",
             _table(["option", "what it is", b.get("metric", "metric"), "vs best"], rows), "",
             f"Best: {b.get('best') or '-'}; recommended: **{b.get('recommended') or '-'}**."]
    lines += [f"- {r}" for r in b.get("reasons", [])]
    return "\n".join(lines)


def _fmt_est(d: dict[str, float | None]) -> str:
    value, low, high = d.get("value"), d.get("low"), d.get("high")
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def _forgetting_robustness(facts: CardFacts) -> str:
    suite = facts.suite
    lines = ["## Forgetting and robustness", ""]
    f = suite.forgetting if suite else None
    lines.append(f"- Forgetting (general-ability probe, {f.n} questions): base {f.base.fmt()}, candidate "
                 f"{f.candidate.fmt()}, drop {f.drop:+.3f}" if f else "- Forgetting: not measured")
    r = suite.robustness if suite else None
    if r is None:
        lines.append("- Robustness: not measured")
    else:
        lines.append(f"- Robustness on {r.set} ({r.n} items), `{r.metric}` clean {r.clean:.3f}:")
        lines += [f"  - {k}: {p.value:.3f} (drop {p.drop:+.3f})" for k, p in r.perturbations.items()]
    return "\n".join(lines)


def limitations(facts: CardFacts) -> list[str]:
    """Known limitations, each derived from a recorded fact."""
    out: list[str] = []
    main = _main(facts.suite)
    if main is None:
        out.append("Not evaluated: nothing is known about its quality.")
    else:
        out += _overlaps(main)
        if main.n < SMALL_EVAL:
            out.append(f"Small evaluation set: {main.n} items on `{main.name}` (fewer than {SMALL_EVAL}); the "
                       "intervals above are wide.")
    if facts.info.gate_state == GATE_FAILED:
        out.append(f"Gates failed: {facts.info.gates_failed or 'see the gates above'}.")
    elif facts.info.gate_state == GATE_NOT_EVALUATED:
        out.append("Gates not evaluated.")
    suite = facts.suite
    if suite is not None and suite.robustness is not None:
        worse = [f"{k} ({p.drop:+.3f})" for k, p in suite.robustness.perturbations.items() if p.drop > 0]
        if worse:
            out.append(f"`{suite.robustness.metric}` drops under perturbation: {', '.join(worse)}.")
    if suite is not None and suite.forgetting is not None and suite.forgetting.drop > 0:
        out.append(f"Forgets general ability: the probe's score drops by {suite.forgetting.drop:.3f}.")
    if suite is not None and suite.baselines and suite.baselines.get("recommended") not in (None, "fine_tuned",
                                                                                         "hybrid"):
        out.append(f"The baseline comparison recommends `{suite.baselines['recommended']}` over fine-tuning.")
    undeclared = [s.split for s in facts.sources if s.license == NOT_DECLARED]
    if undeclared:
        out.append(f"Data licenses not declared ({', '.join(undeclared)}).")
    if declared_license(facts.base_ref) is None:
        out.append("The base model's license is not declared to tuneline.")
    return out


def _overlaps(main: SetResult) -> list[str]:
    """Metrics whose candidate interval overlaps the base model's: not shown to differ from the base."""
    cand, base = main.system("candidate"), main.system("base")
    if cand is None or base is None:
        return ["The base model was not scored: the gain from fine-tuning is not measured."]
    same = []
    for k, c in cand.metrics.items():
        b = base.metrics.get(k)
        if b is None or None in (c.low, c.high, b.low, b.high):
            continue
        assert c.low is not None and c.high is not None and b.low is not None and b.high is not None
        if c.low <= b.high and b.low <= c.high and not (c.low == c.high == b.low == b.high):
            same.append(k)
    if not same:
        return []
    return [f"On `{main.name}` the candidate's 95% interval overlaps the base model's for "
            f"{', '.join(f'`{k}`' for k in same)}: not shown to differ from the untuned base."]


def _limitations(facts: CardFacts) -> str:
    found = limitations(facts)
    return "## Known limitations\n\n" + ("\n".join(f"- {x}" for x in found) if found else "- None found in the recorded facts.")


def _audit(facts: CardFacts) -> str:
    if facts.audit is None:
        return f"## Audit trail\n\n{facts.audit_note}"
    if not facts.audit:
        return "## Audit trail\n\nNo audit entry mentions this version, its run or its dataset version."
    rows = [[str(e.seq), e.at, e.actor, e.action, e.result, f"`{e.hash}`"] for e in facts.audit]
    return ("## Audit trail\n\nThe entries that mention this version, its run or its dataset version, when the card "
            "was written (`tuneline audit verify` checks the chain; `tuneline audit log` shows later ones).\n\n"
            + _table(["seq", "time", "actor", "action", "result", "entry hash"], rows))


def _provenance_section(facts: CardFacts) -> str:
    t = facts.info.tags
    rows = [["model version", f"{facts.name}/{facts.info.version}"], ["MLflow run", facts.info.run_id or "-"],
            ["spec sha256", t.get("tuneline.spec_sha256", "-")], ["adapter sha256", t.get("tuneline.adapter_sha256", "-")
                                                                    + " (the folder without this README.md)"],
            ["code", t.get("tuneline.code_version", "-")],
            *[[lib, v] for lib, v in facts.libraries.items() if lib in ("torch", "transformers", "peft", "tuneline")]]
    return "## Provenance\n\n" + _table(["what", "value"], rows)


# --- storing and reading --------------------------------------------------------------------------

def stored_card(info: VersionInfo, dest: Path) -> str | None:
    """The card stored with a version (``adapter/README.md`` of its source), or None when the
    version has none (registered before cards existed: its README.md, if any, is PEFT's template)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if CARD_SHA_TAG not in info.tags:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{info.source.rstrip('/')}/README.md",
                                                   dst_path=str(dest))
    except (MlflowException, OSError):
        return None
    return Path(path).read_text(encoding="utf-8")
