"""The HTTP routes, one module per concern; ``create_app`` includes every router in ROUTERS.

- :mod:`.completions`: ``POST /v1/chat/completions``, ``POST /v1/completions``
- :mod:`.feedback`: ``POST /v1/feedback``
- :mod:`.info`: ``GET /v1/models``, ``GET /healthz``, ``GET /metrics``

Every path under ``/v1/`` needs a valid key before its body is read (:mod:`tuneline.serve.guard`).
"""

from __future__ import annotations

from tuneline.serve.routes import completions, feedback, info

ROUTERS = [completions.router, feedback.router, info.router]

# the `endpoint` label of a path in /metrics and the request log line; any other path: "other"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/v1/feedback": "feedback", "/healthz": "healthz", "/metrics": "metrics"}


def endpoint_label(path: str) -> str:
    return ENDPOINTS.get(path, "other")
