"""The API's errors: :class:`ApiError` (raised anywhere in a request, answered as an OpenAI-style
error body) and the handlers that give FastAPI's own errors the same shape. A client's mistake is
always a 4xx; never a 5xx."""

from __future__ import annotations

import json
from typing import TypedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def install_error_handlers(app: FastAPI) -> None:
    """ApiError, FastAPI's own 4xx and invalid request bodies (400) as OpenAI-style error bodies."""
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_invalid)


async def send_error(send: Send, exc: ApiError, rid: str) -> None:
    """``exc`` as a whole response, sent on the raw ASGI channel (the middleware, before any route)."""
    body = json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", rid.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 4xx (a body it cannot parse, an unknown path, a wrong method) in the same shape
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error",
                                   code="request_too_large" if exc.status_code == 413 else None),
                        status_code=exc.status_code, headers=exc.headers)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        msg = "the request body is not valid JSON"
    else:
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None, first.get("type")),
                        status_code=400)
