"""Alerts: what a fired detector sends, where it goes, and how a second check over the same
requests stays quiet.

- :func:`alert_payload` turns one fired :class:`~tuneline.monitor.results.DetectorResult` of a
  :class:`~tuneline.monitor.results.CheckResult` into the JSON object a webhook receives (stable
  keys; never a secret).
- Sinks (:class:`AlertSink`): :class:`LogAlertSink` writes one warning line per alert to the
  ``tuneline.monitor`` logger; :class:`WebhookAlertSink` POSTs the payload as JSON, with a bearer
  token read from the environment variable the spec names, and retries a failed delivery a couple
  of times with a short backoff. :func:`build_sinks` makes them from the spec's ``monitor.alerts``.
- :func:`send_alerts` deduplicates through an :class:`AlertLedger` (the monitor store): one alert
  per model, detector and window, where two windows that overlap count as the same window.

Ordering, so that an alert is neither lost nor sent twice by two checks running at once: the
alert is *claimed* in the ledger first (only one check wins), then sent to every sink; when any
sink failed, the claim is *released* again so that the next check retries (delivery is
at least once per sink: a sink that did receive it may get it again on the retry, which is better
than a webhook that never hears of the drift because the log line went out).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from tuneline.errors import Problem, TunelineError
from tuneline.monitor.results import CheckResult, DetectorResult
from tuneline.spec.monitor import AlertsSpec, LogSink, WebhookSink

LOGGER_NAME = "tuneline.monitor"
EVENT = "tuneline.monitor.alert"
PAYLOAD_VERSION = 1
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})  # worth another try; other 4xx are not

log = logging.getLogger(LOGGER_NAME)

JSONScalar = str | int | float | bool | None


class AlertLedger(Protocol):
    """Where sent alerts are recorded (the monitor store implements it)."""

    def claim_alert(self, model: str, detector: str, window_start: float, window_end: float,
                    payload: str) -> bool:
        """Record an alert for ``(model, detector)`` over ``[window_start, window_end]``; True the
        first time, False when one whose window overlaps this one is recorded already."""
        ...

    def release_alert(self, model: str, detector: str, window_start: float) -> None:
        """Forget the alert claimed for ``(model, detector)`` with this ``window_start`` (its
        delivery failed), so that the next check claims and sends it again."""
        ...


@dataclass(frozen=True)
class Alert:
    """One fired detector of one check: the webhook's JSON body (:meth:`to_dict`)."""

    model: str
    version: int | None
    dataset_version: str | None
    detector: str
    group: str
    value: float | None
    threshold: float | None
    p_value: float | None
    detail: str
    window_start: float
    window_end: float
    window_requests: int
    checked_at: float
    n_reference: int = 0
    n_current: int = 0
    extra: dict[str, JSONScalar] = field(default_factory=dict)

    @classmethod
    def of(cls, check: CheckResult, result: DetectorResult) -> Alert:
        return cls(model=check.model, version=check.version, dataset_version=check.dataset_version,
                   detector=result.name, group=result.group, value=_finite(result.value),
                   threshold=_finite(result.threshold), p_value=_finite(result.p_value),
                   detail=result.detail, window_start=check.window.start, window_end=check.window.end,
                   window_requests=check.window.requests, checked_at=check.at,
                   n_reference=result.n_reference, n_current=result.n_current,
                   extra={k: _finite(v) if isinstance(v, float) else v for k, v in result.extra.items()})

    def text(self) -> str:
        """One line a person reads (the log line, and ``text`` in the payload for chat webhooks)."""
        version = f" v{self.version}" if self.version is not None else " (base model)"
        p = f", p={self.p_value:.3g}" if self.p_value is not None else ""
        return (f"tuneline alert: {self.model}{version}: {self.detector} = {_fmt(self.value)} "
                f"above its threshold {_fmt(self.threshold)}{p} over {self.window_requests} requests "
                f"({_iso(self.window_start)} .. {_iso(self.window_end)}): {self.detail}")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"event": EVENT, "payload_version": PAYLOAD_VERSION}
        out.update(asdict(self))
        out["checked_at_utc"] = _iso(self.checked_at)
        out["text"] = self.text()
        return out


