"""The spec's ``monitor:`` section: what ``tuneline monitor check`` compares, when a detector
fires, where alerts go, how feedback becomes data and when a retrained model ships by itself.

Every detector compares a *reference window* (the serving version's training data, from its
dataset version) with a *current window* (the last ``window.requests`` logged requests, or those
of the last ``window.hours``). The defaults are chosen not to cry wolf: a statistical detector
fires only when its test is significant at ``p_value`` *and* its effect size passes its own
threshold, so a large window cannot turn a negligible shift into an alert; a rate detector fires
only when the lower end of its 95% interval is above its threshold; and a window with fewer than
``min_requests`` requests reports "not enough data" instead of a verdict.

``retention`` says how long the request log keeps the model's rows; ``tuneline monitor prune``
enforces it (nothing is pruned while it is unset: the default keeps every row).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowSpec(_Section):
    requests: int = Field(default=500, gt=0, description="Current window: the last this many requests.")
    hours: float | None = Field(
        default=None, gt=0, description="Current window: only requests of the last this many hours (with "
                                        "`requests`, whichever holds fewer).")
    min_requests: int = Field(
        default=50, gt=0, description="Fewest requests for a verdict; fewer: the detector reports "
                                      "'not enough data' and never fires.")
    reference_rows: int = Field(
        default=2000, gt=0, description="Training rows sampled (seeded) as the reference window.")
    seed: int = 0


class InputDriftSpec(_Section):
    enabled: bool = True
    method: Literal["mmd", "classifier"] = Field(
        default="classifier",
        description="Embedding shift test: classifier (a domain classifier's ROC AUC on held-out rows, exact "
                    "Mann-Whitney p-value) or mmd (maximum mean discrepancy, permutation p-value). docs/monitoring.md "
                    "compares both with Evidently's methods.")
    encoder: str = Field(
        default="all-minilm-l6-v2",
        description="Sentence encoder of the embedding test: all-minilm-l6-v2 (shipped, offline) or a "
                    "sentence-transformers folder.")
    p_value: float = Field(default=0.001, gt=0, lt=1, description="Significance of every input test.")
    permutations: int = Field(default=2000, ge=50, le=20_000,
                              description="mmd: permutations of the p-value (at least 2 / p_value - 1).")
    min_effect: float = Field(
        default=0.05, ge=0,
        description="Smallest effect that fires: AUC - 0.5 for classifier; MMD^2 for mmd (0.05 misses topic "
                    "shifts inside one domain, which measure 0.01-0.015; 0.01 catches them).")
    length_min_effect: float = Field(
        default=0.15, ge=0, le=1, description="Input length: smallest Kolmogorov-Smirnov distance that fires.")
    oov_min_increase: float = Field(
        default=0.1, ge=0, le=1,
        description="Out-of-vocabulary words: smallest rise of the share of words unseen in training that fires.")


class OutputDriftSpec(_Section):
    enabled: bool = True
    p_value: float = Field(default=0.001, gt=0, lt=1, description="Significance of every output test.")
    labels_min_effect: float = Field(
        default=0.15, ge=0, le=1,
        description="Classification: smallest Cramér's V between reference and predicted label counts that fires.")
    length_min_effect: float = Field(
        default=0.15, ge=0, le=1, description="Generation: smallest KS distance of answer lengths that fires.")
    refusal_max_increase: float = Field(
        default=0.1, ge=0, le=1, description="Generation: rise of the refusal rate (95% lower bound) that fires.")
    truncated_max_rate: float = Field(
        default=0.2, ge=0, le=1,
        description="Generation: share of answers cut by the token limit (not stopped), 95% lower bound, that fires.")


class QualityDriftSpec(_Section):
    enabled: bool = True
    negative_feedback_max: float = Field(
        default=0.2, ge=0, le=1,
        description="Share of rated answers rated negative above which (95% lower bound) the detector fires.")
    correction_max: float = Field(
        default=0.1, ge=0, le=1,
        description="Share of answers with feedback that carry a correction above which (95% lower bound) it fires.")
    min_feedback: int = Field(default=20, gt=0, description="Fewest feedback entries for a verdict.")


class OperationsSpec(_Section):
    enabled: bool = True
    latency_p95_ms: float | None = Field(
        default=None, gt=0, description="p95 latency (ms) above which the detector fires; none: reported only.")
    latency_p99_ms: float | None = Field(
        default=None, gt=0, description="p99 latency (ms) above which the detector fires; none: reported only.")
    error_rate_max: float = Field(
        default=0.05, ge=0, le=1, description="Share of requests answered 5xx or past their deadline "
                                              "(95% lower bound) that fires.")
    shed_rate_max: float = Field(
        default=0.05, ge=0, le=1, description="Share of requests refused as overload (429, 95% lower bound) that fires.")
    tokens_per_request_max: float | None = Field(
        default=None, gt=0, description="Mean prompt + completion tokens per request that fires; none: reported only.")


class LogSink(_Section):
    # the discriminator has no default: a spec written back without defaults still names the sink
    type: Literal["log"]


class WebhookSink(_Section):
    type: Literal["webhook"]
    url: str = Field(description="Alerts are POSTed here as JSON (one request per alert).")
    token_env: str | None = Field(
        default=None, description="Environment variable holding a bearer token sent with each alert (the "
                                  "token itself never goes in the spec).")
    timeout_s: float = Field(default=5.0, gt=0)


Sink = Annotated[LogSink | WebhookSink, Field(discriminator="type")]


def _log_only() -> list[Sink]:
    return [LogSink(type="log")]


class AlertsSpec(_Section):
    sinks: list[Sink] = Field(default_factory=_log_only,
                              description="Where alerts go: log (stderr), webhook.")


class FeedbackSpec(_Section):
    corrections: bool = Field(default=True, description="A correction becomes a training row (its answer).")
    accepted_as_positive: bool = Field(
        default=False, description="An answer rated positive without a correction becomes a training row too.")
    min_positive_rating: int = Field(default=1, description="Ratings at or above this count as positive.")
    max_negative_rating: int = Field(default=-1, description="Ratings at or below this count as negative.")


class RetrainSpec(_Section):
    auto_promote: bool = Field(
        default=False, description="Promote a retrained candidate whose every gate passed without a person; "
                                   "otherwise it waits for `tuneline promote`.")
    min_new_rows: int = Field(default=1, gt=0, description="Retrain only with at least this many harvested rows.")


DAY_SECONDS = 86_400.0


def _days(what: str) -> float | None:
    return Field(default=None, gt=0, allow_inf_nan=False,
                 description=f"Days {what} are kept; older ones are deleted by `tuneline monitor prune`. "
                             "None (the default): kept for ever.")


class RetentionSpec(_Section):
    """How long ``tuneline monitor prune`` keeps the model's rows of the request log. Unset
    (None): kept for ever, the default: deleting logged traffic is the operator's decision, and
    the log is the monitor's window, the feedback harvest's prompts and, once gone, cannot come
    back. A request with feedback that is still kept is kept too (however old): the feedback
    would lose its prompt, and harvesting a correction needs the prompt."""

    requests_days: float | None = _days("logged requests (prompt, response, latency, status)")
    feedback_days: float | None = _days("ratings and corrections (the request they rate stays while they do)")
    checks_days: float | None = _days(
        "stored `monitor check` results and the alerts sent (the latest check of the model always stays)")

    @property
    def enabled(self) -> bool:
        """Whether anything is ever pruned."""
        return any(v is not None for v in (self.requests_days, self.feedback_days, self.checks_days))

    def applied(self) -> dict[str, float | None]:
        """The retention as set (days; None: kept for ever)."""
        return {"requests_days": self.requests_days, "feedback_days": self.feedback_days,
                "checks_days": self.checks_days}


class MonitorSpec(_Section):
    """What ``tuneline monitor check`` watches and what it does when something moves."""

    window: WindowSpec = Field(default_factory=WindowSpec)
    input: InputDriftSpec = Field(default_factory=InputDriftSpec)
    output: OutputDriftSpec = Field(default_factory=OutputDriftSpec)
    quality: QualityDriftSpec = Field(default_factory=QualityDriftSpec)
    operations: OperationsSpec = Field(default_factory=OperationsSpec)
    alerts: AlertsSpec = Field(default_factory=AlertsSpec)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)
    retention: RetentionSpec = Field(default_factory=RetentionSpec)

    @model_validator(mode="after")
    def _window_fits(self) -> MonitorSpec:
        cfg = self.input
        if cfg.method == "mmd" and cfg.permutations < math.ceil(2 / cfg.p_value) - 1:
            raise ValueError(f"monitor.input.permutations ({cfg.permutations}) cannot give a p-value below "
                             f"monitor.input.p_value ({cfg.p_value}): a permutation p-value is at least "
                             f"1 / (permutations + 1); use at least {math.ceil(2 / cfg.p_value) - 1} permutations")
        if self.window.min_requests > self.window.requests:
            raise ValueError(f"monitor.window.min_requests ({self.window.min_requests}) is more than "
                             f"monitor.window.requests ({self.window.requests}): no window could give a verdict")
        self._retention_covers_window()
        return self

    def _retention_covers_window(self) -> None:
        """A window of ``window.hours`` needs its requests and their feedback kept that long."""
        hours = self.window.hours
        for name in ("requests_days", "feedback_days"):
            days = getattr(self.retention, name)
            if hours is not None and days is not None and days * 24 < hours:
                raise ValueError(f"monitor.retention.{name} ({days:g} days) keeps less than monitor.window.hours "
                                 f"({hours:g} hours): the monitor's window would lose rows to pruning; keep them "
                                 f"at least {hours / 24:g} days or shorten the window")
