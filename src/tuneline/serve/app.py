"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/feedback``, ``/healthz`` and Prometheus ``/metrics``.

``model`` in a request picks a registered model: ``NAME`` (its production version),
``NAME@candidate`` or ``NAME@3``. Bearer keys are scoped to model names or aliases. A client's
mistake is always a 4xx with an OpenAI-style error body; never a 5xx.

Under load: at most ``max_batch + max_queue`` requests are admitted at once (more get 429 with
``Retry-After``), each has a deadline, a client that disconnects has its generation stopped, and
bodies over ``max_body_bytes`` get 413 before they are read. Every response is counted by status
in ``/metrics`` and logged with its request id (``X-Request-Id``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneline.serve.engine import BASE, Engine, Job, Result
from tuneline.serve.keys import Key, hash_key
from tuneline.serve.requestlog import RequestLog, RequestLogError
from tuneline.serve.schema import ChatRequest, CommonRequest, CompletionRequest, FeedbackRequest

log = logging.getLogger("tuneline.serve")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ServerConfig:
    registry_uri: str
    # token -> Key, or Keys carrying their sha256 (a keys file); None: no authentication
    keys: dict[str, Key] | list[Key] | None
    default_max_tokens: int = 128
    resolve: Any = None  # ref -> VersionInfo (default: the registry)
    base_name: str = "base"
    adapters_path: Any = None  # VersionInfo -> local adapter folder
    list_versions: Any = None  # () -> every VersionInfo (default: the registry's), for /v1/models
    max_queue: int = 64  # requests admitted beyond a batch being generated; more get 429
    request_timeout: float | None = 120.0  # seconds from arrival to the last token; None: no deadline
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    metrics_public: bool = False  # /metrics without a key (when keys are configured)
    allowed_hosts: list[str] = field(default_factory=list)  # Host headers accepted besides localhost
    retry_after_s: int = 1  # the Retry-After of a 429
    extra: dict[str, Any] = field(default_factory=dict)


_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
              "/v1/feedback": "feedback", "/healthz": "healthz", "/metrics": "metrics"}


def _key_table(keys: dict[str, Key] | list[Key] | None) -> list[tuple[bytes, Key]] | None:
    if keys is None:
        return None
    if isinstance(keys, dict):
        return [(bytes.fromhex(hash_key(token)), key) for token, key in keys.items()]
    table = []
    for key in keys:
        if not key.sha256:
            raise ValueError(f"key {key.name!r} has no sha256")
        table.append((bytes.fromhex(key.sha256), key))
    return table


def _host_of(header: str) -> str:
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """Pure ASGI middleware around the routes (inside Starlette's error middleware): request id,
    Host check, authentication before the body is read, the body size limit, and the count and
    log line of every response, whatever its status."""

    def __init__(self, app: Any, server: Any) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.server(self.app, scope, receive, send)


