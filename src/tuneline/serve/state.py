"""One server's shared state, :class:`ServerState`: built once by ``create_app``, kept on
``app.state.server``, and handed to every route (``server: Server`` in a route's parameters) and
to the middleware. Everything a request needs besides its own body is reached from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tuneline.monitor.store import RequestLog
from tuneline.serve.auth import KeyTable
from tuneline.serve.config import ServerConfig
from tuneline.serve.engine import Engine
from tuneline.serve.errors import ApiError
from tuneline.serve.metrics import ServerMetrics
from tuneline.serve.resolver import ModelResolver


class Admission:
    """Requests admitted and not yet answered (touched on the event loop only): at most
    ``limit`` at once; more get 429 with ``Retry-After``."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0

    def admit(self) -> None:
        if self.in_flight >= self.limit:
            raise ApiError(429, f"the server is busy ({self.in_flight} requests in progress); retry after "
                                f"{self.retry_after_s} s", "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


@dataclass
class ServerState:
    engine: Engine
    request_log: RequestLog
    config: ServerConfig
    keys: KeyTable | None  # None: no authentication
    admission: Admission
    metrics: ServerMetrics
    models: ModelResolver

    @classmethod
    def build(cls, engine: Engine, request_log: RequestLog, config: ServerConfig) -> ServerState:
        admission = Admission(engine.max_batch + config.max_queue, config.retry_after_s)
        return cls(engine, request_log, config, KeyTable.of(config.keys), admission,
                   ServerMetrics(engine, request_log, lambda: admission.in_flight), ModelResolver(engine, config))


def server_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


# a route's parameter `server: Server` receives the app's ServerState
Server = Annotated[ServerState, Depends(server_of)]
