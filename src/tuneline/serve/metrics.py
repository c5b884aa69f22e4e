"""Prometheus metrics of one server (``/metrics``): responses by endpoint, model and status,
latency, time to first token, batch sizes, tokens, requests in flight, queue depth and the request
log's rows. Each app has its own registry, so several apps in one process do not share counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tuneline.serve.engine import Engine
from tuneline.monitor.store import RequestLog

LOG_STATES = ("queued", "in_spool", "held", "written", "spooled", "db_errors")


class ServerMetrics:
    def __init__(self, engine: Engine, request_log: RequestLog, in_flight: Callable[[], int]) -> None:
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

    def exposition(self) -> str:
        """The text format ``/metrics`` answers with."""
        return generate_latest(self.registry).decode()


def _log_count(request_log: RequestLog, state: str) -> Callable[[], int]:
    return lambda: request_log.stats().get(state, 0)