def create_app(engine: Engine, log_db: RequestLog, config: ServerConfig) -> FastAPI:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )

    from tuneline import registry

    metrics = CollectorRegistry()
    req_total = Counter("tuneline_requests_total", "Responses by endpoint, model and status",
                        ["endpoint", "model", "status"], registry=metrics)
    latency = Histogram("tuneline_request_latency_seconds", "Request latency", ["endpoint", "model"],
                        registry=metrics, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
    ttft = Histogram("tuneline_time_to_first_token_seconds", "From a request's arrival to its first generated "
                     "token", ["endpoint", "model"], registry=metrics,
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
    batch_rows = Histogram("tuneline_batch_size", "Rows per generate call", registry=metrics,
                           buckets=(1, 2, 4, 8, 16, 32, 64))
    tokens = Counter("tuneline_tokens_total", "Tokens by kind", ["model", "kind"], registry=metrics)
    log_failures = Counter("tuneline_request_log_failures_total", "Request log writes that raised",
                           registry=metrics)
    admitted = {"n": 0}  # requests admitted and not yet answered (touched on the event loop only)
    Gauge("tuneline_requests_in_flight", "Requests admitted and not yet answered", registry=metrics
          ).set_function(lambda: admitted["n"])
    Gauge("tuneline_queue_depth", "Requests waiting for the model", registry=metrics
          ).set_function(lambda: engine.waiting())
    request_log_rows = Gauge("tuneline_request_log_rows", "Request log: rows queued, in_spool (in the fallback file "
                             "while the database fails) and held (in memory) now; written, spooled and db_errors "
                             "since start (RequestLog.stats)", ["state"], registry=metrics)
    def _log_count(state: str) -> Any:
        return lambda: log_db.stats().get(state, 0)

    for state in ("queued", "in_spool", "held", "written", "spooled", "db_errors"):
        request_log_rows.labels(state).set_function(_log_count(state))
    engine.on_batch.append(batch_rows.observe)
    key_table = _key_table(config.keys)
    limit = engine.max_batch + config.max_queue
    allowed_hosts = LOCAL_HOSTS | {_host_of(h) for h in config.allowed_hosts}
    check_host = config.keys is None or bool(config.allowed_hosts)
    download_cache: dict[tuple[str, int], str] = {}

    app = FastAPI(title="tuneline", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 4xx (a body it cannot parse, an unknown path, a wrong method) in the same shape
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error",
                                        code="request_too_large" if exc.status_code == 413 else None),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(_error_body(msg, "invalid_request_error", ".".join(loc) or None, first.get("type")),
                            status_code=400)

    def lookup(token: str) -> Key | None:
        """The key whose digest matches, compared in constant time against every key."""
        assert key_table is not None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, key in key_table:
            if hmac.compare_digest(digest, known):
                found = key
        return found

    def authenticate_headers(headers: dict[str, str]) -> Key | None:
        """None without keys configured; otherwise the caller's key, or ApiError 401."""
        if key_table is None:
            return None
        header = headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           code="missing_api_key")
        key = lookup(token)
        if key is None:
            raise ApiError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return key

    def authenticate(request: Request) -> Key | None:
        return authenticate_headers({k.lower(): v for k, v in request.headers.items()})

    async def send_error(send: Any, exc: ApiError, rid: str) -> None:
        body = json.dumps(_error_body(exc.message, exc.type, exc.param, exc.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-request-id", rid.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def guard(inner: Any, scope: Any, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        rid = "req-" + uuid.uuid4().hex
        state["request_id"] = rid
        path = scope.get("path", "")
        endpoint = _ENDPOINTS.get(path, "other")
        sent = {"status": 0}

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", state["request_id"].encode())]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if check_host and _host_of(headers.get("host", "")) not in allowed_hosts:
                raise ApiError(400, f"Host {headers.get('host', '')!r} is not served here: without API keys only "
                                    "localhost is accepted (DNS rebinding); add others with --allowed-host",
                               "invalid_request_error", code="invalid_host")
            if path.startswith("/v1/"):
                # before the body is read or validated: an unauthenticated client learns nothing about the API
                authenticate_headers(headers)
            elif path == "/metrics" and not config.metrics_public:
                key = authenticate_headers(headers)
                if key is not None and not key.reads_metrics:
                    raise ApiError(403, "this key may not read /metrics", "permission_error",
                                   code="metrics_not_allowed")
            length = headers.get("content-length", "")
            if length.strip().isdigit() and int(length) > config.max_body_bytes:
                raise ApiError(413, f"the request body has {int(length)} bytes; the limit is "
                                    f"{config.max_body_bytes}", "invalid_request_error", code="request_too_large")
        except ApiError as exc:
            await send_error(send_with_id, exc, rid)
        else:
            received = {"n": 0}

            async def limited_receive() -> Any:
                message = await receive()
                if message["type"] == "http.request":
                    received["n"] += len(message.get("body", b""))
                    if received["n"] > config.max_body_bytes:  # a chunked body without Content-Length
                        raise StarletteHTTPException(413, f"the request body is over the limit of "
                                                          f"{config.max_body_bytes} bytes")
                return message

            try:
                await inner(scope, limited_receive, send_with_id)
            except Exception:
                log.exception("%s %s %s failed", state["request_id"], scope.get("method"), path)
                if not sent["status"]:
                    await send_error(send_with_id, ApiError(500, f"internal error (request {state['request_id']})",
                                                            "server_error"), state["request_id"])
                state["final_status"] = 500
        status = int(state.get("final_status") or sent["status"] or 500)
        model = str(state.get("model_name", ""))
        seconds = time.perf_counter() - t0
        req_total.labels(endpoint, model, str(status)).inc()
        latency.labels(endpoint, model).observe(seconds)
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 and status != 499 else logging.INFO
        log.log(level, "%s %s %s %d %.0fms model=%s%s", state["request_id"], scope.get("method"), path, status,
                1000 * seconds, model or "-", f" error={state['error']}" if state.get("error") else "")

    app.add_middleware(_Guard, server=guard)

    def authorize(request: Request, ref: str | None) -> Key | None:
        key = authenticate(request)
        if key is not None and ref is not None and not key.allows(ref):
            raise ApiError(403, f"this key may not call model {ref!r}", "permission_error",
                           code="model_not_allowed")
        return key

    def resolve(ref: str) -> tuple[str, int | None, str]:
        """(model name, version or None for the base model, adapter slot) for a request's ``model``."""
        from tuneline.artifacts import ADAPTER_SHA_TAG, ArtifactError

        name = ref.partition("@")[0]
        if ref == config.base_name:
            return name, None, BASE
        try:
            info = engine.cached_resolve(ref, config.resolve or (lambda r: registry.resolve(config.registry_uri, r)))
        except registry.RegistryError as exc:
            raise ApiError(404, f"model {ref!r} not found: {exc.problems[0].message}", "invalid_request_error",
                           "model", "model_not_found") from exc
        except Exception as exc:  # the registry could not parse the name (e.g. odd characters)
            raise ApiError(404, f"model {ref!r} not found", "invalid_request_error", "model",
                           "model_not_found") from exc
        key = f"{info.name}@{info.version}"
        path = download_cache.get((info.name, info.version))
        if path is None:  # fetched once per version, not on every request
            path = config.adapters_path(info) if config.adapters_path else _download(info.source)
            download_cache[(info.name, info.version)] = path
        try:
            return info.name, info.version, engine.adapter_for(key, path, info.tags.get(ADAPTER_SHA_TAG))
        except ArtifactError as exc:
            download_cache.pop((info.name, info.version), None)
            log.error("refused to load %s: %s", key, exc.problems[0].message)
            raise ApiError(500, f"model {ref!r} cannot be served: its adapter failed verification "
                                f"({exc.problems[0].message})", "server_error", "model",
                           "adapter_verification_failed") from exc

    def make_job(body: CommonRequest, prompt_ids: list[int], adapter: str, deadline: float | None) -> Job:
        # an adapter saved with decoding.json answers as it was evaluated: its token limit and stop
        # strings unless the request sets its own, its beams and penalties always
        decoding = engine.decodings.get(adapter)
        limit = (body.max_completion_tokens or body.max_tokens
                 or (decoding.max_new_tokens if decoding is not None else config.default_max_tokens))
        if len(prompt_ids) + limit > engine.context_length:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; with max_tokens {limit} that exceeds the "
                                f"context length of {engine.context_length}", "invalid_request_error", "messages",
                           "context_length_exceeded")
        temperature = float(body.temperature or 0.0)
        if body.seed is not None and temperature >= 1e-3:
            raise ApiError(400, "seed: reproducible sampling is not supported; use temperature 0 (greedy) to get "
                                "the same answer every time", "invalid_request_error", "seed")
        stop = [x for x in ([body.stop] if isinstance(body.stop, str) else list(body.stop or [])) if x]
        if not stop and decoding is not None:
            stop = list(decoding.stop)
        job = Job(prompt_ids, adapter, limit, temperature, stop, deadline=deadline,
                  top_p=float(body.top_p if body.top_p is not None else 1.0))
        if decoding is not None:
            job.num_beams, job.repetition_penalty = decoding.num_beams, decoding.repetition_penalty
            job.no_repeat_ngram_size = decoding.no_repeat_ngram_size
        return job

    async def answer(request: Request, body: CommonRequest, endpoint: str, prompt: Any, logged_prompt: Any,
                     chat: bool) -> Any:
        """``prompt(adapter) -> (token ids, what was retrieved or None)``: built once the model is
        resolved, since a hybrid adapter puts its retrieved examples in the prompt."""
        t0 = time.perf_counter()
        arrived = time.monotonic()
        state = request.state
        state.model_name = body.model.partition("@")[0]
        key = authorize(request, body.model)
        if admitted["n"] >= limit:
            raise ApiError(429, f"the server is busy ({admitted['n']} requests in progress); retry after "
                                f"{config.retry_after_s} s", "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(config.retry_after_s)})
        admitted["n"] += 1
        release = True
        try:
            loop = asyncio.get_running_loop()
            model_name, version, adapter = await loop.run_in_executor(None, resolve, body.model)
            state.model_name = model_name
            prompt_ids, retrieved = await loop.run_in_executor(None, prompt, adapter)
            deadline = arrived + config.request_timeout if config.request_timeout else None
            job = make_job(body, prompt_ids, adapter, deadline)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            state.request_id = rid
            created = int(time.time())

            def record(result: Result | None, status: int) -> None:
                """The request log row and the token metrics (any thread)."""
                ms = 1000 * (time.perf_counter() - t0)
                try:
                    log_db.log(id=rid, endpoint=endpoint, model=body.model, model_name=model_name,
                               model_version=version, key_name=key.name if key else None, prompt=logged_prompt,
                               response=result.text if result else None, prompt_tokens=len(prompt_ids),
                               completion_tokens=result.completion_tokens if result else None,
                               finish_reason=result.finish_reason if result else None, latency_ms=ms, status=status)
                except Exception:  # the answer is not lost because the log failed
                    log_failures.inc()
                    log.exception("%s: the request log failed", rid)
                if result:
                    tokens.labels(model_name, "prompt").inc(len(prompt_ids))
                    tokens.labels(model_name, "completion").inc(result.completion_tokens)
                if job.first_token_at is not None:
                    ttft.labels(endpoint, model_name).observe(job.first_token_at - t0)

            served = f"{model_name}@{version}" if version is not None else model_name
            if body.stream:
                pieces: asyncio.Queue[str | None] = asyncio.Queue()

                def emit(piece: str | None) -> None:
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)

                job.stream = emit
                future = engine.submit(job)
                release = False  # the stream releases its admission when it ends
                usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(
                    _sse(job, future, pieces, rid, created, served, chat, usage, record, state,
                         lambda: admitted.__setitem__("n", admitted["n"] - 1), request_timeout=config.request_timeout),
                    media_type="text/event-stream")
            waiting = asyncio.wrap_future(engine.submit(job))
            while True:  # a client that disconnects has its generation stopped
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    break
                if not job.cancelled.is_set() and await request.is_disconnected():
                    job.cancel()
            result = waiting.result()
        finally:
            if release:
                admitted["n"] -= 1
        if result.finish_reason == "cancelled":
            state.final_status = 499  # the client closed the connection; nobody reads this answer
            record(result, 499)
            return JSONResponse(_error_body("the client closed the connection", "invalid_request_error",
                                            code="client_closed"), status_code=499)
        if result.finish_reason == "deadline":
            record(result, 504)
            state.error = "deadline_exceeded"
            raise ApiError(504, f"the request did not finish within {config.request_timeout:g} s (the server is "
                                "overloaded or max_tokens is too large); retry later or with fewer tokens",
                           "timeout_error", code="deadline_exceeded")
        record(result, 200)
        usage_body = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens}
        if chat:
            out = {"id": rid, "object": "chat.completion", "created": created, "model": served,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                "finish_reason": result.finish_reason, "logprobs": None}], "usage": usage_body}
            if retrieved is not None:  # the hybrid: the training rows this answer was shown, to trace it
                out["retrieved"] = retrieved
            return out
        return {"id": rid, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}], "usage": usage_body}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        messages = [m.plain() for m in body.messages]

        def prompt(adapter: str) -> tuple[list[int], list[dict[str, Any]] | None]:
            shown, retrieved = messages, None
            retriever = engine.retrievers.get(adapter)
            if retriever is not None:  # the hybrid: its nearest training examples go in front, as in training
                shown, retrieved = retriever.messages(messages)
            try:
                text = engine.tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a conversation the template rejects (e.g. roles out of order)
                raise ApiError(400, f"messages: {exc}", "invalid_request_error", "messages") from exc
            return engine.tokenizer(text, add_special_tokens=False)["input_ids"], retrieved

        return await answer(request, body, "chat", prompt, messages, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request is supported", "invalid_request_error",
                           "prompt")
        ids = engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt: empty", "invalid_request_error", "prompt")
        # a raw prompt is sent as it is, also to a hybrid adapter (there is no conversation to put examples in)
        return await answer(request, body, "completions", lambda _: (ids, None), prompts[0], chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        key = authorize(request, None)
        data = []
        if key is None or key.allows(config.base_name):
            data.append({"id": config.base_name, "object": "model", "created": 0, "owned_by": "tuneline"})
        for v in await asyncio.get_running_loop().run_in_executor(
                None, config.list_versions or (lambda: registry.list_versions(config.registry_uri))):
            if key is not None and not key.allows_name(v.name):
                continue
            ids = [f"{v.name}@{v.version}"] + [f"{v.name}@{a}" for a in v.aliases]
            ids += [v.name] if "production" in v.aliases else []
            data += [{"id": i, "object": "model", "created": 0, "owned_by": "tuneline"} for i in ids
                     if key is None or key.allows(i)]
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(request: Request, body: FeedbackRequest) -> dict[str, Any]:
        authorize(request, None)
        if body.rating is None and body.correction is None:
            raise ApiError(400, "send a rating, a correction, or both", "invalid_request_error", "rating")
        loop = asyncio.get_running_loop()
        try:
            if not await loop.run_in_executor(None, log_db.exists, body.response_id):
                raise ApiError(404, f"no logged response {body.response_id!r}", "invalid_request_error",
                               "response_id", "response_not_found")
            fid = await loop.run_in_executor(None, log_db.add_feedback, body.response_id, body.rating,
                                             body.correction, body.comment)
        except RequestLogError as exc:  # the store is down: the client may retry, nothing was recorded
            log.error("feedback for %s not stored: %s", body.response_id, exc)
            raise ApiError(503, "the request log is unavailable; feedback was not stored, retry later",
                           "server_error", code="request_log_unavailable") from exc
        return {"id": fid, "object": "feedback", "response_id": body.response_id}

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        if key_table is not None:  # without a valid key: only that it is up, not what it serves
            try:
                authenticate(request)
            except ApiError:
                return {"status": "ok"}
        return {"status": "ok", "adapters_loaded": sorted(engine.adapters), "in_flight": admitted["n"],
                "queue_depth": engine.waiting()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _sse(job: Job, future: Any, pieces: asyncio.Queue[str | None], rid: str, created: int, model: str,
               chat: bool, include_usage: bool, record: Any, state: Any, release: Any,
               request_timeout: float | None) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict[str, Any] | str, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return "data: " + json.dumps(out) + "\n\n"

    finished = False
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""}, None)
        while True:
            piece = await pieces.get()
            if piece is None:
                break
            yield chunk({"content": piece} if chat else piece, None)
        try:
            result = await asyncio.wrap_future(future)
        except Exception as exc:  # generation failed: the client gets an error event, not a cut stream
            log.error("%s: generation failed: %s", rid, exc)
            state.final_status = 500
            finished = True
            yield "data: " + json.dumps(_error_body(f"internal error (request {rid})", "server_error")) + "\n\n"
            return
        finished = True
        if result.finish_reason == "deadline":
            state.final_status, state.error = 504, "deadline_exceeded"
            record(result, 504)
            yield "data: " + json.dumps(_error_body(f"the request did not finish within {request_timeout:g} s",
                                                    "timeout_error", code="deadline_exceeded")) + "\n\n"
            return
        yield chunk({} if chat else "", result.finish_reason)
        if include_usage:
            yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                         "usage": {"prompt_tokens": result.prompt_tokens,
                                                   "completion_tokens": result.completion_tokens,
                                                   "total_tokens": result.prompt_tokens + result.completion_tokens}
                                         }) + "\n\n"
        yield "data: [DONE]\n\n"
        record(result, 200)
    finally:
        release()
        if not finished:  # the client went away mid-stream: stop generating, log what it had been sent
            job.cancel()
            state.final_status = 499
            future.add_done_callback(lambda f: record(f.result(), 499) if f.exception() is None else None)


def _download(source: str) -> str:
    import mlflow

    return str(mlflow.artifacts.download_artifacts(artifact_uri=source))
