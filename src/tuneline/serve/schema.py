"""The request bodies of the OpenAI-compatible API, validated by pydantic, and the shapes of its
response bodies. Unknown request fields are ignored, as OpenAI's API does; known ones we do not
implement are refused with a 400 naming them, never silently ignored."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        # JSON may escape a lone surrogate ("\\ud800"); the tokenizer and the request log cannot encode one
        for s in value if isinstance(value, list) else [value]:
            if isinstance(s, str) and not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode") from None
        return value


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"part {i} has type {kind!r}: only text parts are supported")
        return value

    def plain(self) -> dict[str, str]:
        """As the chat template takes it: ``developer`` is a system message, text parts joined."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


_UNSET: tuple[object, ...] = (None, False, [], {}, 0, "none")  # values that ask for nothing


def _refuse(value: object) -> object:
    if value not in _UNSET:
        raise ValueError("not supported by this server (it would be ignored, so it is refused)")
    return value


class CommonRequest(_Req):
    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = Field(default=None, description="up to 4 stop strings")
    n: int = Field(default=1, ge=1, le=1, description="only 1")
    user: str | None = None
    seed: int | None = None
    # not implemented: refused when set (a client must not believe they were applied)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: int | None = None
    response_format: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None

    @field_validator("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
                     "presence_penalty", "frequency_penalty", "audio", "prediction")
    @classmethod
    def _not_implemented(cls, value: object) -> object:
        return _refuse(value)

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: object) -> object:
        if value is not None and value != {"type": "text"}:
            raise ValueError("only {'type': 'text'} is supported (no JSON mode or schemas)")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError("only ['text'] is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, object] | None) -> dict[str, object] | None:
        unknown = set(value or {}) - {"include_usage"}
        if unknown:
            raise ValueError(f"unsupported stream options {sorted(unknown)}")
        return value


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1, description="only 1")

    @field_validator("echo", "suffix")
    @classmethod
    def _not_implemented_here(cls, value: object) -> object:
        return _refuse(value)


class FeedbackRequest(_Req):
    response_id: str = Field(min_length=1, max_length=64)
    rating: int | None = Field(default=None, ge=-1, le=5, description="-1/1 (thumbs) or 1-5 stars")
    correction: str | None = Field(default=None, max_length=20_000)
    comment: str | None = Field(default=None, max_length=20_000)




# --- response bodies (what the routes return; FastAPI encodes them as they are) ---------------------


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # a hybrid adapter's answer: the training rows it was shown (where, similarity), to trace it
    retrieved: NotRequired[Sequence[Mapping[str, object]]]


class TextChoice(TypedDict):
    index: int
    text: str
    finish_reason: str
    logprobs: None


class TextCompletion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackAck(TypedDict):
    id: int
    object: Literal["feedback"]
    response_id: str


class Health(TypedDict):
    status: Literal["ok"]
    # only for a caller with a valid key (or without keys configured)
    adapters_loaded: NotRequired[list[str]]
    in_flight: NotRequired[int]
    queue_depth: NotRequired[int]