def alert_payload(check: CheckResult, result: DetectorResult) -> dict[str, object]:
    """The JSON object sent for ``result`` (a fired detector of ``check``). Keys, always present:
    ``event``, ``payload_version``, ``model``, ``version``, ``dataset_version``, ``detector``,
    ``group``, ``value``, ``threshold``, ``p_value``, ``detail``, ``window_start``, ``window_end``
    (Unix seconds), ``window_requests``, ``checked_at``, ``n_reference``, ``n_current``, ``extra``,
    ``checked_at_utc`` (ISO 8601) and ``text`` (one readable line). Non-finite numbers are null."""
    return Alert.of(check, result).to_dict()


# --- sinks -----------------------------------------------------------------------------------------

class DeliveryError(Exception):
    """A sink could not deliver an alert (after its retries)."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class AlertSink(Protocol):
    """Sends one alert payload somewhere; raises :class:`DeliveryError` when it could not."""

    @property
    def name(self) -> str: ...

    def send(self, payload: Mapping[str, object]) -> int:
        """Deliver ``payload``; return the number of attempts it took."""
        ...


class LogAlertSink:
    """One ``WARNING`` line per alert on the ``tuneline.monitor`` logger (stderr by default)."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or log

    def send(self, payload: Mapping[str, object]) -> int:
        self.logger.warning("%s", payload.get("text") or json.dumps(payload, sort_keys=True))
        return 1


@dataclass
class WebhookAlertSink:
    """POSTs each alert as JSON to ``url`` (``Authorization: Bearer <token>`` when a token is
    given), waiting at most ``timeout_s`` per attempt. A connection error, a timeout, 408, 425, 429
    or a 5xx answer is retried ``retries`` times, ``backoff_s`` apart (doubling); another 4xx is
    not (the request itself is wrong: a bad token, a wrong path)."""

    url: str
    token: str | None = None
    timeout_s: float = 5.0
    retries: int = 2
    backoff_s: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    @property
    def name(self) -> str:
        return f"webhook {redact_url(self.url)}"

    def send(self, payload: Mapping[str, object]) -> int:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        delay = self.backoff_s
        attempts = 1 + max(0, self.retries)
        for attempt in range(1, attempts + 1):
            error, retry = self._post(body)
            if error is None:
                return attempt
            if not retry or attempt == attempts:
                raise DeliveryError(f"{self.name}: {error} (after {attempt} attempt{'s' * (attempt > 1)})",
                                    attempts=attempt)
            log.info("%s: %s; retrying in %.1f s", self.name, error, delay)
            self.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, body: bytes) -> tuple[str | None, bool]:
        """One attempt: (None, _) when delivered, else (what went wrong, whether to retry)."""
        headers = {"Content-Type": "application/json", "User-Agent": "tuneline-monitor"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # the URL is the spec's
                response.read()
        except urllib.error.HTTPError as e:
            e.close()
            return f"answered HTTP {e.code} {e.reason}", e.code in RETRY_STATUSES
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            return f"not reachable ({reason})", True
        return None, False


def redact_url(url: str) -> str:
    """``url`` without its path, query and credentials (webhook URLs often carry a secret in
    their path): what logs and error messages show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..." if parts.path not in ("", "/") else f"{parts.scheme}://{host}{port}"


def build_sinks(spec: AlertsSpec, env: Mapping[str, str] | None = None) -> list[AlertSink]:
    """The sinks of the spec's ``monitor.alerts``; a webhook's ``token_env`` is read from ``env``
    (default: the process environment) now, so a missing variable stops the check before any alert
    is claimed."""
    environ = os.environ if env is None else env
    sinks: list[AlertSink] = []
    for i, sink in enumerate(spec.sinks):
        if isinstance(sink, LogSink):
            sinks.append(LogAlertSink())
        elif isinstance(sink, WebhookSink):
            sinks.append(WebhookAlertSink(url=sink.url, token=_token(sink, i, environ), timeout_s=sink.timeout_s))
    return sinks


def _token(sink: WebhookSink, index: int, env: Mapping[str, str]) -> str | None:
    if sink.token_env is None:
        return None
    token = env.get(sink.token_env)
    if not token:
        raise TunelineError(Problem(
            f"the webhook alert sink {redact_url(sink.url)} takes its bearer token from the environment "
            f"variable {sink.token_env}, which is {'empty' if token == '' else 'not set'}",
            field=f"monitor.alerts.sinks[{index}].token_env",
            hint=f"export {sink.token_env}=<token> before `tuneline monitor check`, or remove token_env "
                 "if the receiver needs no token"))
    return token


# --- sending ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    """One alert to one sink."""

    detector: str
    sink: str
    ok: bool
    attempts: int
    error: str | None = None


@dataclass
class AlertOutcome:
    """What :func:`send_alerts` did with a check's fired detectors (names): ``sent`` (delivered
    to every sink), ``deduplicated`` (already alerted for an overlapping window: nothing sent),
    ``failed`` (some sink failed after its retries: the claim was released, the next check sends
    it again), and every single delivery."""

    sent: list[str] = field(default_factory=list)
    deduplicated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No delivery failed."""
        return not self.failed

    def per_sink(self) -> dict[str, dict[str, list[str]]]:
        """``{sink: {"sent": [detector, ...], "failed": [...]}}``."""
        out: dict[str, dict[str, list[str]]] = {}
        for d in self.deliveries:
            out.setdefault(d.sink, {"sent": [], "failed": []})["sent" if d.ok else "failed"].append(d.detector)
        return out

    def lines(self) -> list[str]:
        """What the CLI prints under the check's table: one line per kind, then each failure."""
        out = []
        for label, names in (("sent", self.sent), ("already sent for this window", self.deduplicated),
                             ("NOT delivered (retried at the next check)", self.failed)):
            if names:
                out.append(f"alerts {label}: {', '.join(names)}")
        out += [f"  {d.detector} -> {d.error}" for d in self.deliveries if not d.ok]
        return out

    def to_dict(self) -> dict[str, object]:
        return {"sent": self.sent, "deduplicated": self.deduplicated, "failed": self.failed,
                "deliveries": [asdict(d) for d in self.deliveries]}


