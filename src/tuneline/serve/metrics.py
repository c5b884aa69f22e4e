"""Prometheus metrics of one server (``/metrics``): responses by endpoint, model and status,
latency, time to first token, batch sizes, tokens, requests in flight, queue depth, the request
log's rows, and the monitor's last check of each model (its detectors' values, thresholds and
alerts, read from the store). Each app has its own registry, so several apps in one process do
not share counts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneline.monitor.results import CheckResult
from tuneline.monitor.store import RequestLog, RequestLogError
from tuneline.serve.engine import Engine

log = logging.getLogger("tuneline.serve")

LOG_STATES = ("queued", "in_spool", "held", "written", "spooled", "db_errors")
MONITOR_CACHE_S = 5.0  # how long /metrics reuses the checks it read from the store


class ServerMetrics:
    def __init__(self, engine: Engine, request_log: RequestLog, in_flight: Callable[[], int],
                 monitor_cache_s: float = MONITOR_CACHE_S) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tuneline_requests_total", "Responses by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("tuneline_request_latency_seconds", "Request latency", ["endpoint", "model"],
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("tuneline_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token", ["endpoint", "model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.batch_rows = Histogram("tuneline_batch_size", "Rows per generate call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("tuneline_tokens_total", "Tokens by kind", ["model", "kind"], registry=r)
        self.log_failures = Counter("tuneline_request_log_failures_total", "Request log writes that raised",
                                    registry=r)
        Gauge("tuneline_requests_in_flight", "Requests admitted and not yet answered", registry=r
              ).set_function(in_flight)
        Gauge("tuneline_queue_depth", "Requests waiting for the model", registry=r).set_function(engine.waiting)
        log_rows = Gauge("tuneline_request_log_rows", "Request log: rows queued, in_spool (in the fallback file "
                         "while the database fails) and held (in memory) now; written, spooled and db_errors "
                         "since start (RequestLog.stats)", ["state"], registry=r)
        for state in LOG_STATES:
            log_rows.labels(state).set_function(_log_count(request_log, state))
        engine.on_batch.append(self.batch_rows.observe)
        self.monitor = MonitorGauges(request_log, monitor_cache_s)
        r.register(self.monitor)

    def exposition(self) -> str:
        """The text format ``/metrics`` answers with."""
        return generate_latest(self.registry).decode()


def _log_count(request_log: RequestLog, state: str) -> Callable[[], int]:
    return lambda: request_log.stats().get(state, 0)


class MonitorGauges(Collector):
    """The last stored check of every model with checks (``tuneline monitor check``), as gauges:
    ``tuneline_monitor_value`` and ``tuneline_monitor_threshold`` per model and detector (absent
    where the detector had no value, or no threshold), ``tuneline_monitor_alert`` (1: fired, 0:
    not) and ``tuneline_monitor_last_check_timestamp_seconds`` per model. The store is read at
    scrape time at most once per ``cache_s`` seconds; while it cannot be read, the last checks
    read are shown (their timestamp ages, so a stale-check alert still fires)."""

    def __init__(self, request_log: RequestLog, cache_s: float = MONITOR_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request_log, self.cache_s, self.clock = request_log, cache_s, clock
        self._lock = threading.Lock()
        self._checks: list[CheckResult] = []
        self._until = float("-inf")

    def describe(self) -> Iterator[GaugeMetricFamily]:  # the names, without reading the store
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value, threshold, alert, last = families = self._families()
        for check in self.latest():
            last.add_metric([check.model], check.at)
            for r in check.results:
                if r.value is not None:
                    value.add_metric([check.model, r.name], r.value)
                if r.threshold is not None:
                    threshold.add_metric([check.model, r.name], r.threshold)
                alert.add_metric([check.model, r.name], 1.0 if r.fired else 0.0)
        return iter(families)

    def latest(self) -> list[CheckResult]:
        """Each checked model's last check, from the cache or the store."""
        with self._lock:
            now = self.clock()
            if now < self._until:
                return self._checks
            try:
                checks = [c for m in self.request_log.checked_models()
                          if (c := self.request_log.latest_check(m)) is not None]
            except RequestLogError as exc:
                log.warning("/metrics: the monitor checks cannot be read (%s); showing the last read", exc)
                checks = self._checks
            self._checks, self._until = checks, now + self.cache_s
            return checks

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        detector = ["model", "detector"]
        return [
            GaugeMetricFamily("tuneline_monitor_value", "The last monitor check's statistic per detector "
                              "(compared with tuneline_monitor_threshold)", labels=detector),
            GaugeMetricFamily("tuneline_monitor_threshold", "The threshold of each detector in the last "
                              "monitor check", labels=detector),
            GaugeMetricFamily("tuneline_monitor_alert", "1 when the detector fired in the last monitor check, "
                              "else 0", labels=detector),
            GaugeMetricFamily("tuneline_monitor_last_check_timestamp_seconds", "Unix time of the last monitor "
                              "check of each model", labels=["model"]),
        ]
