"""``POST /v1/chat/completions`` and ``POST /v1/completions``: each builds its prompt and hands
the rest to :func:`tuneline.serve.answering.answer`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneline.serve.answering import Call, Retrieved, answer
from tuneline.serve.engine import Engine
from tuneline.serve.errors import ApiError
from tuneline.serve.schema import ChatCompletion, ChatRequest, CompletionRequest, TextCompletion
from tuneline.serve.state import Server

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatRequest,
                           server: Server) -> ChatCompletion | TextCompletion | JSONResponse | StreamingResponse:
    messages = [m.plain() for m in body.messages]
    return await answer(server, request, body, Call("chat", _ChatPrompt(server.engine, messages), messages))


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest,
                      server: Server) -> ChatCompletion | TextCompletion | JSONResponse | StreamingResponse:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: exactly one prompt per request is supported", "invalid_request_error", "prompt")
    ids = server.engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "prompt: empty", "invalid_request_error", "prompt")
    # a raw prompt is sent as it is, also to a hybrid adapter (there is no conversation to put examples in)
    return await answer(server, request, body, Call("completions", lambda _: (ids, None), prompts[0]))


class _ChatPrompt:
    """A conversation's prompt for an adapter slot: the chat template over the messages, and for a
    hybrid adapter its nearest training examples in front, as in training."""

    def __init__(self, engine: Engine, messages: list[dict[str, str]]) -> None:
        self.engine, self.messages = engine, messages

    def __call__(self, adapter: str) -> tuple[list[int], Retrieved]:
        shown, retrieved = self.messages, None
        retriever = self.engine.retrievers.get(adapter)
        if retriever is not None:
            shown, retrieved = retriever.messages(self.messages)
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a conversation the template rejects (e.g. roles out of order)
            raise ApiError(400, f"messages: {exc}", "invalid_request_error", "messages") from exc
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, retrieved