def send_alerts(check: CheckResult, sinks: Sequence[AlertSink], ledger: AlertLedger) -> AlertOutcome:
    """Send one alert per fired detector of ``check`` to every sink, unless the ledger already
    holds one for that detector over an overlapping window. A sink that fails does not stop the
    others; when any failed, the claim is released so that the next check sends it again."""
    outcome = AlertOutcome()
    for result in check.fired:
        payload = alert_payload(check, result)
        text = json.dumps(payload, allow_nan=False)
        if not ledger.claim_alert(check.model, result.name, check.window.start, check.window.end, text):
            outcome.deduplicated.append(result.name)
            continue
        deliveries = [_deliver(sink, result.name, payload) for sink in sinks]
        outcome.deliveries.extend(deliveries)
        if all(d.ok for d in deliveries):
            outcome.sent.append(result.name)
        else:
            ledger.release_alert(check.model, result.name, check.window.start)
            outcome.failed.append(result.name)
    return outcome


def _deliver(sink: AlertSink, detector: str, payload: Mapping[str, object]) -> Delivery:
    try:
        attempts = sink.send(payload)
    except DeliveryError as e:
        log.error("alert %s not delivered: %s; the next check retries it", detector, e)
        return Delivery(detector=detector, sink=sink.name, ok=False, attempts=e.attempts, error=str(e))
    except Exception as e:  # a sink's own bug must not keep the alert from the other sinks
        log.exception("alert %s: sink %s failed", detector, sink.name)
        return Delivery(detector=detector, sink=sink.name, ok=False, attempts=1, error=f"{sink.name}: {e!r}")
    return Delivery(detector=detector, sink=sink.name, ok=True, attempts=attempts)


# --- formatting ------------------------------------------------------------------------------------

def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
