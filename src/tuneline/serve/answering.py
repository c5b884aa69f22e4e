"""How a completion request is answered, whatever its endpoint: its key may call the model, it
is admitted (or 429), the model resolved, the prompt built (a hybrid adapter puts its retrieved
examples in it), the job generated in a batch with others, and the answer returned whole or
streamed; each answer is one request log row and counted in the token metrics.

A request keeps the version it resolved even if the model is promoted meanwhile; a client that
disconnects has its generation stopped; a request past its deadline gets 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneline.monitor.store import LoggedPrompt, RequestRecord
from tuneline.serve.auth import authorize
from tuneline.serve.config import ServerConfig
from tuneline.serve.engine import Engine, Job, Result
from tuneline.serve.errors import ApiError, error_body
from tuneline.serve.keys import Key
from tuneline.serve.resolver import ResolvedModel
from tuneline.serve.schema import ChatCompletion, CommonRequest, TextCompletion, Usage
from tuneline.serve.state import ServerState
from tuneline.serve.streaming import EventStream, events

log = logging.getLogger("tuneline.serve")

# the training rows a hybrid adapter's answer was shown (where, similarity), or None
Retrieved = Sequence[Mapping[str, object]] | None
# adapter slot -> (prompt token ids, retrieved): run off the event loop once the model is resolved
PromptBuilder = Callable[[str], tuple[list[int], Retrieved]]


@dataclass(frozen=True)
class Call:
    """What a completions route asks :func:`answer` for."""

    endpoint: str  # "chat" or "completions": the request log's and the metrics' endpoint
    prompt: PromptBuilder
    logged_prompt: LoggedPrompt  # the request log's prompt: the messages, or the completion prompt

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"


@dataclass
class Answer:
    """One admitted request: what it resolved to, its job, and how it is recorded."""

    server: ServerState
    call: Call
    requested: str  # the request's `model`
    key: Key | None
    model: ResolvedModel
    prompt_ids: list[int]
    retrieved: Retrieved
    job: Job
    t0: float  # time.perf_counter() at arrival
    rid: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.rid = ("chatcmpl-" if self.call.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def record(self, result: Result | None, status: int) -> None:
        """The request log row and the token metrics (any thread)."""
        metrics = self.server.metrics
        try:
            self.server.request_log.log(RequestRecord(
                id=self.rid, endpoint=self.call.endpoint, model=self.requested, model_name=self.model.name,
                model_version=self.model.version, key_name=self.key.name if self.key else None,
                prompt=self.call.logged_prompt, response=result.text if result else None,
                prompt_tokens=len(self.prompt_ids), completion_tokens=result.completion_tokens if result else None,
                finish_reason=result.finish_reason if result else None,
                latency_ms=1000 * (time.perf_counter() - self.t0), status=status,
                # a cut answer (499, 504) predicts nothing
                predicted_label=self.server.engine.predicted_label(self.model.slot, result.text)
                if result and status == 200 else None))
        except Exception:  # the answer is not lost because the log failed
            metrics.log_failures.inc()
            log.exception("%s: the request log failed", self.rid)
        if result:
            metrics.tokens.labels(self.model.name, "prompt").inc(len(self.prompt_ids))
            metrics.tokens.labels(self.model.name, "completion").inc(result.completion_tokens)
        if self.job.first_token_at is not None:
            metrics.ttft.labels(self.call.endpoint, self.model.name).observe(self.job.first_token_at - self.t0)

    def body(self, result: Result) -> ChatCompletion | TextCompletion:
        usage: Usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                        "total_tokens": result.prompt_tokens + result.completion_tokens}
        if self.call.chat:
            out: ChatCompletion = {
                "id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model.served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}], "usage": usage}
            if self.retrieved is not None:  # the hybrid: the training rows this answer was shown, to trace it
                out["retrieved"] = self.retrieved
            return out
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model.served,
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}], "usage": usage}


async def answer(server: ServerState, request: Request, body: CommonRequest,
                 call: Call) -> ChatCompletion | TextCompletion | JSONResponse | StreamingResponse:
    t0 = time.perf_counter()
    arrived = time.monotonic()
    state = request.state
    # what the middleware logs if the request is refused before it has an Answer
    state.model_name, state.model, state.prompt = body.model.partition("@")[0], body.model, call.logged_prompt
    key = authorize(server.keys, request, body.model)
    server.admission.admit()
    release = True
    try:
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, server.models.resolve, body.model)
        state.model_name, state.model_version = model.name, model.version
        prompt_ids, retrieved = await loop.run_in_executor(None, call.prompt, model.slot)
        timeout = server.config.request_timeout
        job = make_job(server.engine, server.config, body, prompt_ids, model.slot,
                       arrived + timeout if timeout else None)
        ans = Answer(server, call, body.model, key, model, prompt_ids, retrieved, job, t0)
        state.request_id, state.answered = ans.rid, True  # from here the Answer writes the log row
        try:
            if body.stream:
                response = _stream(ans, request, body)
                release = False  # the stream releases its admission when it ends
                return response
            result = await _generated(server.engine, job, request)
        except Exception:  # the engine failed or is closed: a 500, recorded as one
            ans.record(None, 500)
            raise
    finally:
        if release:
            server.admission.release()
    return _finish(ans, request, result)


def make_job(engine: Engine, config: ServerConfig, body: CommonRequest, prompt_ids: list[int], adapter: str,
             deadline: float | None) -> Job:
    """The engine's job for a request; ApiError 400 for settings it cannot honour."""
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


def _stream(ans: Answer, request: Request, body: CommonRequest) -> StreamingResponse:
    """Submit the job with its text streamed to the client as server-sent events."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def emit(piece: str | None) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    ans.job.stream = emit
    future = ans.server.engine.submit(ans.job)
    stream = EventStream(ans.job, future, pieces, ans.rid, ans.created, ans.model.served, ans.call.chat,
                         include_usage=bool((body.stream_options or {}).get("include_usage")), record=ans.record,
                         state=request.state, release=ans.server.admission.release,
                         request_timeout=ans.server.config.request_timeout)
    return StreamingResponse(events(stream), media_type="text/event-stream")


async def _generated(engine: Engine, job: Job, request: Request) -> Result:
    """The job's result; a client that disconnects meanwhile has its generation stopped."""
    waiting = asyncio.wrap_future(engine.submit(job))
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if not job.cancelled.is_set() and await request.is_disconnected():
            job.cancel()


def _finish(ans: Answer, request: Request, result: Result) -> ChatCompletion | TextCompletion | JSONResponse:
    if result.finish_reason == "cancelled":
        request.state.final_status = 499  # the client closed the connection; nobody reads this answer
        ans.record(result, 499)
        return JSONResponse(error_body("the client closed the connection", "invalid_request_error",
                                       code="client_closed"), status_code=499)
    if result.finish_reason == "deadline":
        ans.record(result, 504)
        request.state.error = "deadline_exceeded"
        raise ApiError(504, f"the request did not finish within {ans.server.config.request_timeout:g} s (the server "
                            "is overloaded or max_tokens is too large); retry later or with fewer tokens",
                       "timeout_error", code="deadline_exceeded")
    ans.record(result, 200)
    return ans.body(result)
