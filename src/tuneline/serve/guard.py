"""The middleware around every route (a pure ASGI middleware, inside Starlette's error
middleware): a request id (``X-Request-Id``), the Host check (DNS rebinding), authentication
before the body is read, the body size limit (413), and the count and log line of every response,
whatever its status. A completion request refused or failed before an answer was generated
(401/403, 404, 413, 429, 400, 5xx) gets its request log row here, under its ``X-Request-Id``; one
that was answered has its row from :class:`tuneline.serve.answering.Answer`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TypedDict

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneline.monitor.store import LoggedPrompt, RequestRecord
from tuneline.serve.auth import authenticate
from tuneline.serve.errors import ApiError, send_error
from tuneline.serve.routes import endpoint_label
from tuneline.serve.state import ServerState

log = logging.getLogger("tuneline.serve")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class RequestState(TypedDict, total=False):
    """A request's ``scope["state"]`` (``request.state`` in a route): what routes tell the middleware
    for its count, log line and, for a refused completion request, its request log row."""

    request_id: str  # req-..., replaced by the response id (chatcmpl-..., cmpl-...) once there is one
    model_name: str  # the model requested, then the one resolved: the `model` label in /metrics
    final_status: int  # the status to count when it is not the one sent (499, a stream's 500 or 504)
    error: str  # a code for the log line (deadline_exceeded)
    key_name: str  # the caller's key, once authenticated
    model: str  # the request's `model`, as sent
    model_version: int | None  # the version it resolved to (None: the base model)
    prompt: LoggedPrompt  # what it asked, once its body is read
    answered: bool  # an Answer exists: it writes the request log row, the middleware does not


# endpoints whose every request is a request log row (others: /metrics and the log line only)
COMPLETIONS = frozenset({"chat", "completions"})


def host_of(header: str) -> str:
    """The host name of a Host header, without its port."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app: ASGIApp, server: ServerState) -> None:
        self.app, self.server = app, server
        config = server.config
        self.allowed_hosts = LOCAL_HOSTS | {host_of(h) for h in config.allowed_hosts}
        self.check_host = config.keys is None or bool(config.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state: RequestState = scope.setdefault("state", {})
        rid = "req-" + uuid.uuid4().hex
        state["request_id"] = rid
        response = _Response(send, state)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self.admit(scope.get("path", ""), headers, state)
        except ApiError as exc:
            await send_error(response.send, exc, rid)
        else:
            await self._route(scope, receive, response)
        self._count(scope, state, response.status, t0)

    def admit(self, path: str, headers: Mapping[str, str], state: RequestState) -> None:
        """Refuse with ApiError what is refused before the body is read: a foreign Host, a missing
        or invalid key (an unauthenticated client learns nothing about the API), a body too large.
        The caller's key name goes into ``state``."""
        config = self.server.config
        if self.check_host and host_of(headers.get("host", "")) not in self.allowed_hosts:
            raise ApiError(400, f"Host {headers.get('host', '')!r} is not served here: without API keys only "
                                "localhost is accepted (DNS rebinding); add others with --allowed-host",
                           "invalid_request_error", code="invalid_host")
        if path.startswith("/v1/"):
            caller = authenticate(self.server.keys, headers)
            if caller is not None:
                state["key_name"] = caller.name
        elif path == "/metrics" and not config.metrics_public:
            key = authenticate(self.server.keys, headers)
            if key is not None and not key.reads_metrics:
                raise ApiError(403, "this key may not read /metrics", "permission_error", code="metrics_not_allowed")
        length = headers.get("content-length", "")
        if length.strip().isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"the request body has {int(length)} bytes; the limit is {config.max_body_bytes}",
                           "invalid_request_error", code="request_too_large")

    async def _route(self, scope: Scope, receive: Receive, response: _Response) -> None:
        """The app behind, with the body limit; an exception it lets out is a 500 with the request id."""
        limited = _BodyLimit(receive, self.server.config.max_body_bytes)
        state = response.state
        try:
            await self.app(scope, limited.receive, response.send)
        except Exception:
            log.exception("%s %s %s failed", state["request_id"], scope.get("method"), scope.get("path", ""))
            if not response.status:
                await send_error(response.send, ApiError(500, f"internal error (request {state['request_id']})",
                                                         "server_error"), state["request_id"])
            state["final_status"] = 500

    def _count(self, scope: Scope, state: RequestState, sent: int, t0: float) -> None:
        """The response in /metrics and its log line; a refused completion request's log row."""
        path = scope.get("path", "")
        endpoint = endpoint_label(path)
        status = int(state.get("final_status") or sent or 500)
        model = str(state.get("model_name", ""))
        seconds = time.perf_counter() - t0
        self.server.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.server.metrics.latency.labels(endpoint, model).observe(seconds)
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 and status != 499 else logging.INFO
        log.log(level, "%s %s %s %d %.0fms model=%s%s", state["request_id"], scope.get("method"), path, status,
                1000 * seconds, model or "-", f" error={state['error']}" if state.get("error") else "")
        if endpoint in COMPLETIONS and not state.get("answered"):
            self._record_refused(endpoint, state, status, seconds)

    def _record_refused(self, endpoint: str, state: RequestState, status: int, seconds: float) -> None:
        """The request log row of a completion request that got no answer: what is known of it
        (the model and key once read, its prompt once its body was parsed), no response."""
        requested = state.get("model")
        try:
            self.server.request_log.log(RequestRecord(
                id=state["request_id"], endpoint=endpoint, model=requested,
                model_name=state.get("model_name") or None, model_version=state.get("model_version"),
                key_name=state.get("key_name"), prompt=state.get("prompt"), response=None, prompt_tokens=None,
                completion_tokens=None, finish_reason=None, latency_ms=1000 * seconds, status=status))
        except Exception:  # the response is sent; a failed log must not fail the middleware
            self.server.metrics.log_failures.inc()
            log.exception("%s: the request log failed", state["request_id"])


class _Response:
    """The send channel of one request: adds ``X-Request-Id`` and remembers the status sent."""

    def __init__(self, send: Send, state: RequestState) -> None:
        self._send, self.state = send, state
        self.status = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = list(message.get("headers", []))
            if not any(k.lower() == b"x-request-id" for k, _ in headers):  # send_error sets it already
                message = {**message, "headers": [*headers, (b"x-request-id", self.state["request_id"].encode())]}
        await self._send(message)


class _BodyLimit:
    """The receive channel of one request, refusing a body (even chunked, without Content-Length)
    once it is over ``limit`` bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive, self.limit = receive, limit
        self.received = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise StarletteHTTPException(413, f"the request body is over the limit of {self.limit} bytes")
        return message
