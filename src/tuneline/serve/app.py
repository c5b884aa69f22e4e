"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/feedback``, ``/healthz`` and Prometheus ``/metrics``.

``model`` in a request picks a registered model: ``NAME`` (its production version),
``NAME@candidate`` or ``NAME@3``. Bearer keys are scoped to model names. A client's mistake is
always a 4xx with an OpenAI-style error body; never a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneline.serve.engine import BASE, Engine, Job
from tuneline.serve.requestlog import RequestLog


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- request models (extra fields a client sends are accepted and ignored, as OpenAI's API does) ---

class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON may escape a lone surrogate ("\\ud800"); the tokenizer and the request log cannot encode one
        for s in value if isinstance(value, list) else [value]:
            if isinstance(s, str) and not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode") from None
        return value


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(_Req):
    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(_Common):
    prompt: str | list[str]


class FeedbackRequest(_Req):
    response_id: str = Field(min_length=1, max_length=64)
    rating: int | None = Field(default=None, ge=-1, le=5, description="-1/1 (thumbs) or 1-5 stars")
    correction: str | None = Field(default=None, max_length=20_000)
    comment: str | None = Field(default=None, max_length=20_000)


@dataclass
class Key:
    name: str
    models: set[str]  # model names, or "*"

    def allows(self, model_name: str) -> bool:
        return "*" in self.models or model_name in self.models


@dataclass
class ServerConfig:
    registry_uri: str
    keys: dict[str, Key] | None  # token -> key; None: no authentication
    default_max_tokens: int = 128
    resolve: Any = None  # ref -> VersionInfo (default: the registry)
    base_name: str = "base"
    adapters_path: Any = None  # VersionInfo -> local adapter folder
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(engine: Engine, log: RequestLog, config: ServerConfig) -> FastAPI:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )

    from tuneline import registry

    metrics = CollectorRegistry()
    req_total = Counter("tuneline_requests_total", "Requests by endpoint, model and status",
                        ["endpoint", "model", "status"], registry=metrics)
    latency = Histogram("tuneline_request_latency_seconds", "Request latency", ["endpoint", "model"],
                        registry=metrics, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
    tokens = Counter("tuneline_tokens_total", "Tokens by kind", ["model", "kind"], registry=metrics)

    app = FastAPI(title="tuneline", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 4xx (a body it cannot parse, an unknown path, a wrong method) in the same shape
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=exc.headers)

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

    def authenticate(request: Request) -> Key | None:
        if config.keys is None:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           code="missing_api_key")
        key = config.keys.get(token)
        if key is None:
            raise ApiError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return key

    @app.middleware("http")
    async def _authenticate_first(request: Request, call_next: Any) -> Any:
        # before the body is read or validated: an unauthenticated client learns nothing about the API
        if request.url.path.startswith("/v1/"):
            try:
                authenticate(request)
            except ApiError as exc:
                return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)
        return await call_next(request)

    def authorize(request: Request, model_name: str | None) -> Key | None:
        key = authenticate(request)
        if key is not None and model_name is not None and not key.allows(model_name):
            raise ApiError(403, f"this key may not call model {model_name!r}", "permission_error",
                           code="model_not_allowed")
        return key

    def resolve(ref: str) -> tuple[str, int | None, str]:
        """(model name, version or None for the base model, adapter name) for a request's ``model``."""
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
        path = config.adapters_path(info) if config.adapters_path else _download(info.source)
        return info.name, info.version, engine.adapter_for(f"{info.name}@{info.version}", path)

    def make_job(body: _Common, prompt_ids: list[int], adapter: str) -> Job:
        limit = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        if len(prompt_ids) + limit > engine.context_length:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; with max_tokens {limit} that exceeds the "
                                f"context length of {engine.context_length}", "invalid_request_error", "messages",
                           "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(prompt_ids, adapter, limit, float(body.temperature or 0.0), stop,
                   queue.Queue() if body.stream else None)

    async def answer(request: Request, body: _Common, endpoint: str, prompt: Any, logged_prompt: Any,
                     chat: bool) -> Any:
        """``prompt(adapter) -> (token ids, what was retrieved or None)``: built once the model is
        resolved, since a hybrid adapter puts its retrieved examples in the prompt."""
        t0 = time.perf_counter()
        name = body.model.partition("@")[0]
        key = authorize(request, name)
        loop = asyncio.get_running_loop()
        model_name, version, adapter = await loop.run_in_executor(None, resolve, body.model)
        prompt_ids, retrieved = await loop.run_in_executor(None, prompt, adapter)
        job = make_job(body, prompt_ids, adapter)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        future = engine.submit(job)

        def record(text: str | None, result: Any, status: int) -> None:
            ms = 1000 * (time.perf_counter() - t0)
            log.log(id=rid, endpoint=endpoint, model=body.model, model_name=model_name, model_version=version,
                    key_name=key.name if key else None, prompt=logged_prompt, response=text,
                    prompt_tokens=len(prompt_ids), completion_tokens=result.completion_tokens if result else None,
                    finish_reason=result.finish_reason if result else None, latency_ms=ms, status=status)
            req_total.labels(endpoint, model_name, str(status)).inc()
            latency.labels(endpoint, model_name).observe(ms / 1000)
            if result:
                tokens.labels(model_name, "prompt").inc(len(prompt_ids))
                tokens.labels(model_name, "completion").inc(result.completion_tokens)

        served = f"{model_name}@{version}" if version is not None else model_name
        if job.stream is not None:
            return StreamingResponse(_sse(job, future, rid, created, served, chat, record),
                                     media_type="text/event-stream")
        result = await asyncio.wrap_future(future)
        record(result.text, result, 200)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        if chat:
            out = {"id": rid, "object": "chat.completion", "created": created, "model": served,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                "finish_reason": result.finish_reason, "logprobs": None}], "usage": usage}
            if retrieved is not None:  # the hybrid: the training rows this answer was shown, to trace it
                out["retrieved"] = retrieved
            return out
        return {"id": rid, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}], "usage": usage}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        messages = [m.model_dump() for m in body.messages]

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
        data = [{"id": config.base_name, "object": "model", "created": 0, "owned_by": "tuneline"}]
        for v in await asyncio.get_running_loop().run_in_executor(
                None, lambda: registry.list_versions(config.registry_uri)):
            if key is not None and not key.allows(v.name):
                continue
            ids = [f"{v.name}@{v.version}"] + [f"{v.name}@{a}" for a in v.aliases]
            ids += [v.name] if "production" in v.aliases else []
            data += [{"id": i, "object": "model", "created": 0, "owned_by": "tuneline"} for i in ids]
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(request: Request, body: FeedbackRequest) -> dict[str, Any]:
        authorize(request, None)
        if body.rating is None and body.correction is None:
            raise ApiError(400, "send a rating, a correction, or both", "invalid_request_error", "rating")
        if not log.exists(body.response_id):
            raise ApiError(404, f"no logged response {body.response_id!r}", "invalid_request_error", "response_id",
                           "response_not_found")
        fid = log.add_feedback(body.response_id, body.rating, body.correction, body.comment)
        return {"id": fid, "object": "feedback", "response_id": body.response_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "adapters_loaded": sorted(engine.adapters)}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _sse(job: Job, future: Any, rid: str, created: int, model: str, chat: bool, record: Any) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    assert job.stream is not None
    pieces: list[str] = []
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict[str, Any] | str, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk({"role": "assistant", "content": ""}, None)
    while True:
        piece = await loop.run_in_executor(None, job.stream.get)
        if piece is None:
            break
        pieces.append(piece)
        yield chunk({"content": piece} if chat else piece, None)
    result = await asyncio.wrap_future(future)
    yield chunk({} if chat else "", result.finish_reason)
    yield "data: [DONE]\n\n"
    record(result.text, result, 200)


def _download(source: str) -> str:
    import mlflow

    return str(mlflow.artifacts.download_artifacts(artifact_uri=source))
