"""Server-sent events: a streamed answer as OpenAI's ``chat.completion.chunk`` (or
``text_completion``) events, then ``[DONE]``. A generation that fails or passes its deadline ends
with an error event, never a cut stream; a client that goes away has its generation stopped."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import State

from tuneline.serve.engine import Job, Result
from tuneline.serve.errors import error_body

log = logging.getLogger("tuneline.serve")


@dataclass
class EventStream:
    """One streamed answer: its job (generating), the pieces of text the job emits, and what the
    stream does when it ends."""

    job: Job
    future: Future[Result]
    pieces: asyncio.Queue[str | None]  # text as it is final, then None
    rid: str
    created: int
    model: str  # the model served, as in the response
    chat: bool
    include_usage: bool
    record: Callable[[Result | None, int], None]  # the request log row and token metrics (any thread)
    state: State  # the request's state: final_status and error for the middleware's count and log line
    release: Callable[[], None]  # gives back the request's admission
    request_timeout: float | None

    @property
    def kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, delta: dict[str, str] | str, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out: dict[str, Any] = {"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                               "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return _event(out)

    def closing(self, result: Result) -> list[str]:
        """The events after the last piece: the finish reason, the usage if asked for, ``[DONE]``."""
        events = [self.chunk({} if self.chat else "", result.finish_reason)]
        if self.include_usage:
            events.append(_event({"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                                  "choices": [], "usage": {"prompt_tokens": result.prompt_tokens,
                                                           "completion_tokens": result.completion_tokens,
                                                           "total_tokens": result.prompt_tokens
                                                           + result.completion_tokens}}))
        return [*events, "data: [DONE]\n\n"]


async def events(stream: EventStream) -> AsyncIterator[str]:
    """The events of ``stream``; whatever way it ends, its admission is released."""
    finished = False
    try:
        if stream.chat:
            yield stream.chunk({"role": "assistant", "content": ""}, None)
        while True:
            piece = await stream.pieces.get()
            if piece is None:
                break
            yield stream.chunk({"content": piece} if stream.chat else piece, None)
        try:
            result = await asyncio.wrap_future(stream.future)
        except Exception as exc:  # generation failed: the client gets an error event, not a cut stream
            log.error("%s: generation failed: %s", stream.rid, exc)
            stream.state.final_status = 500
            stream.record(None, 500)
            finished = True
            yield _event(error_body(f"internal error (request {stream.rid})", "server_error"))
            return
        finished = True
        if result.finish_reason == "deadline":
            stream.state.final_status, stream.state.error = 504, "deadline_exceeded"
            stream.record(result, 504)
            yield _event(error_body(f"the request did not finish within {stream.request_timeout:g} s",
                                    "timeout_error", code="deadline_exceeded"))
            return
        for event in stream.closing(result):
            yield event
        stream.record(result, 200)  # once the client has had every event
    finally:
        stream.release()
        if not finished:  # the client went away mid-stream: stop generating, log what it had been sent
            _abandoned(stream)


def _abandoned(stream: EventStream) -> None:
    stream.job.cancel()
    stream.state.final_status = 499
    stream.future.add_done_callback(lambda f: stream.record(f.result() if f.exception() is None else None, 499))


def _event(data: object) -> str:
    return "data: " + json.dumps(data) + "\n\n"
