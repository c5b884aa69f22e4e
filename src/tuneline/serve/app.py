"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/feedback``, ``/healthz`` and Prometheus ``/metrics``.

``model`` in a request picks a registered model: ``NAME`` (its production version),
``NAME@candidate`` or ``NAME@3``. Bearer keys are scoped to model names or aliases. A client's
mistake is always a 4xx with an OpenAI-style error body; never a 5xx.

Under load: at most ``max_batch + max_queue`` requests are admitted at once (more get 429 with
``Retry-After``), each has a deadline, a client that disconnects has its generation stopped, and
bodies over ``max_body_bytes`` get 413 before they are read. Every response is counted by status
in ``/metrics`` and logged with its request id (``X-Request-Id``).

:func:`create_app` only assembles the parts; where each lives is in ``docs/serving.md``.
"""

from __future__ import annotations

from fastapi import FastAPI

from tuneline.monitor.store import RequestLog
from tuneline.serve.config import ServerConfig
from tuneline.serve.engine import Engine
from tuneline.serve.errors import ApiError, install_error_handlers
from tuneline.serve.guard import Guard
from tuneline.serve.routes import ROUTERS
from tuneline.serve.state import ServerState

__all__ = ["ApiError", "ServerConfig", "create_app"]


def create_app(engine: Engine, log_db: RequestLog, config: ServerConfig) -> FastAPI:
    """The app serving ``engine``'s model, logging to ``log_db``; its :class:`ServerState` is
    ``app.state.server``."""
    server = ServerState.build(engine, log_db, config)
    app = FastAPI(title="tuneline", version="1", docs_url=None, redoc_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(Guard, server=server)
    for router in ROUTERS:
        app.include_router(router)
    return app
