"""Typed models of ``tuneline.yaml``.

Every model forbids unknown fields, so a typo is an error with the field path and line, never a
silently ignored setting. Components are named by registered names (``lora``, ``smollm2-135m``),
never by import paths: a spec file cannot run code.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskType = Literal["classification", "instruction", "chat"]
FileFormat = Literal["jsonl", "csv", "parquet"]

# Metrics each task type can report; objective thresholds must name one of these.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "instruction": ("rouge_l", "bleu"),
    "chat": ("rouge_l", "bleu"),
}

# Logical columns each task type reads, and which of them must be present.
TASK_COLUMNS: dict[str, dict[str, bool]] = {
    "classification": {"text": True, "label": True},
    "instruction": {"instruction": True, "input": False, "response": True},
    "chat": {"messages": True},
}

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_THRESHOLD_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(>=|<=|>|<)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Threshold(_Model):
    """A success criterion such as ``accuracy >= 0.85``."""

    metric: str
    op: Literal[">=", ">", "<=", "<"]
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        m = _THRESHOLD_RE.match(text)
        if not m:
            raise ValueError(
                f"cannot read threshold {text!r}; write it as 'metric >= value', e.g. 'accuracy >= 0.85'"
            )
        return cls(metric=m.group(1), op=m.group(2), value=float(m.group(3)))  # type: ignore[arg-type]

    def check(self, observed: float) -> bool:
        return bool(_OPS[self.op](observed, self.value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class TaskSpec(_Model):
    type: TaskType = Field(description="What the model must do.")
    labels: list[str] | None = Field(
        default=None,
        description="Classification label set; inferred from the training data when omitted.",
    )
    instruction: str | None = Field(
        default=None,
        description="System prompt given with every example (e.g. what to classify and how to answer).",
    )

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
    max_rows: int = Field(gt=0, description="Keep at most this many rows.")
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
    exact: bool = Field(default=True, description="Drop rows whose normalized text repeats an earlier row.")
    near: bool = Field(default=True, description="Drop near-duplicates (MinHash LSH on word shingles).")
    threshold: float = Field(default=0.8, gt=0, le=1, description="Estimated Jaccard similarity for near-duplicates.")
    num_perm: int = Field(default=128, ge=16, le=512, description="MinHash permutations.")
    shingle: int = Field(default=3, ge=1, le=10, description="Words per shingle.")
    conflicts: Literal["drop", "keep_first", "warn"] = Field(
        default="drop", description="Same input, different answers: drop them all (default), keep the first, or warn.")


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
    validation: float = Field(default=0.1, ge=0, lt=1, description="Share carved out when data.eval is absent.")
    test: float = Field(default=0.1, ge=0, lt=1, description="Share carved out when data.test is absent.")
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
    checkpoint_every: int = Field(default=200, gt=0, description="Save a resumable checkpoint every N steps.")
    log_every: int = Field(default=10, gt=0, description="Log a progress line every N steps when output is not a terminal.")


class EvalSpec(_Model):
    batch_size: int = Field(default=32, gt=0)
    max_new_tokens: int = Field(default=24, gt=0)
    compare_base: bool = Field(default=True, description="Also evaluate the untuned base model.")
    constrain_to_labels: bool = Field(
        default=True,
        description="Classification: decoding may only produce one of the labels (the model picks which), "
                    "for the base and the tuned model alike. Off: free generation; an answer that is not a "
                    "label counts as wrong (reported as invalid_label_rate).")


class TrackingSpec(_Model):
    uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: SQLite store in the workspace."
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; default: the spec name.")


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
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        problems: list[str] = []
        metrics = TASK_METRICS[self.task.type]
        if self.objective.primary not in metrics:
            problems.append(
                f"objective.primary {self.objective.primary!r} is not reported for task "
                f"{self.task.type!r}; choose one of {list(metrics)}"
            )
        for t in self.objective.parsed_thresholds():
            if t.metric not in metrics:
                problems.append(
                    f"objective.thresholds: metric {t.metric!r} is not reported for task "
                    f"{self.task.type!r}; choose one of {list(metrics)}"
                )
        known = TASK_COLUMNS[self.task.type]
        for split in ("train", "eval", "test"):
            src: DataSource | None = getattr(self.data, split)
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
        if problems:
            raise ValueError("; ".join(problems))
        return self
